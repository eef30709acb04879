"""Exact dense top-k search in torch: the one search kernel behind the REALM corpus index and the kNN datastore.

Maximum inner product search (REALM) and L2 nearest neighbours (kNN-MT) are the same problem: with
``key_bias = -||k||^2 / 2`` the top inner-product scores are the nearest keys in L2, and
``||q - k||^2 = ||q||^2 - 2 * score``.

Two implementations sit behind [`exact_topk`]:

- **torch** (any device, any ``k``): keys are scored a chunk at a time (``queries @ chunk.T``) and the per-chunk top-k
  are merged. On CUDA the naive form spends almost all of its time writing the ``num_queries x num_keys`` score matrix
  and running ``topk`` over it.
- **triton** (CUDA, fp16 / bf16 / fp32 keys, ``k <= TRITON_MAX_K``): a fused kernel that never writes the score
  matrix. Keys are cut into buckets of ``BLOCK_N`` consecutive rows. Pass 1 (``tl.dot`` tiles) writes only the best
  score of every (query, bucket) pair; a ``topk`` over those bucket maxima picks ``k`` buckets per query; pass 2
  rescores the keys of those buckets and a last ``topk`` over ``k * BLOCK_N`` candidates gives the result.

  This is exact: if a key ``x`` of the true top-k lay in a bucket outside the ``k`` best buckets, each of those ``k``
  buckets would hold a key (its maximum) scoring at least ``score(x)``: ``k`` distinct keys at or above ``x``, so
  ``x`` would not be in the top-k (up to ties). Scores are fp32 sums of exact fp16/bf16 products, as cuBLAS computes
  them; keys whose scores differ by less than the fp32 accumulation-order rounding (~1e-6 relative) can swap places.

`exact_topk` ranks by the scores of the keys *as stored*. The search backends built on it
([`~hf_realm.search.TorchSearchConfig`], [`~hf_realm.search.PQSearchConfig`]) add the package's definition of exact on
top (the ids and order of a float64 search over the source keys, e.g. fp32 embeddings stored in fp16 on the GPU): see
`hf_realm.search.rescore`.
"""

from __future__ import annotations

import functools
import os
import time
import warnings

import torch


TRITON_MAX_K = 128
"""Largest ``k`` sent to the Triton kernel; larger ``k`` (e.g. ORQA's top-5000) uses the chunked torch path."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def exact_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    key_bias: torch.Tensor | None = None,
    chunk_size: int = 1 << 20,
    backend: str = "auto",
    row_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``queries @ keys.T + key_bias`` per query, exactly.

    Args:
        queries (`torch.Tensor` of shape `(num_queries, dim)`):
            Query vectors, on the same device as ``keys``.
        keys (`torch.Tensor` of shape `(num_keys, dim)`):
            Key vectors (fp32, fp16 or bf16).
        k (`int`):
            Number of results per query, ``1 <= k <= num_keys``.
        key_bias (`torch.Tensor` of shape `(num_keys,)`, *optional*):
            Added to every score of that key (e.g. ``-||k||^2 / 2`` to turn MIPS into L2 search).
        chunk_size (`int`, *optional*, defaults to 1M):
            Keys scored at once by the torch path; bounds its temporary score matrix to ``num_queries x chunk_size``.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` uses the fused Triton kernel for fp16 / bf16 CUDA keys when Triton is installed and
            ``k <= TRITON_MAX_K``, else the chunked torch path (fp32 keys included: the kernel's exact fp32 `tl.dot`
            is far slower to tune and to run than cuBLAS). `"torch"` forces the torch path; `"triton"` forces the kernel (on CPU
            tensors it runs in Triton's interpreter: slow, for tests only).
        row_ranges (`tuple(torch.Tensor, torch.Tensor)`, *optional*):
            ``(starts, lengths)``, int64 on the keys' device: search only the rows ``starts[i] <= row < starts[i] +
            lengths[i]`` of ``keys`` (ranges apart from one another; e.g. the inverted lists an IVF search probes).
            The Triton kernel reads them in place; the torch path gathers them first. Ids are still rows of ``keys``,
            and ``k`` is bounded by the rows in the ranges.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: scores (float32) and key ids (int64), each `(num_queries, k)`, sorted by
        descending score.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.search import exact_topk
    >>> keys = torch.eye(4)
    >>> scores, ids = exact_topk(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), keys, k=2)
    >>> ids.tolist()
    [[1, 2]]
    >>> scores, ids = exact_topk(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), keys, k=1, row_ranges=(torch.tensor([2]), torch.tensor([2])))
    >>> ids.tolist()  # rows 2 and 3 only
    [[2]]
    ```
    """
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"expected 2-d queries and keys, got shapes {tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != key dim {keys.shape[1]}")
    num_keys = keys.shape[0]
    if row_ranges is not None:
        num_keys = _check_row_ranges(row_ranges, keys)
    if not 1 <= k <= num_keys:
        what = "the number of keys" if row_ranges is None else "the number of rows in row_ranges"
        raise ValueError(f"k must be in [1, {num_keys}] ({what}), got {k}")
    if key_bias is not None and key_bias.shape != (keys.shape[0],):
        raise ValueError(f"key_bias must have shape ({keys.shape[0]},), got {tuple(key_bias.shape)}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")

    if backend == "auto":
        return _auto_topk(queries, keys, k, key_bias, chunk_size, row_ranges, num_keys)
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the `triton` package: `pip install triton`")
        if k > TRITON_MAX_K:
            raise ValueError(f"backend='triton' supports k <= {TRITON_MAX_K}, got {k}; use backend='torch'")
        if keys.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports fp16, bf16 and fp32 keys, got {keys.dtype}")
        return _triton_topk(queries, keys, k, key_bias, ranges=row_ranges, num_keys=num_keys)
    return _torch_topk_ranges(queries, keys, k, key_bias, chunk_size, row_ranges, num_keys)


def _auto_topk(queries, keys, k, key_bias, chunk_size, ranges, num_rows: int):
    """`exact_topk`'s ``backend="auto"`` on checked arguments (``num_rows``: the rows searched)."""
    if _triton_eligible(queries, keys, k):
        try:
            return _triton_topk(queries, keys, k, key_bias, ranges=ranges, num_keys=num_rows)
        except Exception as err:  # never let the fast path break a search that torch can do
            _disable_triton(err)
    return _torch_topk_ranges(queries, keys, k, key_bias, chunk_size, ranges, num_rows)


def _check_row_ranges(row_ranges, keys: torch.Tensor) -> int:
    """Validates ``(starts, lengths)`` against ``keys``; returns the number of rows they cover."""
    starts, lengths = row_ranges
    if starts.shape != lengths.shape or starts.dim() != 1:
        raise ValueError(
            f"row_ranges: starts {tuple(starts.shape)} and lengths {tuple(lengths.shape)}, expected two 1-d"
        )
    if starts.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise TypeError(f"row_ranges must be int64, got {starts.dtype} and {lengths.dtype}")
    if starts.device != keys.device or lengths.device != keys.device:
        raise ValueError(f"row_ranges on {starts.device} / {lengths.device}, keys on {keys.device}")
    bad = ((lengths < 0) | (starts < 0) | (starts + lengths > keys.shape[0])).any()
    bad, total = torch.stack([bad.long(), lengths.sum()]).tolist()  # one sync for both
    if bad:
        raise ValueError(f"row_ranges reach outside the {keys.shape[0]} rows of keys (or have a negative length)")
    return total


def _range_rows(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """The rows ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, concatenated: `(total,)`."""
    first = torch.repeat_interleave(starts, lengths, output_size=total)
    before = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths, output_size=total)
    return first + torch.arange(total, device=starts.device) - before


def _torch_topk_ranges(queries, keys, k, key_bias, chunk_size, ranges, num_rows: int):
    if ranges is None:
        return _torch_topk(queries, keys, k, key_bias, chunk_size)
    rows = _range_rows(*ranges, num_rows)
    bias = key_bias[rows] if key_bias is not None else None
    scores, local = _torch_topk(queries, keys[rows], k, bias, chunk_size)
    return scores, rows[local]


_MM_OUT_DTYPE_OK = True


def _scores_fp32(queries: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """``queries @ chunk.T`` with fp32 scores: fp16/bf16 inputs are multiplied exactly and summed in fp32, never rounded
    back to 16 bits (which would create ties in a 13M-key search). On CUDA the matmul writes fp32 directly where torch
    supports it (``torch.mm(..., out_dtype=torch.float32)``), else both sides are upcast."""
    global _MM_OUT_DTYPE_OK
    if chunk.dtype not in (torch.float16, torch.bfloat16):
        return (queries @ chunk.T).float()
    if chunk.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            return torch.mm(queries, chunk.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False
    return queries.float() @ chunk.float().T


def _torch_topk(queries, keys, k, key_bias, chunk_size):
    queries = queries.to(keys.dtype)
    num_keys = keys.shape[0]
    best_scores, best_ids = None, None
    for start in range(0, num_keys, chunk_size):
        chunk = keys[start : start + chunk_size]
        scores = _scores_fp32(queries, chunk)
        if key_bias is not None:
            scores += key_bias[start : start + chunk_size].float()
        top_scores, top_ids = scores.topk(min(k, chunk.shape[0]), dim=1)
        top_ids += start
        if best_scores is None:
            best_scores, best_ids = top_scores, top_ids
        else:
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            merged_ids = torch.cat([best_ids, top_ids], dim=1)
            best_scores, order = merged_scores.topk(k, dim=1)
            best_ids = merged_ids.gather(1, order)
    return best_scores, best_ids


# ------------------------------------------------------------------------------------------------------------------
# Triton: fused bucket-max kernel + rescoring of the selected buckets
# ------------------------------------------------------------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


_TRITON_BROKEN: str | None = None


def _disable_triton(err: Exception) -> None:
    global _TRITON_BROKEN
    _TRITON_BROKEN = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"the Triton top-k kernel failed ({_TRITON_BROKEN[:300]}); exact_topk falls back to the chunked torch path for "
        "the rest of this process",
        RuntimeWarning,
        stacklevel=3,
    )


def _triton_eligible(queries: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    if os.environ.get("HF_REALM_DISABLE_TRITON", "0") == "1" or _TRITON_BROKEN is not None:
        return False
    return (
        keys.is_cuda
        and k <= TRITON_MAX_K
        and keys.dtype in (torch.float16, torch.bfloat16)
        and keys.shape[1] <= 4096
        and triton_available()
    )


def _triton_kernel(name: str, interpret: bool):
    from ._triton import kernel

    return kernel(name, interpret)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _smem_bytes(block_q: int, block_n: int, block_d: int, num_stages: int, resident: bool, element_size: int) -> int:
    """A first estimate of the shared memory of a bucket-max launch: the pipelined key (and, unless resident, query)
    tiles. The compiler adds scratch on top (on an H100 the chunked-dimension 128 x 128 x 128, 3-stage config of the
    10M x 512 search asked for 256 KiB): configs it rejects are skipped by the tuner, so the chunked case also offers
    64-wide dimension chunks and 2-stage pipelines."""
    query = block_q * block_d * (1 if resident else num_stages)
    return (query + num_stages * block_n * block_d) * element_size


_SMEM_LIMIT = 227 * 1024


def _default_config(num_queries: int, dim: int, k: int, element_size: int) -> dict:
    """A reasonable launch config without tuning (also the one the interpreter uses)."""
    block_q = min(128, max(16, _next_pow2(num_queries)))
    # Small batches stream keys (memory bound): wide buckets keep the bucket-max matrix small. Large batches are
    # compute bound: 128-key buckets keep pass 2 (k * BLOCK_N keys per query) cheap.
    block_n = 128 if num_queries > 64 or k > 16 else 256
    d_pow2 = max(16, _next_pow2(dim))  # tl.dot needs K >= 16
    resident = d_pow2 * element_size <= 512
    block_d = d_pow2 if resident else 64
    return {"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d, "TILES": 32, "num_warps": 8, "num_stages": 3}


def _candidate_configs(num_queries: int, dim: int, k: int, element_size: int) -> list[dict]:
    """Launch configs tried by the on-device tuner (a few dozen), filtered by shared-memory and register budgets
    (H100: 227 KiB shared memory per block, 64K registers); configs the compiler still rejects are skipped."""
    d_pow2 = max(16, _next_pow2(dim))  # tl.dot needs K >= 16
    bq_max = max(16, _next_pow2(num_queries))
    block_qs = (bq_max,) if bq_max <= 64 else (64, 128, 256)
    block_ns = (128, 256) if num_queries <= 64 and k <= 16 else (64, 128)
    # Keep the whole query block in registers/shared memory when it fits; else loop over the dimension in chunks.
    resident = d_pow2 * element_size <= 512
    block_ds = (d_pow2,) if resident else (64, 128)
    out = []
    for block_q in block_qs:
        if block_q > bq_max:
            continue
        for block_n in block_ns:
            for block_d in block_ds:
                stages = ((4, 3), (8, 3), (8, 4)) if resident else ((4, 2), (4, 3), (8, 2), (8, 3))
                for num_warps, num_stages in stages:
                    smem = _smem_bytes(block_q, block_n, block_d, num_stages, resident, element_size)
                    acc_per_thread = block_q * block_n / (num_warps * 32)
                    if smem > _SMEM_LIMIT or acc_per_thread > 128 or acc_per_thread < 8:
                        continue
                    out.append(
                        {
                            "BLOCK_Q": block_q,
                            "BLOCK_N": block_n,
                            "BLOCK_D": block_d,
                            "TILES": 32,
                            "num_warps": num_warps,
                            "num_stages": num_stages,
                        }
                    )
    return out


_TUNED: dict[tuple, dict] = {}
_TUNE_LOG: list[dict] = []


def _tune_key(queries, keys, k, key_bias, num_keys: int, indirect: bool) -> tuple:
    n_bucket = max(1, num_keys).bit_length() // 2  # within a factor of ~4 in the number of keys
    return (
        keys.device.index,
        _next_pow2(queries.shape[0]),
        keys.shape[1],
        keys.dtype,
        k <= 16,
        key_bias is not None,
        n_bucket,
        indirect,
    )


def _pick_config(queries, keys, k, key_bias, ranges=None, num_keys: int | None = None) -> dict:
    """The launch config for this problem shape: tuned once per shape class on CUDA (set ``HF_REALM_TRITON_AUTOTUNE=0``
    to skip tuning and use the heuristic default). ``num_keys``: the rows searched (those of ``ranges`` if given)."""
    element_size = keys.element_size()
    if not keys.is_cuda or os.environ.get("HF_REALM_TRITON_AUTOTUNE", "1") == "0":
        return _default_config(queries.shape[0], keys.shape[1], k, element_size)
    num_keys = keys.shape[0] if num_keys is None else num_keys
    key = _tune_key(queries, keys, k, key_bias, num_keys, ranges is not None)
    if key in _TUNED:
        return _TUNED[key]
    candidates = _candidate_configs(queries.shape[0], keys.shape[1], k, element_size)
    default = _default_config(queries.shape[0], keys.shape[1], k, element_size)
    if default not in candidates:
        candidates.append(default)
    best, best_ms, tried = default, float("inf"), []
    start = time.perf_counter()
    for cfg in candidates:
        try:
            cut = None if ranges is None else _range_buckets(*ranges, cfg["BLOCK_N"], num_keys)
            _triton_topk_with(queries, keys, k, key_bias, cfg, cut)  # compile + warm up
            torch.cuda.synchronize(keys.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 3
            begin.record()
            for _ in range(reps):
                _triton_topk_with(queries, keys, k, key_bias, cfg, cut)
            end.record()
            end.synchronize()
            ms = begin.elapsed_time(end) / reps
        except Exception as err:  # a config the compiler rejects (e.g. out of shared memory) is skipped
            tried.append({**cfg, "error": str(err).splitlines()[0][:200] if str(err) else type(err).__name__})
            continue
        tried.append({**cfg, "ms": ms})
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best_ms == float("inf"):
        errors = "; ".join(t.get("error", "") for t in tried[:3])
        raise RuntimeError(f"no Triton launch config compiled and ran for this shape ({errors})")
    _TUNED[key] = best
    _TUNE_LOG.append(
        {
            "key": [str(x) for x in key],
            "best": best,
            "best_ms": best_ms,
            "tune_s": time.perf_counter() - start,
            "tried": tried,
        }
    )
    return best


def tuning_log() -> list[dict]:
    """What the Triton tuner tried and chose, per problem shape class (for benchmarks)."""
    return list(_TUNE_LOG)


_MAX_BUCKET_MAX_BYTES = 2 << 30


def _triton_topk(queries, keys, k, key_bias, config: dict | None = None, ranges=None, num_keys: int | None = None):
    """``num_keys``: the rows searched, those of ``ranges`` if given (computed when not passed)."""
    if num_keys is None:
        num_keys = keys.shape[0] if ranges is None else int(ranges[1].sum())
    config = config or _pick_config(queries, keys, k, key_bias, ranges, num_keys)
    # The bucket-max matrix is num_queries x num_buckets fp32: bound it by searching large batches in slices.
    if ranges is None:
        num_buckets = triton_cdiv(num_keys, config["BLOCK_N"])
    else:  # cut once, for every slice
        ranges = _range_buckets(*ranges, config["BLOCK_N"], num_keys)
        num_buckets = len(ranges[0])
    step = max(1, _MAX_BUCKET_MAX_BYTES // (4 * num_buckets))
    if queries.shape[0] <= step:
        return _triton_topk_with(queries, keys, k, key_bias, config, ranges)
    parts = [
        _triton_topk_with(queries[i : i + step], keys, k, key_bias, config, ranges)
        for i in range(0, len(queries), step)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _range_buckets(starts, lengths, block_n: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each range cut into buckets of at most ``block_n`` rows (``num_rows``: the rows of all ranges), in
    ``ceil(num_rows / block_n) + len(ranges)`` bucket slots: at least the buckets there are, counted without a device
    sync. Returns every slot's first row and length (0 for the slots past the last bucket, which then score ``-inf``)
    and ``block_n``."""
    slots = triton_cdiv(num_rows, block_n) + len(starts)
    per_range = (lengths + block_n - 1) // block_n
    ends = per_range.cumsum(0)
    slot = torch.arange(slots, device=starts.device)
    owner = torch.searchsorted(ends, slot, right=True)
    used = owner < len(starts)
    owner = owner.clamp_max(max(len(starts) - 1, 0))
    offset = (slot - (ends - per_range)[owner]) * block_n
    first = torch.where(used, starts[owner] + offset, 0)
    return first, torch.where(used, (lengths[owner] - offset).clamp_max(block_n), 0), block_n


def _triton_topk_with(queries, keys, k, key_bias, config: dict, ranges=None):
    if keys.stride(1) != 1:
        raise ValueError("keys must be contiguous along the embedding dimension (keys.stride(1) == 1)")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    interpret = not keys.is_cuda
    num_queries, dim = queries.shape
    num_keys = keys.shape[0]
    queries = queries.to(keys.dtype).contiguous()
    if key_bias is not None:
        key_bias = key_bias.float().contiguous()
    block_n, block_d = config["BLOCK_N"], config["BLOCK_D"]
    block_q, tiles = config["BLOCK_Q"], config["TILES"]
    d_pad = triton_cdiv(dim, block_d) * block_d
    if ranges is None:
        num_buckets = triton_cdiv(num_keys, block_n)
        full_buckets = num_keys // block_n
        starts = lengths = None
    else:  # buckets of the ranges, read in place; a short bucket at the end of each range is masked in the kernel
        starts, lengths, cut = ranges
        if cut != block_n:
            raise ValueError(f"row ranges cut into buckets of {cut} rows, but the launch config has BLOCK_N {block_n}")
        num_buckets = full_buckets = len(starts)
    tiles = max(1, min(tiles, _next_pow2(num_buckets)))
    launch = {} if interpret else {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}

    bucket_max = torch.empty(num_queries, num_buckets, dtype=torch.float32, device=keys.device)
    bias_arg = key_bias if key_bias is not None else bucket_max  # a pointer the kernel never reads
    starts_arg = starts if starts is not None else bucket_max  # likewise
    lengths_arg = lengths if lengths is not None else bucket_max
    if full_buckets > 0:
        grid = (triton_cdiv(num_queries, block_q) * triton_cdiv(full_buckets, tiles),)
        _triton_kernel("bucket_max", interpret)[grid](
            queries,
            keys,
            bias_arg,
            bucket_max,
            starts_arg,
            lengths_arg,
            num_queries,
            full_buckets,
            queries.stride(0),
            keys.stride(0),
            bucket_max.stride(0),
            D=dim,
            HAS_BIAS=key_bias is not None,
            IEEE=keys.dtype == torch.float32,
            BLOCK_Q=block_q,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            D_PAD=d_pad,
            TILES=tiles,
            INDIRECT=ranges is not None,
            **launch,
        )
    if full_buckets < num_buckets:  # the partial last bucket: a small matmul in torch
        tail = _scores_fp32(queries, keys[full_buckets * block_n :])
        if key_bias is not None:
            tail += key_bias[full_buckets * block_n :]
        bucket_max[:, full_buckets] = tail.max(dim=1).values

    kb = min(k, num_buckets)
    buckets = bucket_max.topk(kb, dim=1, sorted=False).indices
    cand = torch.empty(num_queries, kb * block_n, dtype=torch.float32, device=keys.device)
    rescore_d = min(_next_pow2(dim), 128)
    _triton_kernel("rescore", interpret)[(num_queries, kb)](
        queries,
        keys,
        bias_arg,
        buckets,
        cand,
        starts_arg,
        lengths_arg,
        num_keys,
        kb,
        queries.stride(0),
        keys.stride(0),
        buckets.stride(0),
        cand.stride(0),
        D=dim,
        HAS_BIAS=key_bias is not None,
        BLOCK_N=block_n,
        BLOCK_D=rescore_d,
        D_PAD=triton_cdiv(dim, rescore_d) * rescore_d,
        INDIRECT=ranges is not None,
        **({} if interpret else {"num_warps": 4}),
    )
    scores, pos = cand.topk(k, dim=1)
    chosen = buckets.gather(1, pos // block_n)
    first = chosen * block_n if ranges is None else starts[chosen]
    return scores, first + pos % block_n


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
