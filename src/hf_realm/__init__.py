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

from .configuration_realm import RealmConfig
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
from .retrieval_realm import RealmRetriever, load_legacy_block_records
from .tokenization_realm import RealmTokenizer, RealmTokenizerFast


def _register() -> None:
    AutoConfig.register("realm", RealmConfig, exist_ok=True)
    AutoModel.register(RealmConfig, RealmEmbedder, exist_ok=True)
    AutoModelForMaskedLM.register(RealmConfig, RealmKnowledgeAugEncoder, exist_ok=True)
    AutoModelForQuestionAnswering.register(RealmConfig, RealmForOpenQA, exist_ok=True)
    AutoTokenizer.register(RealmConfig, fast_tokenizer_class=RealmTokenizer, exist_ok=True)


_register()

__all__ = [
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
    "load_legacy_block_records",
]
