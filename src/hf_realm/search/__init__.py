"""The search layer: knows nothing of REALM or kNN.

- [`exact_topk`]: exact dense top-k (maximum inner product, or L2 through ``key_bias``) in torch, with a fused Triton
  kernel on GPU.
- backends: exact torch and faiss (flat, index factory, GPU) behind one ``search(queries, k)`` call.
- [`sharded_search`]: exact top-k over keys split across processes, merged with one all-gather.
- product quantisation: search over PQ-coded keys.
"""

from .exact import TRITON_MAX_K, exact_topk, triton_available, tuning_log
from .faiss_utils import faiss_available, faiss_gpu_available, import_faiss
from .pq import pq_decode
from .sharded import shard_range, sharded_search


__all__ = [
    "TRITON_MAX_K",
    "exact_topk",
    "faiss_available",
    "faiss_gpu_available",
    "import_faiss",
    "pq_decode",
    "shard_range",
    "sharded_search",
    "triton_available",
    "tuning_log",
]
