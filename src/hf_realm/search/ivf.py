"""IVF: an approximate search over keys resident on one device, for stores past what an exact scan serves fast.

The keys are clustered by a seeded k-means (`hf_realm.search.kmeans`) into ``nlist`` lists and stored list by list
(fp16 on CUDA). A query scores the list centroids, reads the keys of its ``nprobe`` best lists, ranks them in fp32,
and re-ranks its best ``rerank * k`` in float64 from the source keys: the scores returned are exact, and so is the
order of what was found; what is approximate is which lists are read. [`ivf_recall`] measures that against an exact
backend. With ``nprobe = nlist`` every key is read and the answer equals an exact search's (up to fp32 near-ties
outside the re-ranked candidates).

Two ways to read the lists (``scan``):

- ``"query"`` (default): each query ranks the keys of its own ``nprobe`` lists, gathered per query. The answer for a
  query does not depend on the other queries of the batch.
- ``"union"``: the whole batch is searched over the keys of every list that some query of the batch probes, with the
  exact search of [`exact_topk`]: their keys are gathered into one block first, or, with ``read_in_place=True`` on a
  GPU (fp16 / bf16 keys), the fused Triton kernel reads the lists where they are stored (``row_ranges``), without a
  host sync. Each query reads a superset of its own lists, so its recall is at least that of ``"query"``, and a batch of
  queries that probe the same lists (the beams of one sentence, the sentences of one domain) reads each key once. A
  query's answer can depend on the batch it comes in (more lists read, never fewer).

A query whose probed lists hold fewer than ``k`` keys gets id ``-1`` (and ``-inf`` score / ``+inf`` distance) in the
remaining slots, as the search contract says for approximate backends.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch

from .base import BackendConfig, as_tensor, check_metric, check_search_args, register_backend
from .exact import _disable_triton, _range_rows, _triton_eligible, _triton_topk, exact_topk
from .kmeans import kmeans
from .rescore import exact_scores, sort_best_first
from .torch_backend import _lossless, check_key_matrix, device_and_dtype


@register_backend
@dataclasses.dataclass
class IVFSearchConfig(BackendConfig):
    r"""An inverted-file search over keys on one device ([`IVFBackend`]).

    Args:
        nlist (`int`, *optional*): Lists (k-means clusters); default ``round(4 * sqrt(num_keys))``, at most the keys.
        nprobe (`int`, *optional*, defaults to 32): Lists read per query (capped at ``nlist``).
        device (`str`, `int` or `torch.device`, *optional*): Where the keys live (default: CUDA when available).
        dtype (`torch.dtype`, *optional*): Storage dtype of the keys (default fp16 on CUDA, fp32 on the CPU).
        train_size (`int`, *optional*): Keys the k-means trains on (default ``64 * nlist``, at most all of them).
        iters (`int`, *optional*, defaults to 10): k-means iterations.
        seed (`int`, *optional*, defaults to 0): Seed of the training sample and of the k-means.
        rerank (`int`, *optional*, defaults to 4): ``rerank * k`` candidates (at least ``k + 16``) are re-scored in
            float64 from the source keys.
        max_gather_bytes (`int`, *optional*, defaults to 256 MiB): Bound on the keys gathered at once (queries are
            processed in chunks under it; for ``scan="union"`` the batch is split until its lists fit).
        scan (`str`, *optional*, defaults to `"query"`): `"query"` reads each query's own lists; `"union"` searches
            the batch over the union of its probed lists with the exact fused search (see the module docstring).
        read_in_place (`bool`, *optional*, defaults to `False`): For ``scan="union"`` where the fused kernel runs
            (CUDA, fp16 / bf16 keys): read the probed lists where they are stored instead of gathering their keys
            into one block first, with no host sync (the search can be captured in a CUDA graph:
            ``KNNLogitsProcessor(cuda_graph=True)``). Exact like the gathering path (tested against float64). Off by
            default: on an H100 at 10M keys its kernel was slower than gathering plus the kernel over the block
            (2.1 against 1.8 ms a search), and faster only inside a graph, where the gathering path cannot run.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import IVFSearchConfig
    >>> keys = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    >>> backend = IVFSearchConfig(nlist=10, nprobe=10, device="cpu").build(keys, metric="l2")
    >>> sqdist, ids = backend.search(keys[:2] + 0.01, k=3)
    >>> ids[:, 0].tolist()
    [0, 1]
    ```
    """

    name: ClassVar[str] = "torch-ivf"
    nlist: int | None = None
    nprobe: int = 32
    device: str | int | torch.device | None = None
    dtype: torch.dtype | None = None
    train_size: int | None = None
    iters: int = 10
    seed: int = 0
    rerank: int = 4
    max_gather_bytes: int = 1 << 28
    scan: str = "query"
    read_in_place: bool = False

    def build(self, keys, *, metric: str = "inner_product", state: Any = None) -> IVFBackend:
        return IVFBackend(keys, metric=metric, config=self)


class IVFBackend:
    """Inverted lists over keys on one device (see [`IVFSearchConfig`])."""

    def __init__(self, keys, *, metric: str = "inner_product", config: IVFSearchConfig | None = None):
        self.metric = check_metric(metric)
        self.config = config or IVFSearchConfig()
        self.device, self.dtype = device_and_dtype(self.config.device, self.config.dtype)
        if self.config.nprobe < 1 or self.config.rerank < 0 or self.config.iters < 0:
            raise ValueError(
                f"nprobe must be >= 1, rerank and iters >= 0; got nprobe={self.config.nprobe}, "
                f"rerank={self.config.rerank}, iters={self.config.iters}"
            )
        if self.config.scan not in ("query", "union"):
            raise ValueError(f"scan must be 'query' or 'union', got {self.config.scan!r}")
        self._set_keys(as_tensor(keys))

    # -- building --------------------------------------------------------------------------------------------------

    def _set_keys(self, source: torch.Tensor) -> None:
        n, d = check_key_matrix(source)
        nlist = self.config.nlist or max(1, min(n, round(4 * math.sqrt(n))))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] (the number of keys), got {nlist}")
        train = min(n, self.config.train_size or 64 * nlist)
        if train < nlist:
            raise ValueError(f"train_size {train} is smaller than nlist {nlist}")
        rng = np.random.default_rng(self.config.seed)
        rows = np.sort(rng.choice(n, size=train, replace=False)) if train < n else np.arange(n)
        sample = source[torch.from_numpy(rows)].to(self.device, torch.float32)
        if not bool(torch.isfinite(sample).all()):
            raise ValueError("keys contain NaN or inf")
        init = "k-means++" if nlist <= 256 else "random"  # k-means++ seeding is sequential over the clusters
        centroids, _ = kmeans(sample, nlist, iters=self.config.iters, seed=self.config.seed, init=init)
        self.centroids = centroids.float()
        self.centroid_bias = -0.5 * self.centroids.pow(2).sum(-1) if self.metric == "l2" else None

        assign = torch.empty(n, dtype=torch.long, device=self.device)
        # Rows per chunk: the chunk's scores against every centroid stay under ~1 GiB on CUDA (64 MiB on the CPU).
        # Finiteness is gathered on the device and read once at the end: no host sync per chunk.
        budget = (1 << 28) if self.device.type == "cuda" else (1 << 24)
        step = max(1, budget // max(d, nlist))
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for start in range(0, n, step):
            chunk = source[start : start + step].to(self.device, torch.float32)
            finite &= torch.isfinite(chunk).all()
            # nearest centroid in L2: argmax of c . x - ||c||^2 / 2
            scores = torch.addmm(-0.5 * self.centroids.pow(2).sum(-1), chunk, self.centroids.T)
            assign[start : start + len(chunk)] = scores.argmax(1)
        if not bool(finite):
            bad = int(torch.nonzero(~torch.isfinite(source).all(1))[0, 0])
            raise ValueError(f"keys contain NaN or inf (row {bad})")
        order = torch.argsort(assign, stable=True)
        sizes = torch.bincount(assign, minlength=nlist)
        self.list_sizes = sizes
        self._largest_rows = np.cumsum(np.sort(sizes.cpu().numpy())[::-1])  # rows of the i + 1 largest lists
        self.list_offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        self.ids = order  # the key id at each stored position
        self.keys = torch.empty(n, d, dtype=self.dtype, device=self.device)
        self.key_bias = torch.empty(n, dtype=torch.float32, device=self.device) if self.metric == "l2" else None
        step = max(1, budget // d)
        for start in range(0, n, step):
            part = order[start : start + step]
            chunk = source[part.to(source.device)].to(self.device)
            stored = chunk.to(self.dtype)
            finite &= torch.isfinite(stored).all()
            self.keys[start : start + len(part)] = stored
            if self.key_bias is not None:
                self.key_bias[start : start + len(part)] = -0.5 * chunk.float().pow(2).sum(-1)
        if not bool(finite):
            raise ValueError(f"keys exceed the range of {self.dtype}; use dtype=torch.float32")
        # re-ranking reads the source keys: from the device copy when storing them lost nothing, else from the source
        self._source, self._stored_exactly = source, _lossless(source.dtype, self.dtype)
        self._position = torch.empty_like(order)
        self._position[order] = torch.arange(n, device=self.device)

    # -- the protocol ----------------------------------------------------------------------------------------------

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def nprobe(self) -> int:
        return min(self.config.nprobe, self.nlist)

    @property
    def nbytes(self) -> int:
        extra = self.key_bias.nbytes if self.key_bias is not None else 0
        return self.keys.nbytes + extra + self.ids.nbytes + self._position.nbytes + self.centroids.nbytes

    def source_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The source keys of ``ids`` (exact values)."""
        if self._stored_exactly:
            return self.keys[self._position[ids.to(self.device)]]
        return self._source[ids.to(self._source.device)]

    def probe(self, queries: torch.Tensor) -> torch.Tensor:
        """The ``nprobe`` lists each query reads, best first: `(num_queries, nprobe)` list numbers."""
        q = queries.to(self.device, torch.float32)
        scores = q @ self.centroids.T
        if self.centroid_bias is not None:
            scores = scores + self.centroid_bias
        return scores.topk(self.nprobe, dim=1).indices

    def _padding(self, num_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Results with nothing found yet: the worst score (distance) and id -1 in every slot."""
        worst = float("-inf") if self.metric == "inner_product" else float("inf")
        scores = torch.full((num_queries, k), worst, dtype=torch.float32, device=self.device)
        return scores, torch.full((num_queries, k), -1, dtype=torch.int64, device=self.device)

    def _rerank_count(self, k: int) -> int:
        return k if self.config.rerank == 0 else max(self.config.rerank * k, k + 16)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_search_args(queries, k, self.num_keys, self.dim)
        q = queries.to(self.device, torch.float32)
        lists = self.probe(q)
        if self.config.scan == "union":
            return self._search_union(q, lists, k)
        starts, lengths = self.list_offsets[lists], self.list_sizes[lists]  # (b, nprobe)
        totals = lengths.sum(1)
        rerank = self._rerank_count(k)
        out_scores, out_ids = self._padding(q.shape[0], k)
        widest = max(1, int(totals.max()))
        per_chunk = max(1, self.config.max_gather_bytes // (widest * self.dim * self.keys.element_size()))
        for lo in range(0, q.shape[0], per_chunk):
            hi = min(lo + per_chunk, q.shape[0])
            scores, ids = self._search_rows(q[lo:hi], starts[lo:hi], lengths[lo:hi], totals[lo:hi], k, rerank)
            out_scores[lo:hi, : scores.shape[1]] = scores
            out_ids[lo:hi, : ids.shape[1]] = ids
        return out_scores, out_ids

    def _search_rows(self, q, starts, lengths, totals, k, rerank):
        width = max(1, int(totals.max()))
        position = torch.arange(width, device=self.device).expand(q.shape[0], width)
        ends = lengths.cumsum(1)  # where each probed list ends in a query's concatenated candidates
        which = torch.searchsorted(ends, position.contiguous(), right=True).clamp_max(lengths.shape[1] - 1)
        valid = position < totals[:, None]
        stored = starts.gather(1, which) + position - (ends - lengths).gather(1, which)
        stored = torch.where(valid, stored, torch.zeros_like(stored))
        fast = torch.einsum("bcd,bd->bc", self.keys[stored].float(), q)  # fp32 accumulation
        if self.key_bias is not None:
            fast = fast + self.key_bias[stored]
        fast = fast.masked_fill(~valid, float("-inf"))
        take = min(rerank, width)
        best, where = fast.topk(take, dim=1)
        found = best > float("-inf")
        ids = self.ids[stored.gather(1, where)]
        exact = exact_scores(q, ids, self.source_rows, self.metric)
        worst = float("-inf") if self.metric == "inner_product" else float("inf")
        exact = exact.masked_fill(~found, worst)
        ids = ids.masked_fill(~found, -1)
        # sort best first (ties by id), then put the padding (id -1) last
        exact, ids = sort_best_first(exact, torch.where(found, ids, torch.full_like(ids, self.num_keys)), self.metric)
        ids = ids.masked_fill(ids == self.num_keys, -1)
        return exact[:, :k].float(), ids[:, :k]

    def _search_union(self, q: torch.Tensor, lists: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch ``q`` over the keys of the union of its probed ``lists`` (see ``scan="union"``)."""
        if self.config.read_in_place and _triton_eligible(q, self.keys, self._rerank_count(k)):
            try:
                return self._search_union_in_place(q, lists, k)
            except Exception as err:  # never let the fast path break a search that torch can do
                _disable_triton(err)
        union = torch.unique(lists)  # sorted list numbers
        sizes = self.list_sizes[union]
        total = int(sizes.sum())
        take = min(self._rerank_count(k), total)
        too_big = total * self.dim * self.keys.element_size() > self.config.max_gather_bytes
        if too_big and q.shape[0] > 1:
            half = q.shape[0] // 2
            top = self._search_union(q[:half], lists[:half], k)
            bottom = self._search_union(q[half:], lists[half:], k)
            return torch.cat([top[0], bottom[0]]), torch.cat([top[1], bottom[1]])
        out_scores, out_ids = self._padding(q.shape[0], k)
        if total == 0:
            return out_scores, out_ids
        positions = _range_rows(self.list_offsets[union], sizes, total)  # the stored rows of the probed lists
        bias = self.key_bias[positions] if self.key_bias is not None else None
        _, local = exact_topk(q.to(self.keys.dtype), self.keys[positions], take, key_bias=bias)
        ids = self.ids[positions[local]]
        exact, ids = sort_best_first(exact_scores(q, ids, self.source_rows, self.metric), ids, self.metric)
        found = min(k, total)
        out_scores[:, :found] = exact[:, :found].float()
        out_ids[:, :found] = ids[:, :found]
        return out_scores, out_ids

    def _union_bound(self, num_probes: int) -> int:
        """The most rows that ``num_probes`` probed lists can hold (those of the largest lists): sizes the in-place scan
        without reading the union's size back from the device."""
        return int(self._largest_rows[min(num_probes, self.nlist) - 1])

    def _search_union_in_place(self, q: torch.Tensor, lists: torch.Tensor, k: int):
        """``scan="union"`` with the fused kernel reading the probed lists where they are stored, and no host sync: the
        probed list numbers are sorted and each repeat becomes an empty range (no ``unique``), and the kernel's bucket
        slots are sized by [`_union_bound`] (no ``sum`` read back); slots past the union's rows score ``-inf``. The GPU
        search then runs while the host goes on queueing work (e.g. the rest of a decoding step)."""
        flat = lists.reshape(-1).sort().values
        first = torch.ones_like(flat, dtype=torch.bool)
        first[1:] = flat[1:] != flat[:-1]
        ranges = (self.list_offsets[flat], torch.where(first, self.list_sizes[flat], 0))
        bound = self._union_bound(flat.numel())
        take = min(self._rerank_count(k), bound)
        fast, positions = _triton_topk(
            q.to(self.keys.dtype), self.keys, take, self.key_bias, ranges=ranges, num_keys=bound
        )
        found = fast > float("-inf")  # fewer rows in the union than `take`: the rest are empty slots
        ids = self.ids[torch.where(found, positions, 0)]
        worst = float("-inf") if self.metric == "inner_product" else float("inf")
        exact = exact_scores(q, ids, self.source_rows, self.metric).masked_fill(~found, worst)
        # best first (ties by id), the empty slots last (sentinel id num_keys, then -1)
        exact, ids = sort_best_first(exact, torch.where(found, ids, self.num_keys), self.metric)
        ids = ids.masked_fill(ids == self.num_keys, -1)
        out_scores, out_ids = self._padding(q.shape[0], k)
        found_k = min(k, take)
        out_scores[:, :found_k] = exact[:, :found_k].float()
        out_ids[:, :found_k] = ids[:, :found_k]
        return out_scores, out_ids

    def add(self, keys) -> None:
        """Appends keys; the lists are trained again on all of them (seeded: the same keys give the same lists)."""
        current = self._source
        new = as_tensor(keys).to(current.device, current.dtype)
        self._set_keys(torch.cat([current, new]))

    def replace(self, keys) -> None:
        self._set_keys(as_tensor(keys))

    def save(self, path: str) -> bool:
        return False  # rebuilt from the keys and the config (seeded)

    def __repr__(self) -> str:
        return (
            f"IVFBackend(num_keys={self.num_keys}, dim={self.dim}, metric={self.metric!r}, nlist={self.nlist}, "
            f"nprobe={self.nprobe}, scan={self.config.scan!r}, device={self.device}, dtype={self.dtype})"
        )


def ivf_recall(backend, exact_backend, queries: torch.Tensor, k: int, batch_size: int | None = None) -> float:
    """Recall@k of ``backend`` against ``exact_backend`` on ``queries``: the share of each query's exact top ``k`` ids
    that ``backend`` returns, averaged over the queries.

    ``batch_size`` searches the queries that many at a time (default: all at once). It matters for ``scan="union"``,
    where a query reads the lists of its whole batch: measure with the batch a decoding step sends (e.g. 128 =
    batch 32 x beam 4).

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import IVFSearchConfig, TorchSearchConfig, ivf_recall
    >>> keys = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    >>> queries = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    >>> exact = TorchSearchConfig(device="cpu").build(keys, metric="l2")
    >>> ivf_recall(IVFSearchConfig(nlist=20, nprobe=20, device="cpu").build(keys, metric="l2"), exact, queries, 10)
    1.0
    ```
    """
    step = batch_size or max(1, len(queries))
    got = torch.cat([backend.search(queries[i : i + step], k)[1].cpu() for i in range(0, len(queries), step)])
    want = exact_backend.search(queries, k)[1].cpu()
    hits = [len(set(g.tolist()) & set(w.tolist())) for g, w in zip(got, want, strict=True)]
    return float(sum(hits) / (k * len(hits)))


def self_recall(
    backend: IVFBackend, k: int = 16, num_queries: int = 256, batch_size: int = 128, seed: int = 0
) -> float:
    """Recall@k of ``backend`` against an exact search of the same keys, with ``num_queries`` of its own keys (a seeded
    sample) as the queries, each query's own entry left out of both answers.

    For a kNN datastore, whose keys are the model states that decoding searches with, this estimates the recall of
    real queries without any: use [`ivf_recall`] where real queries are at hand. The exact answer is the fused search
    over the backend's stored keys (no second copy of the keys); queries go ``batch_size`` at a time (for
    ``scan="union"``, the batch a decoding step sends).

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import IVFSearchConfig
    >>> from hf_realm.search.ivf import self_recall
    >>> keys = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    >>> self_recall(IVFSearchConfig(nlist=20, nprobe=20, device="cpu").build(keys, metric="l2"), k=5)
    1.0
    ```
    """
    n = backend.num_keys
    if n < 2:
        raise ValueError(f"self_recall needs at least 2 keys, got {n}")
    k = min(k, n - 1)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(num_queries, n), replace=False))
    own = torch.from_numpy(rows).to(backend.device)
    queries = backend.source_rows(own).to(backend.device, torch.float32)
    got = torch.cat([backend.search(queries[i : i + batch_size], k + 1)[1] for i in range(0, len(rows), batch_size)])
    _, positions = exact_topk(queries.to(backend.keys.dtype), backend.keys, k + 1, key_bias=backend.key_bias)
    want = backend.ids[positions]
    hits = 0
    for g, w, i in zip(got.tolist(), want.tolist(), own.tolist(), strict=True):
        w = [x for x in w if x != i][:k]
        hits += len({x for x in g if x != i and x >= 0} & set(w))
    return hits / (k * len(rows))


def tune_nprobe(
    backend: IVFBackend, target: float = 0.95, k: int = 16, max_nprobe: int = 128, **recall_kwargs
) -> dict[str, Any]:
    """Doubles ``backend``'s ``nprobe`` (from its config's) until [`self_recall`] reaches ``target`` or ``nprobe``
    reaches ``max_nprobe`` (or ``nlist``); sets it on the backend's config and returns what was measured:
    ``{"nprobe", "recall", "k", "target", "tried": [(nprobe, recall), ...]}``. The lists are not rebuilt."""
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    tried = []
    while True:
        recall = self_recall(backend, k=k, **recall_kwargs)
        tried.append((backend.nprobe, recall))
        if recall >= target or backend.nprobe >= min(max_nprobe, backend.nlist):
            break
        backend.config = dataclasses.replace(backend.config, nprobe=min(2 * backend.nprobe, max_nprobe, backend.nlist))
    return {"nprobe": backend.nprobe, "recall": recall, "k": k, "target": target, "tried": tried}
