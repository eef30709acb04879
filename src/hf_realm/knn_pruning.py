"""Making a kNN datastore smaller: pruning (fewer entries) and compression (fewer bytes per entry).

Pruning returns a new [`KNNDatastore`] with a subset of the entries, provenance kept:

- [`random_prune`]: uniform sampling.
- [`greedy_merge`] (He et al. 2021, "Efficient Nearest Neighbor Language Models", arXiv:2109.04212): visit entries in
  order; an entry still present absorbs its nearest neighbours that share its value, adding their counts to its own;
  the counts weight p_kNN at search time (`p ∝ count * exp(-d / T)`).
- [`cluster_prune`]: k-means over the keys of each value separately; one entry (the centroid, with the cluster size
  as its count) per cluster, so each value keeps its density around every query.
- [`confidence_prune`]: drop the entries the model already predicts best. The key *is* the input of the output layer,
  so p_LM(value | context) = softmax(output_embedding(key) + final_logits_bias)[value] needs no forward pass; entries
  with the highest p_LM add least to the mixture p = λ p_kNN + (1 - λ) p_LM and go first.

Compression, composable with pruning and with each other (PCA first, then PQ), lives in `hf_realm.knn_compression`
and is importable from here too:

- [`pca_compress`]: keys projected on their top principal components; queries are projected the same way at search.
- [`pq_compress`]: product quantisation (faiss `ProductQuantizer`), searched exactly over the reconstructions on the
  GPU (= faiss `IndexPQ` asymmetric distances).

[`prune_datastore`] dispatches by name, as the sweep in `examples/prune_datastore.py` uses it.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch
from torch import nn

from .knn_compression import Device, _default_device, compression_report, kmeans, pca_compress, pq_compress
from .knn_datastore import KNNDatastore


PRUNING_METHODS = ("random", "greedy_merge", "cluster", "confidence")


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` has to be in (0, 1], but is {fraction}")


def _target_size(n: int, fraction: float) -> int:
    return max(1, int(round(n * fraction)))


def _first_of_each_value(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For every distinct value, the entry that comes first in ``order``."""
    _, first = np.unique(values[order], return_index=True)
    return order[first]


def _take_in_order(order: np.ndarray, size: int, values: np.ndarray, keep_singletons: bool) -> np.ndarray:
    """The first ``size`` entries of ``order`` (a priority list); with ``keep_singletons`` every value keeps one entry."""
    if not keep_singletons:
        return np.sort(order[:size])
    required = _first_of_each_value(values, order)
    if required.size > size:
        warnings.warn(
            f"keep_singletons: {required.size} distinct values need one entry each, more than the target of {size} "
            "entries; keeping one entry per value",
            stacklevel=3,
        )
        return np.sort(required)
    mask = np.zeros(values.shape[0], dtype=bool)
    mask[required] = True
    rest = order[~mask[order]][: size - required.size]
    return np.sort(np.concatenate([required, rest]))


def random_prune(
    datastore: KNNDatastore, fraction: float, seed: int = 0, keep_singletons: bool = False
) -> KNNDatastore:
    """Keeps a uniformly random ``fraction`` of the entries.

    Args:
        datastore (`KNNDatastore`): the store to prune.
        fraction (`float`): share of entries kept, in `(0, 1]`.
        seed (`int`, *optional*, defaults to 0): random seed.
        keep_singletons (`bool`, *optional*, defaults to `False`): never drop the last entry of a value (each value
            in the store keeps at least one entry, even if that exceeds the target size).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_pruning import random_prune
    >>> store = KNNDatastore(keys=np.zeros((10, 4), np.float16), values=np.arange(10) % 3)
    >>> len(random_prune(store, 0.5))
    5
    ```
    """
    _check_fraction(fraction)
    n = len(datastore)
    order = np.random.default_rng(seed).permutation(n)
    keep = _take_in_order(order, _target_size(n, fraction), datastore.values, keep_singletons)
    history = {"method": "random", "fraction": fraction, "seed": seed, "keep_singletons": keep_singletons}
    return datastore.select(keep, history=history)


@torch.no_grad()
def datastore_neighbours(
    datastore: KNNDatastore, k: int, device: str | torch.device | None = None, max_scores: int = 1 << 28
) -> np.ndarray:
    """The ``k`` nearest other entries of every entry, `(num_entries, k)` int64 (exact, self excluded)."""
    n = len(datastore)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] (other entries), got {k}")
    device = _default_device(device)
    datastore.to(device)
    batch = max(1, min(4096, max_scores // n))
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        queries = datastore.reconstruct(start, stop, device)
        _, ids = datastore.search(queries, k + 1, projected=True)
        own = torch.arange(start, stop, device=ids.device)[:, None]
        is_self = ids == own
        # drop self (or, with exact duplicates, the last candidate) so that k others remain
        drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full_like(own[:, 0], k))
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[torch.arange(ids.shape[0], device=ids.device), drop] = False
        out[start:stop] = ids[keep].view(-1, k).cpu().numpy()
    return out


def _greedy_pass(values: np.ndarray, neighbours: np.ndarray) -> list[tuple[int, int]]:
    """One greedy-merging pass over entries 0..n-1 in order; returns the (kept, merged) pairs."""
    n = values.shape[0]
    same = values[neighbours] == values[:, None]
    same &= neighbours != np.arange(n)[:, None]
    rows = np.flatnonzero(same.any(1))
    removed = bytearray(n)
    merges: list[tuple[int, int]] = []
    for i, cands in zip(rows.tolist(), (neighbours[r][same[r]] for r in rows), strict=True):
        if removed[i]:
            continue
        for j in cands.tolist():
            if not removed[j]:
                removed[j] = 1
                merges.append((i, j))
    return merges


def greedy_merge_sequence(
    datastore: KNNDatastore,
    num_neighbors: int = 8,
    neighbours: np.ndarray | None = None,
    max_passes: int = 1,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The merges of greedy merging, in order: `(num_merges, 2)` rows of `(kept entry, merged entry)`.

    Stopping greedy merging at a target size is the same as applying a prefix of this sequence, so one run serves
    every retained fraction of a sweep (see [`greedy_merge`]). With ``max_passes > 1`` the pass is repeated over the
    entries that remain (neighbours searched again among them), which reaches smaller fractions than one pass.
    """
    n = len(datastore)
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    k = min(num_neighbors, n - 1)
    if neighbours is not None and (neighbours.shape[0] != n or neighbours.shape[1] < k):
        raise ValueError(f"neighbours of shape {neighbours.shape}, expected ({n}, >= {k})")
    alive = np.arange(n)
    merges: list[np.ndarray] = []
    for p in range(max_passes):
        sub = datastore if p == 0 else datastore.select(alive)
        k = min(num_neighbors, len(sub) - 1)
        if k < 1:
            break
        if p == 0 and neighbours is not None:
            nb = np.asarray(neighbours[:, :k])
        else:
            nb = datastore_neighbours(sub, k, device=device)
        local = np.asarray(_greedy_pass(np.asarray(sub.values), nb), dtype=np.int64).reshape(-1, 2)
        if local.shape[0] == 0:
            break
        merges.append(alive[local])
        keep = np.ones(len(sub), dtype=bool)
        keep[local[:, 1]] = False
        alive = alive[keep]
    return np.concatenate(merges) if merges else np.zeros((0, 2), dtype=np.int64)


def greedy_merge(
    datastore: KNNDatastore,
    num_neighbors: int = 8,
    fraction: float | None = None,
    neighbours: np.ndarray | None = None,
    merges: np.ndarray | None = None,
    merged_keys: str = "first",
    device: str | torch.device | None = None,
) -> KNNDatastore:
    """Greedy merging (He et al. 2021): entries absorb their same-value nearest neighbours and carry their counts.

    Entries are visited in order. An entry still present merges each of its ``num_neighbors`` nearest neighbours that
    is still present and has the same value: the neighbour is removed and its count added to the entry's. With
    ``fraction`` the merging stops as soon as that share of entries remains (if merging everything leaves more, the
    result is larger than asked, with a warning). Merging only joins entries of one value, so no value ever loses its
    last entry. The merged store has `counts`; [`KNNLogitsProcessor`] weights neighbours by them.

    Args:
        datastore (`KNNDatastore`): the store to merge.
        num_neighbors (`int`, *optional*, defaults to 8): neighbours looked at per entry.
        fraction (`float`, *optional*): stop at this share of entries.
        neighbours (`np.ndarray` of shape `(num_entries, >= num_neighbors)`, *optional*): precomputed neighbour
            lists (from [`datastore_neighbours`]), nearest first.
        merges (`np.ndarray` of shape `(num_merges, 2)`, *optional*): a precomputed [`greedy_merge_sequence`] (with
            the same ``num_neighbors``), reused across fractions in sweeps.
        merged_keys (`str`, *optional*, defaults to `"first"`): the key of a merged entry: `"first"` keeps the key of
            the entry that absorbed the others (He et al.); `"mean"` takes the count-weighted mean of the merged keys
            (the centre of the region the entry now stands for).
        device (`str` or `torch.device`, *optional*): where to search the neighbours.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_pruning import greedy_merge
    >>> keys = np.array([[0.0], [0.1], [5.0], [5.1]], np.float16)
    >>> merged = greedy_merge(KNNDatastore(keys=keys, values=[7, 7, 8, 9]), num_neighbors=1)
    >>> merged.values.tolist(), merged.counts.tolist()
    ([7, 8, 9], [2, 1, 1])
    ```
    """
    n = len(datastore)
    if fraction is not None:
        _check_fraction(fraction)
    if merged_keys not in ("first", "mean"):
        raise ValueError(f"merged_keys must be 'first' or 'mean', got {merged_keys!r}")
    if merges is None:
        merges = greedy_merge_sequence(datastore, num_neighbors, neighbours=neighbours, device=device)
    elif merges.ndim != 2 or merges.shape[1] != 2 or (merges.size and merges.max() >= n):
        raise ValueError(f"merges must be (num_merges, 2) entry ids below {n}, got shape {merges.shape}")
    target = _target_size(n, fraction) if fraction is not None else 0
    steps = min(len(merges), n - target)
    counts = datastore.counts.astype(np.int64) if datastore.counts is not None else np.ones(n, np.int64)
    removed = np.zeros(n, dtype=bool)
    for i, j in merges[:steps].tolist():
        counts[i] += counts[j]
        counts[j] = 0
        removed[j] = True
    keep = np.flatnonzero(~removed)
    if fraction is not None and keep.size > target:
        warnings.warn(
            f"greedy merging with {num_neighbors} neighbours keeps {keep.size / n:.1%} of the entries, more than the "
            f"{fraction:.1%} asked for; raise num_neighbors to merge more",
            stacklevel=2,
        )
    new_counts = counts[keep]
    if new_counts.max(initial=0) > np.iinfo(np.int32).max:
        raise OverflowError("a merged count exceeds int32")
    history = {"method": "greedy_merge", "num_neighbors": num_neighbors, "fraction": fraction, "keys": merged_keys}
    merged = datastore.select(keep, counts=new_counts.astype(np.int32), history=history)
    if merged_keys == "mean":
        if datastore.keys is None:
            raise ValueError("merged_keys='mean' needs float keys: merge before product quantisation")
        parent = np.arange(n)
        prefix = merges[:steps]
        parent[prefix[:, 1]] = prefix[:, 0]
        root = parent.copy()
        while True:  # every merged entry ends at the entry that survives
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        weights = torch.from_numpy(datastore.counts.astype(np.float64) if datastore.counts is not None else np.ones(n))
        sums = torch.zeros((n, datastore.key_dim), dtype=torch.float64)
        for start in range(0, n, 1 << 18):
            part = torch.from_numpy(np.asarray(datastore.keys[start : start + (1 << 18)], dtype=np.float64))
            w = weights[start : start + part.shape[0], None]
            sums.index_add_(0, torch.from_numpy(root[start : start + part.shape[0]]), part * w)
        totals = torch.zeros(n, dtype=torch.float64).index_add_(0, torch.from_numpy(root), weights)
        merged.keys = (sums[keep] / totals[keep, None]).numpy().astype(np.float16)
    return merged


@torch.no_grad()
def entry_model_log_probs(
    datastore: KNNDatastore,
    model: nn.Module,
    device: str | torch.device | None = None,
    batch_size: int = 8192,
) -> np.ndarray:
    """log p_LM(value | context) of every entry, from its key: log_softmax(output_embedding(key) + final bias)[value].

    Needs the uncompressed keys (`input_dim` = the model's hidden size). Adds ``model.final_logits_bias`` when the
    model has one (Marian, BART); models with other post-processing of the logits (e.g. soft-capping) are not covered.
    """
    if datastore.keys is None or datastore.projection is not None:
        raise ValueError("model log-probs need the original keys: prune before PCA / PQ compression")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output embedding to score the entries with")
    device = _default_device(device) if device is not None else next(model.parameters()).device
    bias = getattr(model, "final_logits_bias", None)
    dtype = next(head.parameters()).dtype
    out = np.empty(len(datastore), dtype=np.float32)
    for start in range(0, len(datastore), batch_size):
        keys = torch.from_numpy(np.array(datastore.keys[start : start + batch_size])).to(device, dtype)
        logits = head(keys).float()
        if isinstance(bias, torch.Tensor):
            logits = logits + bias.float().reshape(1, -1)
        values = torch.from_numpy(np.array(datastore.values[start : start + batch_size])).to(device).long()
        out[start : start + keys.shape[0]] = torch.log_softmax(logits, -1).gather(1, values[:, None])[:, 0].cpu()
    return out


def confidence_prune(
    datastore: KNNDatastore,
    fraction: float,
    model: nn.Module | None = None,
    log_probs: np.ndarray | None = None,
    keep_singletons: bool = False,
) -> KNNDatastore:
    """Keeps the ``fraction`` of entries whose value the model predicts *least* well (lowest p_LM(value | key)).

    Args:
        datastore (`KNNDatastore`): the store to prune (uncompressed keys).
        fraction (`float`): share of entries kept, in `(0, 1]`.
        model (`PreTrainedModel`, *optional*): the model that built the store (for [`entry_model_log_probs`]).
        log_probs (`np.ndarray` of shape `(num_entries,)`, *optional*): precomputed log p_LM of every entry (reused
            across fractions in sweeps); one of ``model`` / ``log_probs`` is needed.
        keep_singletons (`bool`, *optional*, defaults to `False`): never drop the last entry of a value.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_pruning import confidence_prune
    >>> store = KNNDatastore(keys=np.zeros((4, 2), np.float16), values=[3, 4, 5, 6])
    >>> confidence_prune(store, 0.5, log_probs=np.log([0.9, 0.1, 0.5, 0.2])).values.tolist()
    [4, 6]
    ```
    """
    _check_fraction(fraction)
    if log_probs is None:
        if model is None:
            raise ValueError("confidence pruning needs the model or precomputed log_probs")
        log_probs = entry_model_log_probs(datastore, model)
    log_probs = np.asarray(log_probs)
    if log_probs.shape != (len(datastore),):
        raise ValueError(f"log_probs of shape {log_probs.shape}, expected ({len(datastore)},)")
    order = np.argsort(log_probs, kind="stable")
    keep = _take_in_order(order, _target_size(len(datastore), fraction), datastore.values, keep_singletons)
    history = {"method": "confidence", "fraction": fraction, "keep_singletons": keep_singletons}
    return datastore.select(keep, history=history)


def prune_datastore(datastore: KNNDatastore, method: str, fraction: float, **kwargs) -> KNNDatastore:
    """Dispatches to [`random_prune`], [`greedy_merge`], [`cluster_prune`] or [`confidence_prune`] by name."""
    if method == "random":
        return random_prune(datastore, fraction, **kwargs)
    if method == "greedy_merge":
        return greedy_merge(datastore, fraction=fraction, **kwargs)
    if method == "cluster":
        return cluster_prune(datastore, fraction, **kwargs)
    if method == "confidence":
        return confidence_prune(datastore, fraction, **kwargs)
    raise ValueError(f"method must be one of {PRUNING_METHODS}, got {method!r}")


def _cluster_budget(sizes: np.ndarray, budget: int, keep_singletons: bool) -> np.ndarray:
    """Clusters per value: proportional to the value's entries, at most its entries, summing to exactly ``budget``.

    With ``keep_singletons`` every value gets one cluster first and the rest of the budget is shared out in proportion
    to the entries beyond the first (so the sum is ``max(budget, number of values)``); without it, values whose share
    rounds to zero get none. Shares are rounded by the largest-remainder method (ties to the larger value).
    """
    base = np.ones_like(sizes) if keep_singletons else np.zeros_like(sizes)
    spare = sizes - base
    extra = budget - int(base.sum())
    if extra <= 0:
        return base
    share = spare.astype(np.float64) * extra / max(1, int(spare.sum()))
    alloc = np.floor(share).astype(np.int64)
    left = extra - int(alloc.sum())
    if left > 0:
        order = np.lexsort((-sizes, -(share - alloc)))  # largest remainder first, then the larger value
        alloc[order[:left]] += 1
    return base + np.minimum(alloc, spare)


@torch.no_grad()
def cluster_prune(
    datastore: KNNDatastore,
    fraction: float,
    iters: int = 10,
    seed: int = 0,
    device: Device = None,
    keep_singletons: bool = True,
) -> KNNDatastore:
    """Clusters the keys of every value separately and keeps one entry per cluster: the centroid, with a count.

    The target of `round(len(datastore) * fraction)` entries is shared out over the values in proportion to their
    entries (every value first gets one with `keep_singletons`); a value given `c` clusters is k-means clustered
    into `c` clusters, and each cluster becomes one entry whose key is the (count-weighted) mean of its members, whose
    count is the sum of their counts (a weight at search time, as in greedy merging) and whose provenance is that of
    the member nearest to the centroid. Unlike sampling, the density of each value around a query is kept (through
    the counts), so the nearest neighbours of a query do not shift towards the values that happened to keep more
    entries.

    Args:
        datastore (`KNNDatastore`): the store to prune (float keys: before product quantisation).
        fraction (`float`): share of entries kept, in `(0, 1]`.
        iters (`int`, *optional*, defaults to 10): k-means iterations.
        seed (`int`, *optional*, defaults to 0): k-means initialisation seed.
        device (`str` or `torch.device`, *optional*): where k-means runs (CUDA when available).
        keep_singletons (`bool`, *optional*, defaults to `True`): every value keeps at least one entry, so no target
            token disappears from the store; when the store has more values than the target size, the result has
            one entry per value (with a warning).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_pruning import cluster_prune
    >>> keys = np.array([[0.0], [0.2], [10.0], [10.2], [5.0]], np.float16)
    >>> small = cluster_prune(KNNDatastore(keys=keys, values=[1, 1, 1, 1, 2]), 0.6, device="cpu")
    >>> small.values.tolist(), small.counts.tolist(), small.keys[:, 0].tolist()
    ([1, 1, 2], [2, 2, 1], [0.0999755859375, 10.1015625, 5.0])
    ```
    """
    _check_fraction(fraction)
    if datastore.keys is None:
        raise ValueError("cluster pruning needs float keys: apply it before product quantisation")
    device = _default_device(device)
    values = np.asarray(datastore.values)
    counts = datastore.counts if datastore.counts is not None else np.ones(len(datastore), np.int32)
    order = np.argsort(values, kind="stable")
    uniq, starts = np.unique(values[order], return_index=True)
    bounds = np.append(starts, len(order))
    target = _target_size(len(values), fraction)
    if keep_singletons and len(uniq) > target:
        warnings.warn(
            f"keep_singletons: {len(uniq)} distinct values need one entry each, more than the target of {target} "
            "entries; keeping one entry per value",
            stacklevel=2,
        )
    per_value = _cluster_budget(np.diff(bounds), target, keep_singletons)
    new_keys, new_vals, new_counts, new_prov = [], [], [], []
    for v, lo, hi, c in zip(uniq.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), per_value.tolist(), strict=True):
        if c == 0:
            continue
        idx = np.sort(order[lo:hi])
        cnt = torch.from_numpy(counts[idx].astype(np.float64)).to(device)
        if c >= len(idx):
            keys = torch.from_numpy(np.asarray(datastore.keys[idx], dtype=np.float32))
            new_keys.append(keys)
            new_counts.append(cnt.cpu())
            new_prov.append(datastore.provenance[idx])
            new_vals.append(np.full(len(idx), v))
            continue
        x = torch.from_numpy(np.asarray(datastore.keys[idx], dtype=np.float32)).to(device).double()
        if c == 1:
            centroids = ((x * cnt[:, None]).sum(0) / cnt.sum())[None]
            assign = torch.zeros(len(idx), dtype=torch.long, device=device)
        else:
            init = "k-means++" if c <= 256 else "random"
            centroids, assign = kmeans(x, c, iters=iters, seed=seed, init=init, weights=cnt)
        sizes = torch.zeros(c, dtype=cnt.dtype, device=device).index_add_(0, assign, cnt)
        # the member nearest to its centroid names the cluster (provenance)
        dist = (x - centroids[assign]).pow(2).sum(-1)
        rep = torch.full((c,), len(idx), dtype=torch.long, device=device)
        best = torch.full((c,), float("inf"), dtype=dist.dtype, device=device).scatter_reduce(
            0, assign, dist, reduce="amin"
        )
        is_best = dist == best[assign]
        rep = rep.scatter_reduce(0, assign[is_best], torch.nonzero(is_best)[:, 0], reduce="amin")
        used = sizes > 0
        new_keys.append(centroids[used].float().cpu())
        new_counts.append(sizes[used].cpu())
        new_prov.append(datastore.provenance[idx[rep[used].cpu().numpy()]])
        new_vals.append(np.full(int(used.sum()), v))
    keys = torch.cat(new_keys).numpy()
    sizes = torch.cat(new_counts).round().numpy()
    if sizes.max(initial=0) > np.iinfo(np.int32).max:
        raise OverflowError("a cluster count exceeds int32")
    meta = dict(datastore.metadata)
    meta["history"] = [
        *datastore.metadata.get("history", []),
        {"method": "cluster", "fraction": fraction, "keep_singletons": keep_singletons},
    ]
    return KNNDatastore(
        keys=keys,
        values=np.concatenate(new_vals),
        provenance=np.concatenate(new_prov),
        counts=sizes.astype(np.int32),
        metadata=meta,
        projection=datastore.projection,
    )


_SPEC_STEP = re.compile(
    r"^(random|cluster|greedy_merge_mean|greedy_merge|confidence)@?([0-9]*\.?[0-9]+)$|^(pca|pq)([0-9]+)$"
)


def parse_shrink_spec(spec: str) -> list[tuple[str, float | int]]:
    """Splits a spec such as ``"cluster@0.25+pca64+pq16"`` into steps: ``[("cluster", 0.25), ("pca", 64), ("pq", 16)]``.

    Steps: `random@F`, `cluster@F`, `greedy_merge@F`, `greedy_merge_mean@F`, `confidence@F` (a retained fraction F),
    `pcaN` (N dims), `pqM` (M bytes per key); joined by `+`, applied left to right, `pq` last.
    """
    steps: list[tuple[str, float | int]] = []
    for part in spec.split("+"):
        m = _SPEC_STEP.match(part.strip())
        if m is None:
            raise ValueError(
                f"unknown step {part!r} in {spec!r}: expected random@F, cluster@F, greedy_merge@F, greedy_merge_mean@F, "
                "confidence@F (0 < F <= 1), pcaN or pqM"
            )
        if m.group(1):
            fraction = float(m.group(2))
            _check_fraction(fraction)
            steps.append((m.group(1), fraction))
        else:
            steps.append((m.group(3), int(m.group(4))))
    kinds = [k for k, _ in steps]
    if "pq" in kinds[:-1]:
        raise ValueError(f"{spec!r}: pq has to be the last step (pruning and PCA need float keys)")
    return steps


def shrink_datastore(
    datastore: KNNDatastore,
    spec: str,
    *,
    model: nn.Module | None = None,
    num_neighbors: int = 32,
    merges: np.ndarray | None = None,
    log_probs: np.ndarray | None = None,
    keep_singletons: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> KNNDatastore:
    """Applies the pruning and compression steps named by ``spec`` (see [`parse_shrink_spec`]) in order.

    Args:
        datastore (`KNNDatastore`): the store to shrink.
        spec (`str`): e.g. `"random@0.25"`, `"pq32"`, `"cluster@0.25+pca64+pq16"`.
        model (`nn.Module`, *optional*): the datastore's model, for `confidence@F` when `log_probs` is not given.
        num_neighbors (`int`, *optional*, defaults to 32): neighbours for greedy merging.
        merges (`np.ndarray`, *optional*): a [`greedy_merge_sequence`] of ``datastore``, so that several fractions
            share one neighbour search (only for a greedy step that comes first).
        log_probs (`np.ndarray`, *optional*): [`entry_model_log_probs`] of ``datastore`` (a confidence step first).
        keep_singletons (`bool`, *optional*, defaults to `False`): random and confidence pruning keep the last entry
            of every value (clustering always does).
        seed (`int`, *optional*, defaults to 0): seed of sampling, k-means, PCA and PQ training.
        device (`str` or `torch.device`, *optional*): where k-means, PCA and PQ run.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_pruning import shrink_datastore
    >>> rng = np.random.default_rng(0)
    >>> store = KNNDatastore(keys=rng.normal(size=(2000, 16)).astype(np.float16), values=rng.integers(0, 5, 2000))
    >>> small = shrink_datastore(store, "cluster@0.25+pca8+pq4", device="cpu")
    >>> len(small), small.keys is None, [h["method"] for h in small.metadata["history"]]
    (500, True, ['cluster', 'pca', 'pq'])
    ```
    """
    steps = parse_shrink_spec(spec)
    store = datastore
    for i, (kind, arg) in enumerate(steps):
        first = i == 0
        if kind == "random":
            store = random_prune(store, arg, seed=seed, keep_singletons=keep_singletons)
        elif kind == "cluster":
            store = cluster_prune(store, arg, seed=seed, device=device)
        elif kind in ("greedy_merge", "greedy_merge_mean"):
            keys = "mean" if kind == "greedy_merge_mean" else "first"
            store = greedy_merge(store, num_neighbors, fraction=arg, merges=merges if first else None,
                                 merged_keys=keys, device=device)  # fmt: skip
        elif kind == "confidence":
            lp = log_probs if first else None
            store = confidence_prune(store, arg, model=None if lp is not None else model, log_probs=lp,
                                     keep_singletons=keep_singletons)  # fmt: skip
        elif kind == "pca":
            store = pca_compress(store, arg, seed=seed, device=device)
        else:
            store = pq_compress(store, arg, seed=seed, device=device)
    return store


__all__ = [
    "PRUNING_METHODS",
    "cluster_prune",
    "compression_report",
    "confidence_prune",
    "datastore_neighbours",
    "entry_model_log_probs",
    "greedy_merge",
    "greedy_merge_sequence",
    "kmeans",
    "parse_shrink_spec",
    "pca_compress",
    "pq_compress",
    "prune_datastore",
    "random_prune",
    "shrink_datastore",
]
