"""Search over keys split across processes: shard ranges and a distributed top-k merge."""

from __future__ import annotations

import torch

from .exact import exact_topk


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
