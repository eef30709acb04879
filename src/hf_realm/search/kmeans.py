"""Seeded k-means (Lloyd's algorithm): faiss' `Kmeans` on the CPU when installed, torch on the GPU, k-means++ seeding
here in both cases. Used by the IVF backend ([`~hf_realm.search.ivf.IVFSearchConfig`]), product quantisation and
cluster pruning of kNN datastores.

Every result is a function of the seed: the CPU path is faiss' (deterministic), and the GPU path sums its clusters
with `index_put_(accumulate=True)`, which sorts, instead of `index_add_`, whose float atomics add in a different order
on every run.
"""

from __future__ import annotations

import torch

from .faiss_utils import faiss_available, import_faiss


def _cluster_sums(assign: torch.Tensor, src: torch.Tensor, num_clusters: int) -> torch.Tensor:
    out = src.new_zeros((num_clusters, *src.shape[1:]))
    if src.is_cuda:  # index_put_ sorts by cluster: the same sums on every run (index_add_'s atomics are not)
        return out.index_put_((assign,), src, accumulate=True)
    return out.index_add_(0, assign, src)


def _kmeans_init(x: torch.Tensor, num_clusters: int, gen: torch.Generator, init: str) -> torch.Tensor:
    # faiss' k-means seeds with random points only: k-means++ seeding is done here and handed to it
    n = x.shape[0]
    if init == "random":
        return x[torch.randperm(n, generator=gen)[:num_clusters].to(x.device)].clone()
    pool = x[torch.randperm(n, generator=gen)[: min(n, 64 * num_clusters)].to(x.device)]  # k-means++ on a pool
    centroids = torch.empty((num_clusters, x.shape[1]), dtype=x.dtype, device=x.device)
    centroids[0] = pool[int(torch.randint(pool.shape[0], (1,), generator=gen))]
    nearest = (pool - centroids[0]).pow(2).sum(-1)
    for c in range(1, num_clusters):
        w = nearest.double().cpu()
        pick = int(torch.multinomial(w, 1, generator=gen)) if w.sum() > 0 else c % pool.shape[0]
        centroids[c] = pool[pick]
        nearest = torch.minimum(nearest, (pool - centroids[c]).pow(2).sum(-1))
    return centroids


def _lloyd_step(x, w, centroids, max_scores: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assigns every point to its nearest centroid and moves the centroids to the (weighted) means; an empty cluster is
    re-seeded with the point farthest from its centroid. Returns the new centroids and the assignment."""
    n, num_clusters = x.shape[0], centroids.shape[0]
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=x.dtype, device=x.device)
    c_norm = centroids.pow(2).sum(-1)
    chunk = max(1, max_scores // num_clusters)
    for s in range(0, n, chunk):
        part = x[s : s + chunk]
        d = part.pow(2).sum(-1, keepdim=True) - 2 * part @ centroids.T + c_norm
        best[s : s + chunk], assign[s : s + chunk] = d.min(1)
    sums = _cluster_sums(assign, x * w[:, None], num_clusters)
    sizes = _cluster_sums(assign, w, num_clusters)
    empty = sizes == 0
    centroids = torch.where(empty[:, None], centroids, sums / sizes.clamp_min(1e-12)[:, None])
    if empty.any():
        far = best.topk(min(n, int(empty.sum()))).indices
        centroids[empty.nonzero()[: far.numel(), 0]] = x[far]
    return centroids, assign


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iters: int = 20,
    seed: int = 0,
    init: str = "k-means++",
    weights: torch.Tensor | None = None,
    max_scores: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, seeded. Returns centroids `(num_clusters, d)` and assignments `(n,)`, on ``x``'s device.

    The returned centroids are the (``weights``-weighted) means, in ``x``'s dtype, of the points assigned to them.
    ``init`` is `"k-means++"` (sequential, for up to a few hundred clusters) or `"random"` (distinct random points).
    On the CPU the iterations are faiss' `Kmeans` (float32) when faiss is installed; on the GPU they run in torch.
    """
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] (the number of points), got {num_clusters}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    centroids = _kmeans_init(x, num_clusters, torch.Generator(device="cpu").manual_seed(seed), init)
    w = torch.ones(n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
    if x.device.type == "cpu" and faiss_available() and iters > 0:
        faiss = import_faiss()
        km = faiss.Kmeans(x.shape[1], num_clusters, niter=iters, seed=seed, verbose=False,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)  # all points, no warnings  # fmt: skip
        km.train(x.float().numpy(), weights=w.float().numpy(), init_centroids=centroids.float().numpy())
        centroids = torch.from_numpy(km.centroids).to(x.dtype)
    else:
        # faiss-gpu has no CUDA 13 wheels, and torch on the GPU beats faiss on the CPU (benchmarks/bench_kmeans.py)
        for _ in range(iters):
            centroids, _ = _lloyd_step(x, w, centroids, max_scores)
    return _lloyd_step(x, w, centroids, max_scores)  # one last step, so that the centroids are the assignment's means
