"""Exact dense top-k search in torch: the one search kernel behind the REALM corpus index and the kNN datastore.

Maximum inner product search (REALM) and L2 nearest neighbours (kNN-MT) are the same problem: with
``key_bias = -||k||^2 / 2`` the top inner-product scores are the nearest keys in L2, and
``||q - k||^2 = ||q||^2 - 2 * score``.
"""

from __future__ import annotations

import torch


def exact_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    key_bias: torch.Tensor | None = None,
    chunk_size: int = 1 << 20,
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
            Keys scored at once; bounds the temporary score matrix to ``num_queries x chunk_size``.

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
    ```
    """
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"expected 2-d queries and keys, got shapes {tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != key dim {keys.shape[1]}")
    num_keys = keys.shape[0]
    if not 1 <= k <= num_keys:
        raise ValueError(f"k must be in [1, {num_keys}] (the number of keys), got {k}")
    if key_bias is not None and key_bias.shape != (num_keys,):
        raise ValueError(f"key_bias must have shape ({num_keys},), got {tuple(key_bias.shape)}")

    queries = queries.to(keys.dtype)
    best_scores, best_ids = None, None
    for start in range(0, num_keys, chunk_size):
        chunk = keys[start : start + chunk_size]
        scores = (queries @ chunk.T).float()
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
