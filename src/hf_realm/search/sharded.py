"""Search over keys split across processes: shard ranges and a distributed top-k merge."""

from __future__ import annotations

import torch

from .exact import exact_topk


def shard_range(num_items: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """The contiguous block-id range ``[start, end)`` that process ``process_index`` of ``num_processes`` embeds (sizes
    differ by at most one, larger shards first, as `numpy.array_split`)."""
    base, extra = divmod(num_items, num_processes)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def _process_state(accelerator):
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_shards(local: torch.Tensor, num_blocks: int, world: int) -> torch.Tensor:
    from accelerate.utils import gather

    sizes = [shard_range(num_blocks, r, world) for r in range(world)]
    width = max(e - s for s, e in sizes)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    everything = gather(padded)
    return torch.cat([everything[r * width : r * width + (e - s)] for r, (s, e) in enumerate(sizes)])


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
    rank, world = _process_state(accelerator)
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
