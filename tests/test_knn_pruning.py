"""Tests for hf_realm.knn_pruning: greedy merging by hand, PCA neighbour order, PQ vs numpy, singleton protection."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_realm import KNNDatastore, KNNLogitsProcessor
from hf_realm.knn_pruning import (
    cluster_prune,
    compression_report,
    confidence_prune,
    datastore_neighbours,
    entry_model_log_probs,
    greedy_merge,
    greedy_merge_sequence,
    kmeans,
    parse_shrink_spec,
    pca_compress,
    pq_compress,
    prune_datastore,
    random_prune,
    shrink_datastore,
)
from hf_realm.search import pq_decode

from .conftest import tiny_marian


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_store():
    #            0    1    2    3     4     5     6
    x = np.array([0.0, 0.1, 0.3, 0.35, 10.0, 10.2, 10.5])
    keys = np.stack([x, np.zeros_like(x)], 1).astype(np.float16)
    values = np.array([1, 1, 2, 1, 3, 3, 3])  # A A B A C C C
    counts = np.array([1, 2, 1, 1, 1, 1, 4])
    provenance = np.stack([np.arange(7), np.arange(7) * 10], 1)
    return KNNDatastore(keys=keys, values=values, counts=counts, provenance=provenance)


def test_neighbour_lists_by_hand():
    nbrs = datastore_neighbours(hand_store(), 2, device="cpu")
    assert nbrs.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1], [5, 6], [4, 6], [5, 4]]


def test_greedy_merge_hand_computed():
    # 0 absorbs 1 (same value A; 2 is B). 2 (B) has no B neighbour. 3 (A): neighbours 2 (B) and 1 (gone).
    # 4 absorbs 5 and 6. Counts add up: 1+2, 1, 1, 1+1+4.
    merged = greedy_merge(hand_store(), num_neighbors=2, device="cpu")
    assert merged.values.tolist() == [1, 2, 1, 3]
    assert merged.counts.tolist() == [3, 1, 1, 6]
    assert merged.provenance.tolist() == [[0, 0], [2, 20], [3, 30], [4, 40]]
    np.testing.assert_array_equal(merged.keys, hand_store().keys[[0, 2, 3, 4]])
    assert int(merged.counts.sum()) == int(hand_store().counts.sum())
    # with a target of 5 entries the merging stops after 1 -> 0 and 5 -> 4
    partial = greedy_merge(hand_store(), num_neighbors=2, fraction=5 / 7, device="cpu")
    assert partial.values.tolist() == [1, 2, 1, 3, 3]
    assert partial.counts.tolist() == [3, 1, 1, 2, 4]
    assert partial.metadata["history"][-1]["method"] == "greedy_merge"


def test_greedy_merge_multiple_passes_hand_computed():
    # pass 1 (1 neighbour): 0 <- 1, 4 <- 5. Among the rest (0, 2, 3, 4, 6) pass 2: 4 <- 6. Pass 3 finds nothing.
    store = hand_store()
    merges = greedy_merge_sequence(store, num_neighbors=1, max_passes=5, device="cpu")
    assert merges.tolist() == [[0, 1], [4, 5], [4, 6]]
    assert greedy_merge_sequence(store, num_neighbors=1, device="cpu").tolist() == [[0, 1], [4, 5]]
    merged = greedy_merge(store, num_neighbors=1, merges=merges)
    assert merged.values.tolist() == [1, 2, 1, 3] and merged.counts.tolist() == [3, 1, 1, 6]


def _naive_greedy_merge(keys, values, counts, k, target):
    """The algorithm as written in the paper, with early stopping, over float64 brute-force neighbours."""
    x = keys.astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nbrs = np.argsort(d, axis=1, kind="stable")[:, :k]
    counts = counts.astype(np.int64).copy()
    removed = np.zeros(len(values), bool)
    for i in range(len(values)):
        if (~removed).sum() <= target:
            break
        if removed[i]:
            continue
        for j in nbrs[i]:
            if not removed[j] and values[j] == values[i]:
                removed[j] = True
                counts[i] += counts[j]
                if (~removed).sum() <= target:
                    break
    keep = np.flatnonzero(~removed)
    return keep, counts[keep]


@pytest.mark.parametrize("fraction", [0.9, 0.75, 0.6])
def test_greedy_merge_matches_naive_early_stopping(fraction):
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(300, 6)).astype(np.float16)
    values = rng.integers(0, 4, 300)
    counts = rng.integers(1, 3, 300)
    store = KNNDatastore(keys=keys, values=values, counts=counts, provenance=np.stack([np.arange(300)] * 2, 1))
    merges = greedy_merge_sequence(store, num_neighbors=5, device="cpu")
    merged = greedy_merge(store, num_neighbors=5, fraction=fraction, merges=merges)
    keep, ref_counts = _naive_greedy_merge(keys, values, counts, 5, round(300 * fraction))
    assert merged.provenance[:, 0].tolist() == keep.tolist()
    assert merged.counts.tolist() == ref_counts.tolist()


def test_greedy_merge_mean_keys_hand_computed():
    merged = greedy_merge(hand_store(), num_neighbors=2, merged_keys="mean", device="cpu")
    assert merged.counts.tolist() == [3, 1, 1, 6]
    # entry 0 stands for keys 0.0 (count 1) and 0.1 (count 2); entry 4 for 10.0, 10.2 (count 1 each), 10.5 (count 4)
    keys = hand_store().keys[:, 0].astype(np.float64)
    expected = [(keys[0] + 2 * keys[1]) / 3, keys[2], keys[3], (keys[4] + keys[5] + 4 * keys[6]) / 6]
    np.testing.assert_allclose(merged.keys[:, 0].astype(np.float64), expected, rtol=1e-3)
    assert merged.provenance.tolist() == [[0, 0], [2, 20], [3, 30], [4, 40]]
    with pytest.raises(ValueError, match="merged_keys must be 'first' or 'mean'"):
        greedy_merge(hand_store(), merged_keys="median")


def test_cluster_prune_centroids_counts_and_provenance():
    rng = np.random.default_rng(0)
    # value 5: three tight groups of 8 points; value 6: one group of 4; value 7: a single entry
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    keys5 = np.concatenate([c + rng.normal(scale=0.1, size=(8, 2)) for c in centers])
    keys6 = np.array([5.0, 5.0]) + rng.normal(scale=0.1, size=(4, 2))
    keys = np.concatenate([keys5, keys6, [[20.0, 20.0]]]).astype(np.float16)
    values = np.array([5] * 24 + [6] * 4 + [7])
    counts = rng.integers(1, 4, 29)
    prov = np.stack([np.arange(29), np.zeros(29, int)], 1)
    store = KNNDatastore(keys=keys, values=values, counts=counts, provenance=prov)
    # target round(29 * 0.18) = 5: one per value, the 2 left shared 23:3 (1.77, 0.23) -> 1 + the largest remainder
    small = cluster_prune(store, 0.18, device="cpu")  # so 24 -> 3 clusters, 4 -> 1, 1 -> 1
    assert small.values.tolist() == [5, 5, 5, 6, 7]
    assert int(small.counts.sum()) == int(counts.sum())
    k64 = keys.astype(np.float64)
    for key, count, (row, _) in zip(small.keys.astype(np.float64), small.counts, small.provenance, strict=True):
        members = np.flatnonzero((values == values[row]) & (np.linalg.norm(k64 - key, axis=1) < 1.0))
        assert count == counts[members].sum()
        mean = (k64[members] * counts[members, None]).sum(0) / counts[members].sum()
        np.testing.assert_allclose(key, mean, atol=4e-3)  # float16 spacing at 10 is 2^-7
        assert row == members[np.argmin(((k64[members] - mean) ** 2).sum(1))]  # nearest member names it
    assert set(prune_datastore(store, "cluster", 1.0, device="cpu").values.tolist()) == {5, 6, 7}


def test_cluster_prune_hits_the_target_size_exactly():
    rng = np.random.default_rng(1)
    sizes = [300, 120, 45, 9, 3, 2, 1, 1, 1]
    values = np.repeat(np.arange(len(sizes)), sizes)
    keys = rng.normal(size=(len(values), 4)).astype(np.float16)
    store = KNNDatastore(keys=keys, values=values)
    n = len(store)
    for fraction in (0.05, 0.1, 0.25, 0.5):
        small = cluster_prune(store, fraction, device="cpu")
        assert len(small) == round(n * fraction)  # 483 entries: 24, 48, 121, 242 (all >= 9 values)
        assert set(small.values.tolist()) == set(range(len(sizes)))  # every value keeps an entry
        assert int(small.counts.sum()) == n
        held = np.bincount(small.values, minlength=len(sizes))
        assert (held <= np.array(sizes)).all() and (held >= 1).all()
    # without keep_singletons the share is purely proportional: 24 entries at 5% leave the rare values out
    small = cluster_prune(store, 0.05, device="cpu", keep_singletons=False)
    assert len(small) == 24
    expected = np.floor(np.array(sizes) * 24 / n).astype(int)  # 14.9, 5.96, 2.24, 0.45, ... -> 14, 5, 2, 0, ...
    expected[np.argsort(-(np.array(sizes) * 24 / n - expected), kind="stable")[: 24 - expected.sum()]] += 1
    assert np.bincount(small.values, minlength=len(sizes)).tolist() == expected.tolist()
    assert 8 not in small.values.tolist()
    # more values than the target: one entry per value, with a warning
    with pytest.warns(UserWarning, match="9 distinct values need one entry each, more than the target of 5"):
        assert len(cluster_prune(store, 0.01, device="cpu")) == 9


def test_merged_counts_weight_the_knn_distribution():
    """A merged store with counts gives the same p_kNN as the full store when merged keys coincide."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8)).astype(np.float16)
    keys = np.concatenate([base, base[:5]])  # 5 exact duplicates with the same values
    values = np.concatenate([np.arange(20), np.arange(5)]) + 2
    full = KNNDatastore(keys=keys, values=values)
    merged = greedy_merge(full, num_neighbors=1, device="cpu")
    assert len(merged) == 20 and merged.counts.tolist() == [2] * 5 + [1] * 15
    q = torch.from_numpy(rng.normal(size=(4, 8)).astype(np.float32))
    from hf_realm.knn_generation import knn_log_probs

    # full store, k covering each duplicate pair == merged store with k halved on the duplicated part:
    # compare against all keys (k = all entries) to avoid cut-off effects
    d_full, i_full = full.search(q, len(full))
    d_m, i_m = merged.search(q, len(merged))
    lp_full = knn_log_probs(d_full, i_full, torch.from_numpy(full.values), 30, 2.0)
    lp_m = knn_log_probs(d_m, i_m, torch.from_numpy(merged.values), 30, 2.0, torch.from_numpy(merged.counts).log())
    torch.testing.assert_close(lp_m, lp_full, rtol=0, atol=1e-5)


def _store_with_singletons(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 5, n)
    values[:30] = np.arange(100, 130)  # 30 values held by one entry each
    rng.shuffle(values)
    keys = rng.normal(size=(n, 8)).astype(np.float16)
    return KNNDatastore(keys=keys, values=values)


@pytest.mark.parametrize("method", ["random", "confidence"])
def test_keep_singletons_never_drops_the_last_entry_of_a_value(method):
    store = _store_with_singletons()
    log_probs = np.random.default_rng(1).normal(size=len(store))
    kw = {"log_probs": log_probs} if method == "confidence" else {"seed": 3}
    all_values = set(store.values.tolist())
    plain = prune_datastore(store, method, 0.05, **kw)
    assert len(plain) == 100
    assert set(plain.values.tolist()) != all_values  # without the option some singletons go
    kept = prune_datastore(store, method, 0.05, keep_singletons=True, **kw)
    assert len(kept) == 100
    assert set(kept.values.tolist()) == all_values
    with pytest.warns(UserWarning, match="distinct values need one entry each"):
        tiny = prune_datastore(store, method, 0.01, keep_singletons=True, **kw)
    assert len(tiny) == len(all_values) and set(tiny.values.tolist()) == all_values


def test_random_prune_keeps_provenance_and_is_seeded():
    base = _store_with_singletons()
    prov = np.stack([np.arange(len(base)), np.arange(len(base)) % 7], 1)
    store = KNNDatastore(keys=base.keys, values=base.values, provenance=prov)
    a, b = random_prune(store, 0.25, seed=5), random_prune(store, 0.25, seed=5)
    assert len(a) == 500 and a.provenance.tolist() == b.provenance.tolist()
    rows = a.provenance[:, 0]
    assert len(set(rows.tolist())) == 500
    np.testing.assert_array_equal(a.keys, store.keys[rows])
    np.testing.assert_array_equal(a.values, store.values[rows])
    assert random_prune(store, 0.25, seed=6).provenance.tolist() != a.provenance.tolist()
    with pytest.raises(ValueError, match=r"`fraction` has to be in \(0, 1\], but is 0"):
        random_prune(store, 0)


def marian_store(tmp_path, num_pairs: int, target_len: int, seed: int):
    """A one-layer tiny Marian, its random pairs (sources of 6 tokens + eos) and the datastore of its random pairs."""
    model = tiny_marian(layers=1)
    rng = np.random.default_rng(seed)
    src = [rng.integers(2, 99, 6).tolist() + [1] for _ in range(num_pairs)]
    tgt = [rng.integers(2, 99, target_len).tolist() + [1] for _ in range(num_pairs)]
    store = KNNDatastore.build(model, datasets.Dataset.from_dict({"input_ids": src, "labels": tgt}), tmp_path / "d")
    return model, src, tgt, store, rng


def test_entry_log_probs_equal_teacher_forced_model_and_confidence_order(tmp_path):
    model, src, tgt, store, _ = marian_store(tmp_path, 5, 5, seed=0)
    lp = entry_model_log_probs(store, model, device="cpu")
    ref = []
    for s, t in zip(src, tgt, strict=True):
        logits = model(torch.tensor([s]), decoder_input_ids=torch.tensor([[0] + t[:-1]])).logits[0]
        ref.extend(torch.log_softmax(logits.double(), -1)[torch.arange(len(t)), torch.tensor(t)].tolist())
    # keys are float16: the log-probs are those of the rounded states
    np.testing.assert_allclose(lp, ref, atol=5e-3)
    pruned = confidence_prune(store, 0.4, model=model)
    order = np.argsort(lp, kind="stable")[: len(pruned)]
    assert pruned.provenance.tolist() == store.provenance[np.sort(order)].tolist()


def test_pca_keeps_neighbour_order_on_low_rank_data():
    # keys vary in 4 of 32 coordinates around a constant offset (a 4-d affine subspace, exact in float16), sparse
    # enough that the 6 nearest distances of every query are separated by far more than float16 rounding
    rng = np.random.default_rng(0)
    dims = np.array([3, 11, 17, 29])
    offset = np.round(rng.normal(size=32) * 3 * 8) / 8
    keys = np.tile(offset, (400, 1))
    keys[:, dims] += rng.normal(size=(400, 4)) * [4.0, 3.0, 2.0, 1.0]
    keys = keys.astype(np.float16)
    store = KNNDatastore(keys=keys, values=rng.integers(0, 50, 400))
    small = pca_compress(store, 4, device="cpu")
    assert small.key_dim == 4 and small.input_dim == 32
    assert small.metadata["history"][-1]["explained_variance"] > 0.9999
    q = np.tile(offset, (300, 1))
    q[:, dims] += rng.normal(size=(300, 4)) * 2
    ref = np.sort(((q[:, None] - keys.astype(np.float64)[None]) ** 2).sum(-1), 1)[:, :6]
    q = q[np.diff(ref, axis=1).min(1) > 0.02]  # queries whose 6 nearest keys are well separated
    assert len(q) >= 30
    q = torch.from_numpy(q.astype(np.float32))
    d_full, i_full = store.search(q, 5)
    d_pca, i_pca = small.search(q, 5)
    assert i_pca.tolist() == i_full.tolist()
    np.testing.assert_allclose(d_pca.numpy(), d_full.numpy(), rtol=0, atol=1e-2)  # keys re-rounded to fp16
    # on data that is not low-rank, 4 of 32 dims do not keep the order (the test can fail)
    noisy = KNNDatastore(keys=rng.normal(size=(400, 32)).astype(np.float16), values=store.values)
    qn = torch.from_numpy(rng.normal(size=(len(q), 32)).astype(np.float32))
    assert pca_compress(noisy, 4, device="cpu").search(qn, 5)[1].tolist() != noisy.search(qn, 5)[1].tolist()
    # composed PCA (32 -> 8 -> 4) equals the direct one on this data
    twice = pca_compress(pca_compress(store, 8, device="cpu"), 4, device="cpu")
    assert twice.input_dim == 32
    assert twice.search(q, 5)[1].tolist() == i_full.tolist()


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 3)) * 20
    labels = rng.integers(0, 6, 600)
    x = torch.from_numpy(centers[labels] + rng.normal(size=(600, 3)) * 0.1).float()
    centroids, assign = kmeans(x, 6, iters=20, seed=0)
    # the partition equals the true one up to renaming
    pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
    assert len(pairs) == 6
    np.testing.assert_allclose(np.sort(centroids.numpy(), 0), np.sort(centers, 0), atol=0.1)


def test_pq_codes_and_search_match_numpy():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(1500, 16)).astype(np.float16)
    store = KNNDatastore(keys=keys, values=rng.integers(0, 50, 1500))
    pq = pq_compress(store, m=4, nbits=6, device="cpu")
    codes, codebooks = pq.pq["codes"], pq.pq["codebooks"]
    assert codes.shape == (1500, 4) and codebooks.shape == (4, 64, 4)
    # every code is the nearest centroid of its sub-vector
    sub = keys.astype(np.float64).reshape(1500, 4, 4)
    d = ((sub[:, :, None, :] - codebooks[None].astype(np.float64)) ** 2).sum(-1)
    best = d.min(-1)
    chosen = np.take_along_axis(d, codes[:, :, None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-5)
    # the search is exact over the reconstructions
    recon = pq_decode(torch.from_numpy(codes), torch.from_numpy(codebooks)).double().numpy()
    q = rng.normal(size=(7, 16))
    dist = ((q[:, None] - recon[None]) ** 2).sum(-1)
    ref = np.argsort(dist, 1, kind="stable")[:, :5]
    sq, ids = pq.search(torch.from_numpy(q).float(), 5)
    assert ids.tolist() == ref.tolist()
    np.testing.assert_allclose(sq.numpy(), np.take_along_axis(dist, ref, 1), rtol=1e-4)
    report = compression_report(store, pq)
    assert report["bytes"] == 1500 * 4 + codebooks.nbytes + store.values.nbytes
    assert report["compression"] == (1500 * 16 * 2 + store.values.nbytes) / report["bytes"]


def test_prune_then_pca_then_pq_roundtrip_and_generate(tmp_path):
    model, src, _, store, rng = marian_store(tmp_path, 60, 6, seed=1)
    small = pq_compress(pca_compress(random_prune(store, 0.5), 16, device="cpu"), m=4, nbits=5, device="cpu")
    path = small.save_pretrained(tmp_path / "small")
    loaded = KNNDatastore.from_pretrained(path)
    assert [h["method"] for h in loaded.metadata["history"]] == ["random", "pca", "pq"]
    assert loaded.nbytes == small.nbytes and loaded.input_dim == 32 and loaded.key_dim == 16
    np.testing.assert_array_equal(loaded.pq["codes"], small.pq["codes"])
    q = torch.from_numpy(rng.normal(size=(3, 32)).astype(np.float32))
    assert loaded.search(q, 4)[1].tolist() == small.search(q, 4)[1].tolist()
    proc = KNNLogitsProcessor(loaded, k=4, temperature=5.0, lmbda=0.5)
    with proc.attach(model):  # the metadata (model fingerprint) survives pruning and compression
        out = model.generate(torch.tensor(src[:2]), max_new_tokens=4, logits_processor=LogitsProcessorList([proc]))
    assert out.shape[0] == 2 and proc.num_searches > 0


def test_shrink_spec_parsing_and_errors():
    assert parse_shrink_spec("cluster@0.25+pca64+pq16") == [("cluster", 0.25), ("pca", 64), ("pq", 16)]
    assert parse_shrink_spec("cluster0.25+pca64") == [("cluster", 0.25), ("pca", 64)]  # the benchmark's old names
    assert parse_shrink_spec("greedy_merge_mean@0.1") == [("greedy_merge_mean", 0.1)]
    with pytest.raises(ValueError, match="unknown step 'pcb8' in 'random@0.5\\+pcb8'"):
        parse_shrink_spec("random@0.5+pcb8")
    for spec in ("pq8+cluster@0.5", "pq8+pca4", "pq8+pq4"):
        with pytest.raises(ValueError, match="pq has to be the last step"):
            parse_shrink_spec(spec)
    with pytest.raises(ValueError, match="unknown step 'random@0.2.5'"):
        parse_shrink_spec("random@0.2.5")
    with pytest.raises(ValueError, match="has to be in \\(0, 1\\], but is 1.5"):
        parse_shrink_spec("random@1.5")


def test_shrink_datastore_equals_the_steps_applied_by_hand():
    rng = np.random.default_rng(0)
    store = KNNDatastore(keys=rng.normal(size=(600, 16)).astype(np.float16), values=rng.integers(0, 6, 600),
                         provenance=np.stack([np.arange(600), np.zeros(600, int)], 1))  # fmt: skip
    by_hand = pq_compress(pca_compress(random_prune(store, 0.5, seed=3), 8, seed=3, device="cpu"), 4, seed=3,
                          device="cpu")  # fmt: skip
    chained = shrink_datastore(store, "random@0.5+pca8+pq4", seed=3, device="cpu")
    np.testing.assert_array_equal(chained.pq["codes"], by_hand.pq["codes"])
    np.testing.assert_array_equal(chained.values, by_hand.values)
    np.testing.assert_array_equal(chained.provenance, by_hand.provenance)
    merged = shrink_datastore(store, "greedy_merge_mean@0.5", num_neighbors=4, device="cpu")
    reused = shrink_datastore(store, "greedy_merge_mean@0.5", num_neighbors=4, device="cpu",
                              merges=greedy_merge_sequence(store, 4, device="cpu"))  # fmt: skip
    expected = greedy_merge(store, 4, fraction=0.5, merged_keys="mean", device="cpu")
    for got in (merged, reused):
        np.testing.assert_array_equal(got.keys, expected.keys)
        np.testing.assert_array_equal(got.counts, expected.counts)
    log_probs = rng.normal(size=600)
    conf = shrink_datastore(store, "confidence@0.25", log_probs=log_probs, keep_singletons=True)
    np.testing.assert_array_equal(
        conf.provenance, confidence_prune(store, 0.25, log_probs=log_probs, keep_singletons=True).provenance
    )
