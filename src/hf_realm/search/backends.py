"""Search backends: exact torch (Triton on GPU) and faiss (flat, index factory, GPU)."""

from __future__ import annotations

import numpy as np
import torch

from .exact import exact_topk
from .faiss_utils import faiss_gpu_available, import_faiss


_FAISS_INDEX_NAME_IN_DATASET = "embeddings"

# ----------------------------------------------------------------------------------------------------------------------
# Search backends
# ----------------------------------------------------------------------------------------------------------------------


class _TorchBackend:
    """Exact search with `exact_topk`: embeddings resident on ``device`` in ``dtype`` (fp16/bf16 on GPU)."""

    name = "torch"

    def __init__(self, embeddings: torch.Tensor, device=None, dtype=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.keys = embeddings.to(self.device, dtype).contiguous()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_topk(queries.to(self.device), self.keys, k)


class _FaissBackend:
    """A faiss index held by the corpus dataset (`datasets`' FAISS integration): flat inner product by default, any
    index-factory string (trained on a random sample) otherwise; optionally on GPU (faiss-gpu)."""

    def __init__(
        self,
        corpus,
        embeddings: np.ndarray | None,
        index_factory: str = "Flat",
        search_params: dict | None = None,
        gpu: int | None = None,
        train_size: int | None = None,
        faiss_index=None,
        seed: int = 0,
    ):
        faiss = import_faiss()
        self.index_factory = index_factory
        self.name = "faiss-gpu" if gpu is not None else "faiss"
        if gpu is not None and not faiss_gpu_available():
            raise ImportError(
                "backend='faiss-gpu' needs faiss with GPU support and a GPU: `pip install faiss-gpu-cu12`"
            )
        if faiss_index is None:
            dim = embeddings.shape[1]
            faiss_index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
            if not faiss_index.is_trained:
                rng = np.random.default_rng(seed)
                n_train = min(len(embeddings), train_size or 256 * 1024)
                sample = embeddings[np.sort(rng.choice(len(embeddings), n_train, replace=False))]
                faiss_index.train(np.ascontiguousarray(sample, dtype=np.float32))
        if gpu is not None:
            self._gpu_resources = faiss.StandardGpuResources()
            faiss_index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, faiss_index)
        self._apply_search_params(faiss_index, search_params or {}, gpu is not None)
        self.search_params = dict(search_params or {})
        if faiss_index.ntotal == 0:
            corpus.add_faiss_index_from_external_arrays(
                external_arrays=np.ascontiguousarray(embeddings, dtype=np.float32),
                index_name=_FAISS_INDEX_NAME_IN_DATASET,
                custom_index=faiss_index,
                batch_size=65536,
            )
        else:
            import datasets

            holder = datasets.search.FaissIndex(custom_index=faiss_index)
            corpus._indexes[_FAISS_INDEX_NAME_IN_DATASET] = holder
        self.faiss_index = corpus.get_index(_FAISS_INDEX_NAME_IN_DATASET)

    @staticmethod
    def _apply_search_params(index, params: dict, gpu: bool):
        if not params:
            return
        faiss = import_faiss()
        space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
        for key, value in params.items():
            space.set_index_parameter(index, key, value)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        result = self.faiss_index.search_batch(q, k)
        scores = torch.from_numpy(np.asarray(result.total_scores, dtype=np.float32))
        ids = torch.from_numpy(np.asarray(result.total_indices, dtype=np.int64))
        scores[ids < 0] = float("-inf")  # faiss pads with -1 when an approximate index finds fewer than k
        return scores, ids

    def cpu_index(self):
        faiss = import_faiss()
        index = self.faiss_index.faiss_index
        return faiss.index_gpu_to_cpu(index) if self.name == "faiss-gpu" else index
