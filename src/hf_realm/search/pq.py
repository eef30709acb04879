"""Product-quantised keys: decoding and exact search over the decoded (asymmetric distance) keys."""

from __future__ import annotations

import torch

from .exact import exact_topk


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


def _pq_search(q, codes, codebooks, key_bias, k, chunk: int = 1 << 18):
    """Exact search over the PQ reconstructions (= faiss IndexPQ's asymmetric distances), decoded chunk by chunk."""
    best_scores = best_ids = None
    for start in range(0, codes.shape[0], chunk):
        keys = pq_decode(codes[start : start + chunk], codebooks)
        kk = min(k, keys.shape[0])
        scores, ids = exact_topk(q, keys, kk, key_bias=key_bias[start : start + keys.shape[0]])
        ids = ids + start
        if best_scores is None:
            best_scores, best_ids = scores, ids
        else:
            scores, order = torch.cat([best_scores, scores], 1).topk(min(k, best_scores.shape[1] + kk), dim=1)
            best_scores, best_ids = scores, torch.cat([best_ids, ids], 1).gather(1, order)
    recon = pq_decode(codes[best_ids.reshape(-1)], codebooks).reshape(*best_ids.shape, -1)
    sqdist = (q.unsqueeze(1) - recon).pow(2).sum(-1)
    sqdist, order = sqdist.sort(dim=1)
    return sqdist, best_ids.gather(1, order)
