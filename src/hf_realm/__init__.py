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

from . import metrics, modeling_realm
from .callbacks import FreezeRetrieverCallback, IndexRefreshCallback
from .configuration_realm import RealmConfig
from .corpus import CorpusTokens, build_corpus
from .corpus_index import RealmBlockIndex
from .data_collator import DataCollatorForSalientSpanMasking
from .embedding import embed_corpus, init_retriever_projection
from .fingerprint import embedder_fingerprint
from .knn_build import KNNDatastoreWriter, merge_datastores
from .knn_datastore import KNNDatastore
from .knn_generation import KNNLogitsProcessor, knn_lm_perplexity
from .knn_hook import KNNQueryHook
from .knn_pruning import (
    cluster_prune,
    confidence_prune,
    greedy_merge,
    pca_compress,
    pq_compress,
    prune_datastore,
    random_prune,
    shrink_datastore,
)
from .masking import NoSalientSpanWarning, SalientSpanMasker, find_salient_spans
from .modeling_realm import *  # noqa: F403  (every name of modeling_realm.__all__)
from .modeling_realm import RealmEmbedder, RealmForMaskedLM, RealmForOpenQA, RealmKnowledgeAugEncoder
from .openqa import DataCollatorForOpenQA, OpenQAEvalCallback, evaluate_open_qa
from .pretraining import (
    DataCollatorForInverseClozeTask,
    RetrievalMonitorCallback,
    evaluate_masked_lm,
    grouped_order,
    optimizer_grouped_parameters,
    realm_lr_scheduler,
    train_inverse_cloze_task,
    train_reader_warm_start,
)
from .pretraining_data import (
    build_pretraining_examples,
    corpus_sentences,
    load_text_dataset,
    train_wordpiece_tokenizer,
)
from .retrieval_realm import RealmRetriever, load_legacy_block_records
from .search import exact_topk, shard_range, sharded_search
from .tokenization_realm import RealmTokenizer, RealmTokenizerFast
from .world import KnowledgeWorld, WorldConfig


def _register() -> None:
    AutoConfig.register("realm", RealmConfig, exist_ok=True)
    AutoModel.register(RealmConfig, RealmEmbedder, exist_ok=True)
    # A tuple: transformers picks the class named in config.json's `architectures` (the first one by default), so
    # 4.x encoder checkpoints load as `RealmKnowledgeAugEncoder` and what REALM pretraining saved as itself.
    AutoModelForMaskedLM._model_mapping.register(
        RealmConfig, (RealmKnowledgeAugEncoder, RealmForMaskedLM), exist_ok=True
    )
    AutoModelForQuestionAnswering.register(RealmConfig, RealmForOpenQA, exist_ok=True)
    AutoTokenizer.register(RealmConfig, fast_tokenizer_class=RealmTokenizer, exist_ok=True)


_register()

__all__ = [
    *modeling_realm.__all__,
    "KNNDatastore",
    "KNNDatastoreWriter",
    "KNNLogitsProcessor",
    "KNNQueryHook",
    "cluster_prune",
    "confidence_prune",
    "greedy_merge",
    "knn_lm_perplexity",
    "merge_datastores",
    "pca_compress",
    "pq_compress",
    "prune_datastore",
    "shrink_datastore",
    "random_prune",
    "CorpusTokens",
    "DataCollatorForOpenQA",
    "FreezeRetrieverCallback",
    "IndexRefreshCallback",
    "RealmBlockIndex",
    "build_corpus",
    "embed_corpus",
    "init_retriever_projection",
    "embedder_fingerprint",
    "evaluate_masked_lm",
    "evaluate_open_qa",
    "OpenQAEvalCallback",
    "exact_topk",
    "optimizer_grouped_parameters",
    "grouped_order",
    "realm_lr_scheduler",
    "shard_range",
    "sharded_search",
    "train_inverse_cloze_task",
    "train_reader_warm_start",
    "build_pretraining_examples",
    "corpus_sentences",
    "load_text_dataset",
    "train_wordpiece_tokenizer",
    "RetrievalMonitorCallback",
    "NoSalientSpanWarning",
    "DataCollatorForInverseClozeTask",
    "DataCollatorForSalientSpanMasking",
    "KnowledgeWorld",
    "RealmConfig",
    "RealmRetriever",
    "RealmTokenizer",
    "RealmTokenizerFast",
    "SalientSpanMasker",
    "WorldConfig",
    "find_salient_spans",
    "load_legacy_block_records",
    "metrics",
]
