"""What "exact" means for the torch backends, and how a fast low-precision pass is made exact.

**Definition.** An exact search returns the ids, in order, of the ``k`` best keys by float64 arithmetic on the keys as
given to the backend (the *source* keys: fp32 REALM embeddings, fp16 kNN keys, PQ reconstructions), ties broken by the
smaller id; scores are those float64 values rounded to float32. On a GPU this holds although the keys are stored in
fp16 / bf16 for speed: the ids and order equal those of a float32 (or float64) brute force over the source keys.

**How.** A fast pass (fp16 / bf16 / fp32 keys, fp32 accumulation, the fused Triton kernel on GPU) returns
``kk > k`` candidates; they are rescored in float64 from the source keys, re-sorted and cut to ``k``. The fast score
of every key is within ``slack(q)`` of its exact score, where ``slack`` bounds the storage rounding of keys and
queries and the fp32 accumulation error (with a safety factor for tensor-core accumulation). A key outside the
candidates has a fast score at most the ``kk``-th candidate's, so its exact score is at most that plus ``slack``:
when the exact ``k``-th score of the candidates is larger, no key outside can belong to the top ``k`` and the answer
is exact. Rows for which the bound does not prove it (dense near-ties) are searched again with 4x the candidates, up
to all keys. Checking costs one host synchronisation per search.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


# fp32 accumulation of d products (plus the bias): |error| <= gamma_{d+2} * sum |terms|. Tensor cores may truncate
# instead of rounding while accumulating, and the Triton kernel scores a key twice (bucket maxima, then candidates):
# a safety factor of 8 covers both.
_ACCUMULATION_SAFETY = 8.0
_FP32_UNIT = 2.0**-24
_ROUNDING_UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 0.0, torch.float64: 0.0}
_MAX_RESCORE_ELEMENTS = 1 << 25  # bounds the (rows, candidates, dim) float64 temporary to 256 MiB


def first_candidates(k: int, num_keys: int) -> int:
    """Candidates taken by the fast pass before rescoring: ``k`` plus a margin (a quarter of ``k``, at least 16)."""
    return min(num_keys, k + max(16, k // 4))


def matmul_input_unit(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff applied to fp32 matmul inputs on CUDA when TF32 / bf16 matmuls are allowed (0 otherwise)."""
    if dtype != torch.float32 or device.type != "cuda":
        return 0.0
    precision = torch.get_float32_matmul_precision()
    if precision == "highest" and not torch.backends.cuda.matmul.allow_tf32:
        return 0.0
    return 2.0**-8 if precision == "medium" else 2.0**-11


def score_slack(
    queries: torch.Tensor,
    storage_dtype: torch.dtype,
    max_abs_key: torch.Tensor,
    key_rounding: torch.Tensor | None,
    max_abs_bias: float,
    input_unit: float = 0.0,
) -> torch.Tensor:
    """Bound on ``|fast score - exact score|`` over all keys, per query (float64, `(num_queries,)`).

    Args:
        queries (`torch.Tensor` of shape `(num_queries, dim)`): The fp32 queries (cast to ``storage_dtype`` by the
            fast pass).
        storage_dtype (`torch.dtype`): Dtype of the stored keys.
        max_abs_key (`torch.Tensor` of shape `(dim,)`): Per dimension, the largest ``|stored key|``.
        key_rounding (`torch.Tensor` of shape `(dim,)`, *optional*): Per dimension, the largest
            ``|source key - stored key|`` (`None` when storage is lossless).
        max_abs_bias (`float`): The largest ``|key_bias|`` (0 without bias).
        input_unit (`float`): Extra rounding of matmul inputs (TF32), see [`matmul_input_unit`].
    """
    q = queries.double()
    a = max_abs_key.to(q.device, torch.float64)
    q_stored = queries.to(storage_dtype).double()
    q_abs = q_stored.abs()
    dim = q.shape[1]
    slack = (q - q_stored).abs() @ a  # query rounding
    if key_rounding is not None:
        slack = slack + q.abs() @ key_rounding.to(q.device, torch.float64)  # key rounding
    magnitude = q_abs @ a + max_abs_bias
    slack = slack + (_ACCUMULATION_SAFETY * (dim + 2) * _FP32_UNIT + 2 * input_unit) * magnitude
    return slack


def rescored_topk(
    queries: torch.Tensor,
    k: int,
    num_keys: int,
    *,
    candidates: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    source_rows: Callable[[torch.Tensor], torch.Tensor],
    slack: torch.Tensor | None,
    metric: str,
    oversample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` (see the module docstring) from a fast candidate search.

    Args:
        queries (`torch.Tensor` of shape `(num_queries, dim)`): fp32 queries.
        k (`int`): Results per query.
        num_keys (`int`): Keys in the backend.
        candidates (`Callable`): ``candidates(queries, kk) -> (fast_scores, ids)``, the top ``kk`` by the fast
            score in maximum-inner-product form (``q . k`` or ``q . k - ||k||^2 / 2`` for L2), descending.
        source_rows (`Callable`): ``source_rows(ids) -> keys`` `(*ids.shape, dim)`: the source keys of ``ids`` (any
            device and float dtype; rescoring runs on that device).
        slack (`torch.Tensor` of shape `(num_queries,)`): [`score_slack`] of the queries (unused without
            ``oversample``).
        metric (`str`): `"inner_product"` (returns scores, descending) or `"l2"` (squared distances, ascending).
        oversample (`bool`, *optional*, defaults to `True`): `False` takes exactly ``k`` candidates and skips the bound
            check: the fast pass's top ``k``, with exact scores, re-sorted, and no host synchronisation (the GPU
            search overlaps whatever the host queues next, e.g. the rest of a decoding step).

    Returns:
        `(scores, ids)`: float32 and int64, `(num_queries, k)`, on the queries' device.
    """
    if not oversample:  # the fast pass's top k with exact scores, re-sorted: no bound check, no host synchronisation
        _, ids = candidates(queries, k)
        exact, ids = _exact_sorted(queries, ids, source_rows, metric)
        return exact.float(), ids
    device = queries.device
    num_queries = queries.shape[0]
    out_scores = torch.empty(num_queries, k, dtype=torch.float32, device=device)
    out_ids = torch.empty(num_queries, k, dtype=torch.int64, device=device)
    pending = None  # None: every row
    kk = first_candidates(k, num_keys)
    while True:
        q = queries if pending is None else queries[pending]
        fast, ids = candidates(q, kk)
        exact, ids = _exact_sorted(q, ids, source_rows, metric)  # best first, ties by id
        top, top_ids = exact[:, :k], ids[:, :k]
        if kk >= num_keys:
            done = torch.ones(q.shape[0], dtype=torch.bool, device=device)
        else:
            kth = top[:, -1] if metric == "inner_product" else (q.double().pow(2).sum(-1) - top[:, -1]) / 2
            limit = fast[:, -1].double() + (slack if pending is None else slack[pending])
            done = kth > limit
        result = top.float()
        if pending is None and bool(done.all()):
            return result, top_ids
        rows = torch.arange(num_queries, device=device) if pending is None else pending
        out_scores[rows[done]] = result[done]
        out_ids[rows[done]] = top_ids[done]
        pending = rows[~done]
        if pending.numel() == 0:
            return out_scores, out_ids
        kk = min(num_keys, kk * 4)


def exact_scores(queries: torch.Tensor, ids: torch.Tensor, source_rows: Callable, metric: str) -> torch.Tensor:
    """float64 inner products (or squared distances for `"l2"`) of ``queries`` `(b, dim)` with the source keys of
    ``ids`` `(b, c)`, on the queries' device; computed in row chunks to bound the temporary."""
    device = queries.device
    per_chunk = max(1, _MAX_RESCORE_ELEMENTS // max(1, ids.shape[1] * queries.shape[1]))
    parts = []
    for start in range(0, ids.shape[0], per_chunk):
        rows = source_rows(ids[start : start + per_chunk])
        q = queries[start : start + per_chunk].to(rows.device, torch.float64)
        rows = rows.to(torch.float64)
        if metric == "inner_product":
            parts.append(torch.bmm(rows, q.unsqueeze(-1)).squeeze(-1).to(device))
        else:
            parts.append((rows - q.unsqueeze(1)).pow(2).sum(-1).to(device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def sort_best_first(scores: torch.Tensor, ids: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each row best first (descending inner products, ascending distances), ties by the smaller id."""
    ids, by_id = ids.sort(dim=1)
    scores = scores.gather(1, by_id)
    scores, order = scores.sort(dim=1, descending=metric == "inner_product", stable=True)
    return scores, ids.gather(1, order)


def _exact_sorted(
    queries: torch.Tensor, ids: torch.Tensor, source_rows: Callable, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return sort_best_first(exact_scores(queries, ids, source_rows, metric), ids, metric)
