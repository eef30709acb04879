"""faiss search: a flat index or any index-factory string (IVF, HNSW, IVF-PQ), on the CPU or a GPU (faiss-gpu)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import numpy as np
import torch

from .base import BackendConfig, as_tensor, check_metric, check_search_args, register_backend
from .faiss_utils import faiss_gpu_available, import_faiss
from .rescore import exact_scores, sort_best_first


_ADD_CHUNK = 1 << 16


@register_backend
@dataclasses.dataclass
class FaissSearchConfig(BackendConfig):
    r"""A faiss index ([`FaissBackend`]).

    Args:
        index_factory (`str`, *optional*, defaults to `"Flat"`):
            A faiss index-factory string: `"Flat"` is exact (`IndexFlatIP` / `IndexFlatL2`); `"IVF4096,Flat"`,
            `"HNSW32"`, `"IVF4096,PQ32x8"` are approximate and trained on a random sample of the keys.
        search_params (`dict`, *optional*): Search-time parameters (`nprobe`, `efSearch`, ...) set through faiss'
            `ParameterSpace`.
        gpu (`int`, *optional*): Put the index on this GPU (needs `faiss-gpu-cu12`).
        train_size (`int`, *optional*): Keys sampled to train an approximate index (default 262,144).
        seed (`int`, *optional*, defaults to 0): Seed of the training sample.
        rerank (`int`, *optional*, defaults to 0): Fetch ``rerank * k`` results and re-rank them by their exact
            float64 scores from the keys (0: off). Needs the keys at search time.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from hf_realm.search import FaissSearchConfig, faiss_available
    >>> config = FaissSearchConfig(index_factory="Flat")
    >>> if faiss_available():  # faiss is optional
    ...     backend = config.build(np.eye(4, dtype=np.float32), metric="inner_product")
    ...     print(backend.search(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), k=2)[1].tolist())
    ... else:
    ...     print([[1, 2]])
    [[1, 2]]
    ```
    """

    name: ClassVar[str] = "faiss"
    index_factory: str = "Flat"
    search_params: dict = dataclasses.field(default_factory=dict)
    gpu: int | None = None
    train_size: int | None = None
    seed: int = 0
    rerank: int = 0

    @classmethod
    def ivfpq(
        cls,
        num_keys: int,
        dim: int,
        *,
        nlist: int | None = None,
        m: int | None = None,
        nbits: int = 8,
        nprobe: int = 32,
        rerank: int = 4,
        train_size: int | None = None,
        gpu: int | None = None,
    ) -> FaissSearchConfig:
        """An IVF-PQ index sized for ``num_keys`` keys of dimension ``dim``: ``nlist`` lists (default
        ``4 sqrt(num_keys)``, at least 39 keys a list), ``m`` sub-quantisers of ``nbits`` bits (default ``dim / 8``),
        ``nprobe`` lists probed, ``rerank`` (see the class), trained on ``train_size`` keys (default 256 a list)."""
        nlist = int(nlist if nlist is not None else max(1, min(num_keys // 39, int(4 * math.sqrt(num_keys)))))
        m = int(m if m is not None else max(1, dim // 8))
        if dim % m:
            raise ValueError(f"m={m} sub-quantisers must divide the key dim {dim}")
        return cls(
            index_factory=f"IVF{nlist},PQ{m}x{int(nbits)}",
            search_params={"nprobe": int(nprobe)},
            gpu=gpu,
            train_size=min(num_keys, int(train_size if train_size is not None else 256 * nlist)),
            rerank=int(rerank),
        )

    def build(self, keys, *, metric: str = "inner_product", state: Any = None) -> FaissBackend:
        return FaissBackend(keys, metric=metric, config=self, index=state)


def _as_float32_rows(keys, rows=None) -> np.ndarray:
    if torch.is_tensor(keys):
        part = keys if rows is None else keys[torch.as_tensor(rows)]
        return np.ascontiguousarray(part.detach().to("cpu", torch.float32).numpy())
    part = keys if rows is None else keys[rows]
    return np.ascontiguousarray(part, dtype=np.float32)


class FaissBackend:
    """A faiss index over the keys (see [`FaissSearchConfig`]).

    ``index`` (the ``state`` of [`FaissSearchConfig.build`]) reuses an index trained and filled before (a faiss index
    or the path of a file written by [`~FaissBackend.save`]); ``keys`` may then be `None` unless ``rerank`` needs them.
    """

    def __init__(self, keys, *, metric: str = "inner_product", config: FaissSearchConfig | None = None, index=None):
        faiss = import_faiss()
        self.metric = check_metric(metric)
        self.config = config = config or FaissSearchConfig()
        if config.gpu is not None and not faiss_gpu_available():
            raise ImportError("a faiss GPU index needs faiss with GPU support and a GPU: `pip install faiss-gpu-cu12`")
        if config.rerank and keys is None:
            raise ValueError("rerank > 0 needs the keys")
        self._keys = keys
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "inner_product" else faiss.METRIC_L2
        if isinstance(index, (str, os.PathLike)):
            path = os.fspath(index)
            try:
                index = faiss.read_index(path)
            except Exception as err:  # faiss raises a C++ assertion text for truncated files
                raise ValueError(f"cannot read the faiss index {path}: {str(err).splitlines()[0][:200]}") from err
        if index is None:
            if keys is None:
                raise ValueError("keys are needed to build a faiss index")
            n, dim = keys.shape
            index = faiss.index_factory(dim, config.index_factory, faiss_metric)
            if not index.is_trained:
                rng = np.random.default_rng(config.seed)
                n_train = min(n, config.train_size or 256 * 1024)
                index.train(_as_float32_rows(keys, np.sort(rng.choice(n, n_train, replace=False))))
            for start in range(0, n, _ADD_CHUNK):
                index.add(_as_float32_rows(keys[start : start + _ADD_CHUNK]))
        elif index.metric_type != faiss_metric:
            raise ValueError(
                f"the faiss index has metric type {index.metric_type}, expected {faiss_metric} ({metric})"
            )
        if keys is not None and (index.ntotal != keys.shape[0] or index.d != keys.shape[1]):
            raise ValueError(
                f"the faiss index holds {index.ntotal} vectors of dim {index.d}, expected {keys.shape[0]} x "
                f"{keys.shape[1]}"
            )
        if config.gpu is not None:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, config.gpu, index)
        if config.search_params:
            space = faiss.GpuParameterSpace() if config.gpu is not None else faiss.ParameterSpace()
            for key, value in config.search_params.items():
                space.set_index_parameter(index, key, value)
        self.faiss_index = index

    @property
    def num_keys(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded vectors (``sa_code_size() * ntotal``); the serialised size where faiss has no code
        size for this index type."""
        index = self.cpu_index()
        try:
            return int(index.sa_code_size()) * self.num_keys
        except RuntimeError:
            return int(import_faiss().serialize_index(index).nbytes)

    def cpu_index(self):
        """The index on the CPU (a copy when it lives on a GPU)."""
        if self.config.gpu is None:
            return self.faiss_index
        return import_faiss().index_gpu_to_cpu(self.faiss_index)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_search_args(queries, k, self.num_keys, self.dim)
        rerank = self.config.rerank
        fetch = min(self.num_keys, k * rerank) if rerank > 0 else k
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, ids = self.faiss_index.search(q, fetch)
        scores, ids = torch.from_numpy(np.asarray(scores, dtype=np.float32)), torch.from_numpy(ids.astype(np.int64))
        missing = ids < 0  # an approximate index pads with -1 when it finds fewer than `fetch` keys
        worst = float("-inf") if self.metric == "inner_product" else float("inf")
        if rerank > 0:
            keys = as_tensor(self._keys)
            exact = exact_scores(torch.from_numpy(q), ids.clamp(min=0), lambda i: keys[i.to(keys.device)], self.metric)
            exact, ids = sort_best_first(exact.masked_fill(missing, worst), ids, self.metric)
            scores, ids = exact[:, :k].float(), ids[:, :k]
            missing = ids < 0
        return scores.masked_fill(missing, worst), ids

    def add(self, keys) -> None:
        for start in range(0, keys.shape[0], _ADD_CHUNK):
            self.faiss_index.add(_as_float32_rows(keys[start : start + _ADD_CHUNK]))
        if self._keys is not None:
            self._keys = torch.cat([as_tensor(self._keys), as_tensor(keys).to(as_tensor(self._keys).dtype)])

    def replace(self, keys) -> None:
        self.faiss_index.reset()  # keeps the trained coarse quantiser / codebooks
        self._keys = None if self._keys is None else keys
        for start in range(0, keys.shape[0], _ADD_CHUNK):
            self.faiss_index.add(_as_float32_rows(keys[start : start + _ADD_CHUNK]))

    def save(self, path: str) -> bool:
        import_faiss().write_index(self.cpu_index(), os.fspath(path))
        return True

    def __repr__(self) -> str:
        return f"FaissBackend(num_keys={self.num_keys}, dim={self.dim}, metric={self.metric!r}, config={self.config})"
