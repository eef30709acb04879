"""Search over keys split across processes: shard ranges and a distributed top-k merge."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .base import BackendConfig, as_tensor, check_metric, check_search_args, register_backend
from .exact import exact_topk
from .rescore import sort_best_first


def shard_range(num_items: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """The contiguous range ``[start, end)`` of ``num_items`` that process ``process_index`` of ``num_processes`` owns:
    the split of accelerate's `PartialState.split_between_processes` (sizes differ by at most one, larger shards
    first). The one shard formula of the package: the index refresh, the sharded search and the kNN datastore build
    all use it."""
    base, extra = divmod(num_items, num_processes)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def process_layout(accelerator=None) -> tuple[int, int]:
    """``(process_index, num_processes)`` of ``accelerator`` (an `Accelerator`, a `PartialState` or anything with those
    two attributes); without one, accelerate's `PartialState` when `torch.distributed` is initialised, else one
    process. A `PartialState` is never created when no process group exists: it would start one."""
    if accelerator is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0, 1
        from accelerate import PartialState

        accelerator = PartialState()
    return accelerator.process_index, accelerator.num_processes


def gather_shards(local: torch.Tensor, num_items: int, num_processes: int) -> torch.Tensor:
    """All processes' [`shard_range`] shards of a `(num_items, ...)` matrix, concatenated in process order, on every
    process (a collective call: every process must make it)."""
    from accelerate.utils import gather, pad_across_processes

    width = max(e - s for s, e in (shard_range(num_items, r, num_processes) for r in range(num_processes)))
    everything = gather(pad_across_processes(local.contiguous(), dim=0))  # shards differ in size by at most one row
    parts = [
        everything[r * width : r * width + e - s]
        for r, (s, e) in enumerate(shard_range(num_items, r, num_processes) for r in range(num_processes))
    ]
    return torch.cat(parts)


def sharded_search(
    query_embeddings: torch.Tensor,
    local_keys: torch.Tensor,
    k: int,
    *,
    shard_start: int,
    accelerator=None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` over a key matrix split across processes, with a distributed top-k merge.

    Each process holds the rows ``[shard_start, shard_start + len(local_keys))`` (e.g. its [`embed_corpus`] shard with
    ``gather=False`` and [`shard_range`]) and the same queries; it searches its shard with
    [`~hf_realm.search.exact_topk`], all processes all-gather their ``(scores, global ids)`` and merge them with one
    ``topk``. Every process returns the same result, equal to an exact search over the whole matrix (up to ties).

    Args:
        query_embeddings (`torch.Tensor` of shape `(num_queries, dim)`): The same on every process.
        local_keys (`torch.Tensor` of shape `(shard_size, dim)`): This process' rows.
        k (`int`): Results per query, at most the total number of rows.
        shard_start (`int`): Global id of ``local_keys[0]``.
        accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): Process layout (default: the
            initialised `torch.distributed` group, or a single process).
        key_bias (`torch.Tensor` of shape `(shard_size,)`, *optional*): As in `exact_topk`.

    Returns:
        `(scores, ids)`: float32 and int64, `(num_queries, k)`, on the queries' device.
    """
    rank, world = process_layout(accelerator)
    q = query_embeddings.to(local_keys.device)
    num_local = local_keys.shape[0]
    local_k = min(k, num_local)
    scores = torch.full((q.shape[0], k), float("-inf"), dtype=torch.float32, device=q.device)
    ids = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    if local_k > 0:
        s, i = exact_topk(q, local_keys, local_k, key_bias=key_bias)
        scores[:, :local_k], ids[:, :local_k] = s, i + shard_start
    if world > 1:
        from accelerate.utils import gather

        scores = gather(scores).view(world, q.shape[0], k).permute(1, 0, 2).reshape(q.shape[0], world * k)
        ids = gather(ids).view(world, q.shape[0], k).permute(1, 0, 2).reshape(q.shape[0], world * k)
        scores, order = scores.topk(k, dim=1)
        ids = ids.gather(1, order)
    if bool((ids < 0).any()):
        raise ValueError(f"k={k} is larger than the total number of keys across processes")
    return scores.to(query_embeddings.device), ids.to(query_embeddings.device)


def merge_best(scores: torch.Tensor, ids: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each row of candidates from several shards: best first (descending inner products, ascending
    distances), ties by the smaller id; ids ``-1`` (nothing found) last."""
    missing_id = torch.iinfo(ids.dtype).max
    scores, ids = sort_best_first(scores, torch.where(ids < 0, ids.new_full((), missing_id), ids), metric)
    scores, ids = scores[:, :k], ids[:, :k]
    return scores, torch.where(ids == missing_id, ids.new_full((), -1), ids)


@register_backend
@dataclasses.dataclass
class ShardedSearchConfig(BackendConfig):
    r"""A key set split across the processes of a run ([`ShardedBackend`]): each process keeps only its
    [`shard_range`] rows in an ``inner`` backend, searches them, and one all-gather merges the processes' top ``k``.

    Every process must call ``search`` with the same queries the same number of times (a collective call): e.g. the
    same `generate()` on every process of an `accelerate launch`, each holding half of a kNN datastore's keys. With
    an exact ``inner`` backend the result is, on every process, the ids of an exact search over all the keys (ties
    within float32 rounding of the scores are broken by the smaller id).

    Args:
        inner (`BackendConfig`, `dict` or `str`, *optional*): The backend each process searches its shard with (a
            config, its `to_dict`, or a name; default: exact torch search, [`TorchSearchConfig`]).
        process_index (`int`, *optional*) and num_processes (`int`, *optional*): The layout (default: the initialised
            `torch.distributed` group through accelerate, or one process).

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import ShardedSearchConfig
    >>> backend = ShardedSearchConfig(inner="torch").build(torch.eye(4), metric="l2")  # one process: every key
    >>> backend.search(torch.tensor([[0.0, 0.0, 0.9, 0.0]]), k=2)[1].tolist()
    [[2, 0]]
    ```
    """

    name: ClassVar[str] = "sharded"
    inner: Any = None
    process_index: int | None = None
    num_processes: int | None = None

    def build(self, keys, *, metric: str = "inner_product", state: Any = None) -> ShardedBackend:
        return ShardedBackend(keys, metric=metric, config=self)

    def inner_config(self) -> BackendConfig:
        from .backends import backend_config

        return backend_config(self.inner if self.inner is not None else "torch")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner_config().to_dict(),
            "process_index": self.process_index,
            "num_processes": self.num_processes,
        }


class ShardedBackend:
    """This process's shard of a key set, searched with a distributed top-k merge (see [`ShardedSearchConfig`])."""

    def __init__(self, keys, *, metric: str = "inner_product", config: ShardedSearchConfig | None = None):
        self.metric = check_metric(metric)
        self.config = config or ShardedSearchConfig()
        if (self.config.process_index is None) != (self.config.num_processes is None):
            raise ValueError("give both process_index and num_processes, or neither")
        if self.config.process_index is None:
            self.rank, self.world = process_layout()
        else:
            self.rank, self.world = self.config.process_index, self.config.num_processes
        if not 0 <= self.rank < self.world:
            raise ValueError(f"process_index must be in [0, {self.world}), got {self.rank}")
        self._set_keys(as_tensor(keys))

    def _set_keys(self, source: torch.Tensor) -> None:
        if source.dim() != 2:
            raise ValueError(f"keys must be a 2-d array, got shape {tuple(source.shape)}")
        total = source.shape[0]
        self.shard_start, self.shard_end = shard_range(total, self.rank, self.world)
        if self.shard_end <= self.shard_start:
            raise ValueError(
                f"{total} keys cannot be split over {self.world} processes: process {self.rank} gets none"
            )
        self._source, self.total_keys = source, total
        self.inner = self.config.inner_config().build(source[self.shard_start : self.shard_end], metric=self.metric)

    @property
    def num_keys(self) -> int:
        return self.total_keys

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes  # this process's share

    @property
    def nprobe(self):  # an approximate inner backend's probes (the datastore names them when results run short)
        return getattr(self.inner, "nprobe", None)

    def search_local(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part before the merge: the top ``k`` of its shard, with global ids (padded with id ``-1``
        when the shard holds fewer than ``k`` keys)."""
        check_search_args(queries, k, self.num_keys, self.dim)
        local_k = min(k, self.inner.num_keys)
        scores, ids = self.inner.search(queries, local_k)
        if local_k < k:
            pad = (scores.shape[0], k - local_k)
            scores = torch.cat([scores, scores.new_full(pad, self._worst)], 1)
            ids = torch.cat([ids, ids.new_full(pad, -1)], 1)
        return scores, torch.where(ids >= 0, ids + self.shard_start, ids)

    @property
    def _worst(self) -> float:
        return float("-inf") if self.metric == "inner_product" else float("inf")

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``k`` over every process's keys (a collective call when there are several processes)."""
        scores, ids = self.search_local(queries, k)
        if self.world > 1:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise RuntimeError(
                    f"this backend holds shard {self.rank} of {self.world}, but no torch.distributed process group "
                    "is running to merge the shards (launch with accelerate / torchrun)"
                )
            from accelerate.utils import gather

            num_queries = scores.shape[0]
            scores = gather(scores.contiguous()).view(self.world, num_queries, k).permute(1, 0, 2)
            ids = gather(ids.contiguous()).view(self.world, num_queries, k).permute(1, 0, 2)
            scores, ids = merge_best(scores.reshape(num_queries, -1), ids.reshape(num_queries, -1), k, self.metric)
        return scores.to(queries.device), ids.to(queries.device)

    def add(self, keys) -> None:
        new = as_tensor(keys).to(self._source.device, self._source.dtype)
        self._set_keys(torch.cat([self._source, new]))

    def replace(self, keys) -> None:
        self._set_keys(as_tensor(keys))

    def save(self, path: str) -> bool:
        return False

    def __repr__(self) -> str:
        return (
            f"ShardedBackend(process {self.rank} of {self.world}, rows {self.shard_start}..{self.shard_end - 1} of "
            f"{self.total_keys}, inner={self.inner!r})"
        )
