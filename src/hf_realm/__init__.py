"""hf_realm: REALM and kNN-MT / kNN-LM for the Hugging Face stack.

Importing the package registers `model_type="realm"` with transformers' Auto classes, so that
`AutoModel.from_pretrained(path)` loads REALM checkpoints without `trust_remote_code`.
"""

__version__ = "0.1.0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
)

from . import metrics
from .configuration_realm import RealmConfig
from .data_collator import DataCollatorForSalientSpanMasking
from .masking import SalientSpanMasker, find_salient_spans
from .modeling_realm import (
    RealmEmbedder,
    RealmEmbedderOutput,
    RealmForInverseClozeTask,
    RealmForInverseClozeTaskOutput,
    RealmForMaskedLM,
    RealmForMaskedLMOutput,
    RealmForOpenQA,
    RealmForOpenQAOutput,
    RealmKnowledgeAugEncoder,
    RealmPreTrainedModel,
    RealmReader,
    RealmReaderOutput,
    RealmScorer,
    RealmScorerOutput,
)
from .pretraining import DataCollatorForInverseClozeTask
from .retrieval_realm import RealmRetriever, load_legacy_block_records
from .tokenization_realm import RealmTokenizer, RealmTokenizerFast
from .world import KnowledgeWorld, WorldConfig


def _register() -> None:
    AutoConfig.register("realm", RealmConfig, exist_ok=True)
    AutoModel.register(RealmConfig, RealmEmbedder, exist_ok=True)
    AutoModelForMaskedLM.register(RealmConfig, RealmKnowledgeAugEncoder, exist_ok=True)
    AutoModelForQuestionAnswering.register(RealmConfig, RealmForOpenQA, exist_ok=True)
    AutoTokenizer.register(RealmConfig, fast_tokenizer_class=RealmTokenizer, exist_ok=True)


_register()

__all__ = [
    "DataCollatorForInverseClozeTask",
    "DataCollatorForSalientSpanMasking",
    "KnowledgeWorld",
    "RealmConfig",
    "RealmEmbedder",
    "RealmEmbedderOutput",
    "RealmForInverseClozeTask",
    "RealmForInverseClozeTaskOutput",
    "RealmForMaskedLM",
    "RealmForMaskedLMOutput",
    "RealmForOpenQA",
    "RealmForOpenQAOutput",
    "RealmKnowledgeAugEncoder",
    "RealmPreTrainedModel",
    "RealmReader",
    "RealmReaderOutput",
    "RealmRetriever",
    "RealmScorer",
    "RealmScorerOutput",
    "RealmTokenizer",
    "RealmTokenizerFast",
    "SalientSpanMasker",
    "WorldConfig",
    "find_salient_spans",
    "load_legacy_block_records",
    "metrics",
]
