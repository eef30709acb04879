"""Exact search in torch: keys resident on a device, [`exact_topk`] (fused Triton kernel on GPU) plus exact rescoring."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .base import BackendConfig, as_tensor, check_metric, check_search_args, register_backend
from .exact import exact_topk
from .rescore import matmul_input_unit, rescored_topk, score_slack


@register_backend
@dataclasses.dataclass
class TorchSearchConfig(BackendConfig):
    r"""Exact search in torch ([`TorchBackend`]).

    Args:
        device (`str`, `int` or `torch.device`, *optional*): Where the keys live (default: CUDA when available).
        dtype (`torch.dtype`, *optional*): Storage dtype of the keys (default fp16 on CUDA, fp32 on the CPU).
        rescore (`bool`, *optional*, defaults to `True`): Make the result exact whatever the storage dtype: candidates
            of the fast pass are rescored in float64 from the source keys (see `hf_realm.search.rescore`); proving it
            costs one host synchronisation per search. `False` returns the fast pass's top ``k`` as they rank in the
            storage dtype (scores still rescored, results re-sorted) without synchronising: for kNN-MT decoding on a
            GPU, where the search then overlaps the rest of the step. The fast pass rounds the queries (and lossy keys)
            to the storage dtype: the ids returned can differ from the exact ones only where scores differ by less
            than that rounding (`hf_realm.search.rescore.score_slack`); the scores returned are exact for the ids
            returned. Queries that the storage dtype represents (an fp16 model's states searched in fp16 keys)
            lose nothing but fp32 accumulation order.
        chunk_size (`int`, *optional*, defaults to 1M): Keys scored at once by the chunked torch path.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import TorchSearchConfig
    >>> backend = TorchSearchConfig(device="cpu").build(torch.eye(3), metric="l2")
    >>> sqdist, ids = backend.search(torch.tensor([[0.0, 0.9, 0.0]]), k=2)
    >>> ids.tolist(), [round(x, 2) for x in sqdist[0].tolist()]
    ([[1, 0]], [0.01, 1.81])
    ```
    """

    name: ClassVar[str] = "torch"
    device: str | int | torch.device | None = None
    dtype: torch.dtype | None = None
    rescore: bool = True
    chunk_size: int = 1 << 20

    def build(self, keys, *, metric: str = "inner_product", state: Any = None) -> TorchBackend:
        return TorchBackend(
            keys, metric=metric, device=self.device, dtype=self.dtype, rescore=self.rescore, chunk_size=self.chunk_size
        )


def device_and_dtype(device, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """A backend's device (default CUDA when available, with its index) and storage dtype (default fp16 on CUDA, fp32
    elsewhere)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    return device, dtype


def check_key_matrix(source: torch.Tensor) -> tuple[int, int]:
    """``(num_keys, dim)`` of a non-empty 2-d floating point key matrix; a clear error otherwise."""
    if source.dim() != 2 or not source.is_floating_point():
        raise ValueError(f"keys must be a 2-d floating point array, got {source.dtype} {tuple(source.shape)}")
    if source.shape[0] == 0:
        raise ValueError("no keys to search")
    return int(source.shape[0]), int(source.shape[1])


def _lossless(source: torch.dtype, storage: torch.dtype) -> bool:
    """Whether every ``source`` value is exactly representable in ``storage``."""
    if source == storage or storage == torch.float64:
        return True
    return storage == torch.float32 and source in (torch.float16, torch.bfloat16)


class TorchBackend:
    """Exact search over keys held on one device (see [`TorchSearchConfig`]).

    The keys are stored in ``dtype`` (fp16 on GPU halves the bytes each search reads); when that loses precision (fp32
    source keys stored in fp16) the source keys are kept where they are (e.g. on the host, no copy) and only the
    candidates are read from them. For the `"l2"` metric the fast pass is a maximum inner product search with
    ``key_bias = -||k||^2 / 2`` (computed in fp32 from the source keys).
    """

    def __init__(
        self,
        keys,
        *,
        metric: str = "inner_product",
        device: str | int | torch.device | None = None,
        dtype: torch.dtype | None = None,
        rescore: bool = True,
        chunk_size: int = 1 << 20,
    ):
        self.metric = check_metric(metric)
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.rescore = rescore
        self.chunk_size = chunk_size
        self._set_keys(as_tensor(keys))

    def _set_keys(self, source: torch.Tensor) -> None:
        n, d = check_key_matrix(source)
        lossless = _lossless(source.dtype, self.dtype)
        keys = torch.empty(n, d, dtype=self.dtype, device=self.device)
        bias = torch.empty(n, dtype=torch.float32, device=self.device) if self.metric == "l2" else None
        max_abs = torch.zeros(d, dtype=torch.float32, device=self.device)
        rounding = None if lossless else torch.zeros(d, dtype=torch.float64, device=self.device)
        step = max(1, (1 << 24) // d)
        for start in range(0, n, step):
            chunk = source[start : start + step].to(self.device)
            stored = chunk.to(self.dtype)
            if not bool(torch.isfinite(stored).all()):
                rows = f"rows {start}..{start + len(chunk) - 1}"
                if not bool(torch.isfinite(chunk).all()):
                    raise ValueError(f"keys contain NaN or inf ({rows})")
                raise ValueError(
                    f"keys ({rows}) exceed the range of {self.dtype} (max {torch.finfo(self.dtype).max:g}); "
                    "use dtype=torch.float32"
                )
            keys[start : start + len(chunk)] = stored
            if bias is not None:
                bias[start : start + len(chunk)] = -0.5 * chunk.float().pow(2).sum(-1)
            max_abs = torch.maximum(max_abs, stored.float().abs().amax(0))
            if rounding is not None:
                rounding = torch.maximum(rounding, (chunk.double() - stored.double()).abs().amax(0))
        self.keys = keys
        self.key_bias = bias
        self._source = None if lossless else source
        self._max_abs = max_abs
        self._rounding = rounding
        self._max_abs_bias = float(bias.abs().max()) if bias is not None else 0.0

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.key_bias.nbytes if self.key_bias is not None else 0)

    def source_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The source keys of ``ids`` (exact values; on the host when the device stores a lossy copy)."""
        if self._source is None:
            return self.keys[ids.to(self.device)]
        return self._source[ids.to(self._source.device)]

    def _fast(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_topk(queries, self.keys, k, key_bias=self.key_bias, chunk_size=self.chunk_size)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_search_args(queries, k, self.num_keys, self.dim)
        q = queries.to(self.device, torch.float32)
        slack = None
        if self.rescore:
            slack = score_slack(
                q,
                self.dtype,
                self._max_abs,
                self._rounding,
                self._max_abs_bias,
                matmul_input_unit(self.dtype, self.device),
            )
        return rescored_topk(
            q, int(k), self.num_keys, candidates=self._fast, source_rows=self.source_rows, slack=slack,
            metric=self.metric, oversample=self.rescore,
        )  # fmt: skip

    def add(self, keys) -> None:
        current = self._source if self._source is not None else self.keys
        new = as_tensor(keys).to(current.device, current.dtype)
        self._set_keys(torch.cat([current, new]))

    def replace(self, keys) -> None:
        self._set_keys(as_tensor(keys))

    def save(self, path: str) -> bool:
        return False  # no state beyond the keys

    def __repr__(self) -> str:
        return (
            f"TorchBackend(num_keys={self.num_keys}, dim={self.dim}, metric={self.metric!r}, device={self.device}, "
            f"dtype={self.dtype}, rescore={self.rescore})"
        )
