"""Product-quantised keys: decoding, and exact search over the decoded keys (asymmetric distances, as faiss
`IndexPQ`), made exact in the sense of `hf_realm.search.rescore` with the reconstructions as the source keys."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .base import BackendConfig, as_tensor, check_metric, check_search_args, register_backend
from .exact import exact_topk
from .rescore import matmul_input_unit, rescored_topk, score_slack


def _pq_sqnorms(codes: torch.Tensor, codebooks: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """||reconstruction||^2 of every PQ-coded entry (sum over sub-spaces of the centroid norms)."""
    centroid_norms = codebooks.pow(2).sum(-1)  # (m, ksub)
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=codes.device)
    sub = torch.arange(codes.shape[1], device=codes.device)
    for start in range(0, codes.shape[0], chunk):
        c = codes[start : start + chunk].long()
        out[start : start + c.shape[0]] = centroid_norms[sub, c].sum(-1)
    return out


def pq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Reconstructs `(n, m * dsub)` float32 keys from PQ ``codes`` `(n, m)` and ``codebooks`` `(m, ksub, dsub)`."""
    sub = torch.arange(codes.shape[1], device=codes.device)
    return codebooks[sub, codes.long()].reshape(codes.shape[0], -1)


@dataclasses.dataclass
class PQCodes:
    """Product-quantised keys: ``codes`` `(num_keys, m)` uint8 and ``codebooks`` `(m, ksub, dsub)` float32."""

    codes: Any
    codebooks: Any

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codebooks.shape[0] * self.codebooks.shape[2]))


@register_backend
@dataclasses.dataclass
class PQSearchConfig(BackendConfig):
    r"""Exact search over product-quantised keys ([`PQBackend`]); ``build`` takes a [`PQCodes`].

    Args:
        device (`str`, `int` or `torch.device`, *optional*): Where codes and codebooks live (default: CUDA when
            available).
        chunk_size (`int`, *optional*, defaults to 262,144): Keys decoded at once.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import PQCodes, PQSearchConfig
    >>> codebooks = torch.tensor([[[0.0], [1.0]], [[0.0], [2.0]]])  # 2 sub-spaces of 1 dim, 2 centroids each
    >>> codes = torch.tensor([[0, 0], [1, 1], [1, 0]], dtype=torch.uint8)  # keys (0, 0), (1, 2), (1, 0)
    >>> backend = PQSearchConfig(device="cpu").build(PQCodes(codes, codebooks), metric="l2")
    >>> sqdist, ids = backend.search(torch.tensor([[1.0, 0.5]]), k=2)
    >>> ids.tolist(), sqdist.tolist()  # (1, 0) then (0, 0)
    ([[2, 0]], [[0.25, 1.25]])
    ```
    """

    name: ClassVar[str] = "pq"
    device: str | int | torch.device | None = None
    chunk_size: int = 1 << 18

    def build(self, keys, *, metric: str = "l2", state: Any = None) -> PQBackend:
        if isinstance(keys, dict):
            keys = PQCodes(keys["codes"], keys["codebooks"])
        if not isinstance(keys, PQCodes):
            raise TypeError(f"the pq backend searches PQCodes (codes + codebooks), got {type(keys).__name__}")
        return PQBackend(keys.codes, keys.codebooks, metric=metric, device=self.device, chunk_size=self.chunk_size)


class PQBackend:
    """Search over PQ-coded keys held on one device: reconstructions decoded a chunk at a time and searched with
    [`exact_topk`], candidates rescored in float64 from their reconstructions."""

    def __init__(self, codes, codebooks, *, metric: str = "l2", device=None, chunk_size: int = 1 << 18):
        self.metric = check_metric(metric)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self._load(codes, codebooks)

    def _load(self, codes, codebooks) -> None:
        self.codes = as_tensor(codes).to(self.device, torch.uint8)
        self.codebooks = as_tensor(codebooks).to(self.device, torch.float32)
        if self.codes.dim() != 2 or self.codebooks.dim() != 3 or self.codebooks.shape[0] != self.codes.shape[1]:
            raise ValueError(
                f"pq codes {tuple(self.codes.shape)} / codebooks {tuple(self.codebooks.shape)} do not fit"
            )
        self.key_bias = -0.5 * _pq_sqnorms(self.codes, self.codebooks) if self.metric == "l2" else None
        self._max_abs = self.codebooks.abs().amax(1).reshape(-1)
        self._max_abs_bias = float(self.key_bias.abs().max()) if self.key_bias is not None else 0.0

    @property
    def num_keys(self) -> int:
        return self.codes.shape[0]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[0] * self.codebooks.shape[2]

    @property
    def nbytes(self) -> int:
        bias = self.key_bias.nbytes if self.key_bias is not None else 0
        return self.codes.nbytes + self.codebooks.nbytes + bias

    def source_rows(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        return pq_decode(self.codes[ids.reshape(-1)], self.codebooks).reshape(*ids.shape, -1)

    def _fast(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores = best_ids = None
        for start in range(0, self.num_keys, self.chunk_size):
            keys = pq_decode(self.codes[start : start + self.chunk_size], self.codebooks)
            bias = None if self.key_bias is None else self.key_bias[start : start + keys.shape[0]]
            scores, ids = exact_topk(q, keys, min(k, keys.shape[0]), key_bias=bias)
            ids = ids + start
            if best_scores is not None:
                scores, order = torch.cat([best_scores, scores], 1).topk(
                    min(k, best_scores.shape[1] + ids.shape[1]), 1
                )
                ids = torch.cat([best_ids, ids], 1).gather(1, order)
            best_scores, best_ids = scores, ids
        return best_scores, best_ids

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_search_args(queries, k, self.num_keys, self.dim)
        q = queries.to(self.device, torch.float32)
        unit = matmul_input_unit(torch.float32, self.device)
        slack = score_slack(q, torch.float32, self._max_abs, None, self._max_abs_bias, unit)
        return rescored_topk(
            q, int(k), self.num_keys, candidates=self._fast, source_rows=self.source_rows, slack=slack,
            metric=self.metric,
        )  # fmt: skip

    def add(self, keys: PQCodes) -> None:
        if not torch.equal(as_tensor(keys.codebooks).to(self.codebooks), self.codebooks):
            raise ValueError("added PQ codes must use the same codebooks")
        self._load(torch.cat([self.codes, as_tensor(keys.codes).to(self.codes)]), self.codebooks)

    def replace(self, keys: PQCodes) -> None:
        self._load(keys.codes, keys.codebooks)

    def save(self, path: str) -> bool:
        return False  # codes and codebooks are the owner's

    def __repr__(self) -> str:
        return f"PQBackend(num_keys={self.num_keys}, dim={self.dim}, metric={self.metric!r}, device={self.device})"
