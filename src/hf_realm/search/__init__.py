"""The search layer: knows nothing of REALM or kNN.

- [`SearchBackend`]: the protocol every backend follows: ``search(queries, k) -> (scores or squared distances, ids)``,
  ``add`` / ``replace`` keys, ``save`` its own state, ``nbytes``. Metrics `"inner_product"` and `"l2"`.
- backends, each built from a small config dataclass: [`TorchSearchConfig`] (exact, keys resident on a device, the
  fused Triton kernel on GPU, float64 rescoring so that fp16 storage stays exact), [`FaissSearchConfig`] (flat, any
  index-factory string, GPU), [`PQSearchConfig`] (product-quantised keys), [`IVFSearchConfig`] (`"torch-ivf"`:
  approximate, inverted lists over keys on one device, exact re-ranking; [`ivf_recall`] measures it on given
  queries, [`self_recall`] on its own keys, [`tune_nprobe`] raises ``nprobe`` to a recall). [`backend_config`] maps the package's
  backend names onto them; [`register_backend`] adds a new one.
- [`exact_topk`]: exact dense top-k (maximum inner product, or L2 through ``key_bias``) in torch, with a fused Triton
  kernel on GPU.
- [`sharded_search`]: exact top-k over keys split across processes, merged with one all-gather;
  [`ShardedSearchConfig`] (`"sharded"`): the same as a backend, each process holding its shard in an inner backend
  (e.g. a kNN datastore split across the GPUs of a host).
"""

from .backends import backend_config, backend_names
from .base import BACKENDS, METRICS, BackendConfig, SearchBackend, register_backend
from .exact import TRITON_MAX_K, exact_topk, triton_available, tuning_log
from .faiss_backend import FaissBackend, FaissSearchConfig
from .faiss_utils import faiss_available, faiss_gpu_available, import_faiss
from .ivf import IVFBackend, IVFSearchConfig, ivf_recall, self_recall, tune_nprobe
from .kmeans import kmeans
from .pq import PQBackend, PQCodes, PQSearchConfig, pq_decode
from .sharded import ShardedBackend, ShardedSearchConfig, shard_range, sharded_search
from .torch_backend import TorchBackend, TorchSearchConfig


__all__ = [
    "BACKENDS",
    "METRICS",
    "TRITON_MAX_K",
    "BackendConfig",
    "FaissBackend",
    "FaissSearchConfig",
    "IVFBackend",
    "IVFSearchConfig",
    "PQBackend",
    "PQCodes",
    "PQSearchConfig",
    "SearchBackend",
    "ShardedBackend",
    "ShardedSearchConfig",
    "TorchBackend",
    "TorchSearchConfig",
    "backend_config",
    "backend_names",
    "exact_topk",
    "faiss_available",
    "faiss_gpu_available",
    "import_faiss",
    "ivf_recall",
    "kmeans",
    "pq_decode",
    "register_backend",
    "self_recall",
    "shard_range",
    "sharded_search",
    "triton_available",
    "tune_nprobe",
    "tuning_log",
]
