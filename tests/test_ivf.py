"""The IVF backend (`"torch-ivf"`) against float64 brute force: all lists read = exact search; fewer lists = the exact
top k of the keys in the probed lists (lists and probes recomputed here in float64 from the trained centroids)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_realm import KNNDatastore
from hf_realm.search import BACKENDS, IVFSearchConfig, TorchSearchConfig, backend_config, ivf_recall, triton_available

from .conftest import subprocess_env


def data(n=3000, d=24, q=40, seed=0, spread=3.0):
    """Keys and queries around 30 centres (``spread=0``: one Gaussian, where probing few lists misses neighbours)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(30, d, generator=g) * spread
    keys = centers[torch.randint(0, 30, (n,), generator=g)] + torch.randn(n, d, generator=g)
    queries = centers[torch.randint(0, 30, (q,), generator=g)] + torch.randn(q, d, generator=g)
    return keys, queries


def brute_force(keys, queries, k, metric, allowed=None):
    """float64 top k (ties by id) over the keys, or per query over the keys ``allowed[row]`` (a bool mask)."""
    kd, qd = keys.double(), queries.double()
    if metric == "inner_product":
        score = qd @ kd.T
    else:
        score = -((qd[:, None, :] - kd[None]) ** 2).sum(-1)
    if allowed is not None:
        score = score.masked_fill(~allowed, float("-inf"))
    ids = np.stack([np.lexsort((np.arange(len(keys)), -row)) for row in score.numpy()])[:, :k]
    best = np.take_along_axis(score.numpy(), ids, 1)
    return (best if metric == "inner_product" else -best), ids


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_lists_read_is_an_exact_search(metric, dtype):
    keys, queries = data()
    keys = keys.to(dtype)
    backend = IVFSearchConfig(nlist=25, nprobe=25, device="cpu", dtype=dtype).build(keys, metric=metric)
    scores, ids = backend.search(queries, 10)
    want_scores, want_ids = brute_force(keys.float(), queries, 10, metric)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_few_lists_give_the_exact_top_k_of_the_probed_lists(metric):
    keys, queries = data(seed=1, spread=0.0)
    backend = IVFSearchConfig(nlist=40, nprobe=3, device="cpu").build(keys, metric=metric)
    c = backend.centroids.double()
    # every key sits in the list of its nearest centroid (L2), and a query reads its best 3 lists by the metric
    lists = (-((keys.double()[:, None] - c[None]) ** 2).sum(-1)).argmax(1)
    coarse = queries.double() @ c.T
    if metric == "l2":
        coarse = coarse - 0.5 * (c**2).sum(-1)
    probed = coarse.topk(3, dim=1).indices
    assert torch.equal(backend.probe(queries), probed)
    allowed = (lists[None, :, None] == probed[:, None, :]).any(-1)
    scores, ids = backend.search(queries, 10)
    want_scores, want_ids = brute_force(keys, queries, 10, metric, allowed)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-6, atol=1e-5)
    exact = TorchSearchConfig(device="cpu").build(keys, metric=metric)
    recall = ivf_recall(backend, exact, queries, 10)
    _, exact_ids = brute_force(keys, queries, 10, metric)
    assert recall == pytest.approx(
        np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.numpy(), exact_ids, strict=True)])
    )
    assert 0.3 < recall < 1.0  # a real approximation, measured


def test_fewer_keys_than_k_in_the_probed_lists_are_padded():
    keys, queries = data(n=400, seed=2)
    backend = IVFSearchConfig(nlist=100, nprobe=1, device="cpu").build(keys, metric="l2")
    k = int(backend.list_sizes.max()) + 3  # more than any single list holds
    scores, ids = backend.search(queries, k)
    found = (ids >= 0).sum(1)
    assert torch.equal(found, backend.list_sizes[backend.probe(queries)[:, 0]])
    for row in range(len(queries)):
        n = int(found[row])
        assert (ids[row, n:] == -1).all() and torch.isinf(scores[row, n:]).all()
        assert (scores[row, 1:n] >= scores[row, : n - 1]).all()  # ascending distances


def test_seeded_and_registered():
    keys, queries = data(n=1000, seed=3)
    a = IVFSearchConfig(nlist=16, nprobe=2, device="cpu", seed=5).build(keys, metric="l2")
    b = backend_config("torch-ivf", nlist=16, nprobe=2, device="cpu", seed=5).build(keys, metric="l2")
    assert BACKENDS["torch-ivf"] is IVFSearchConfig
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.search(queries, 5)[1], b.search(queries, 5)[1])
    c = IVFSearchConfig(nlist=16, nprobe=2, device="cpu", seed=6).build(keys, metric="l2")
    assert not torch.equal(a.centroids, c.centroids)
    with pytest.raises(ValueError, match="nlist must be in"):
        IVFSearchConfig(nlist=2000, device="cpu").build(keys)
    with pytest.raises(ValueError, match="NaN or inf"):
        IVFSearchConfig(nlist=4, device="cpu").build(torch.full((10, 3), float("nan")))


def test_a_datastore_searched_through_ivf():
    keys, queries = data(n=2000, d=16, seed=4)
    values = np.arange(2000) % 50
    store = KNNDatastore(keys=keys.numpy().astype(np.float16), values=values, provenance=np.zeros((2000, 2), int))
    store.build_index("torch-ivf", device="cpu", nlist=20, nprobe=20)
    sqdist, ids = store.search(queries, 8)
    want, want_ids = brute_force(torch.from_numpy(store.keys.astype(np.float32)), queries, 8, "l2")
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(sqdist.numpy(), want, rtol=1e-5, atol=1e-4)
    store.build_index("torch-ivf", device="cpu", nlist=200, nprobe=1)
    with pytest.raises(RuntimeError, match="IVFBackend index returned fewer than 40 neighbours.*nprobe \\(now 1\\)"):
        store.search(queries, 40)  # a wrong id (-1) would read the last entry's value: refused
    _, ids = store.search(queries, 40, check_found=False)  # the processor's way on GPUs: -1 returned, flagged
    assert bool((ids == -1).any())
    from hf_realm import KNNLogitsProcessor

    processor = KNNLogitsProcessor(store, k=40)
    full = store.search(queries, 1)[1]  # every list holds a key: all found
    processor._flag_missing(full)  # nothing missing in these: the check passes
    processor._check_finite()
    processor._flag_missing(ids)
    processor._flag_missing(full)  # flags accumulate until the check
    with pytest.raises(RuntimeError, match="IVFBackend index returned fewer than 40 neighbours.*nprobe \\(now 1\\)"):
        processor._check_finite()
    processor._check_finite()  # the flag was consumed
    store.build_index("torch", device="cpu")
    processor._flag_missing(ids)  # an exact index always finds k: nothing to flag
    assert processor._missing is None


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_union_scan_is_the_exact_top_k_of_the_batch_lists(metric):
    """`scan="union"`: every query searched over the keys of all lists the batch probes (float64 brute force over
    those keys); a superset of its own lists, so its recall is at least the per-query scan's; all lists = exact."""
    keys, queries = data(seed=4, spread=0.0)
    union = IVFSearchConfig(nlist=40, nprobe=2, device="cpu", scan="union").build(keys, metric=metric)
    per_query = IVFSearchConfig(nlist=40, nprobe=2, device="cpu").build(keys, metric=metric)
    assert torch.equal(union.centroids, per_query.centroids)  # same seeded lists
    batch = queries[:6]
    probed = union.probe(batch)
    c = union.centroids.double()
    lists_of_key = (-((keys.double()[:, None] - c[None]) ** 2).sum(-1)).argmax(1)  # each key's list (nearest, L2)
    allowed = torch.isin(lists_of_key, probed.flatten()).expand(len(batch), -1)
    assert 0 < int(allowed[0].sum()) < len(keys)
    scores, ids = union.search(batch, 10)
    want_scores, want_ids = brute_force(keys, batch, 10, metric, allowed)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-6, atol=1e-5)
    exact = TorchSearchConfig(device="cpu").build(keys, metric=metric)
    assert ivf_recall(union, exact, batch, 10) >= ivf_recall(per_query, exact, batch, 10)
    # measured one query at a time, the union scan reads just each query's lists: the per-query recall
    assert ivf_recall(union, exact, batch, 10, batch_size=1) == ivf_recall(per_query, exact, batch, 10)
    # one query alone reads just its own lists: the per-query answer; so does a batch split down to single queries
    for row in range(3):
        np.testing.assert_array_equal(
            union.search(batch[row : row + 1], 10)[1], per_query.search(batch[row : row + 1], 10)[1]
        )
    tiny = IVFSearchConfig(nlist=40, nprobe=2, device="cpu", scan="union", max_gather_bytes=1).build(
        keys, metric=metric
    )
    np.testing.assert_array_equal(tiny.search(batch, 10)[1], per_query.search(batch, 10)[1])
    everything = IVFSearchConfig(nlist=40, nprobe=40, device="cpu", scan="union").build(keys, metric=metric)
    np.testing.assert_array_equal(everything.search(batch, 10)[1].numpy(), brute_force(keys, batch, 10, metric)[1])


def test_union_scan_pads_and_refuses_unknown_scans():
    keys, queries = data(n=400, seed=2)
    backend = IVFSearchConfig(nlist=100, nprobe=1, device="cpu", scan="union").build(keys, metric="l2")
    one = queries[:1]
    k = int(backend.list_sizes[backend.probe(one)[0, 0]]) + 2  # more than its one list holds
    scores, ids = backend.search(one, k)
    assert (ids[0, -2:] == -1).all() and torch.isinf(scores[0, -2:]).all() and (ids[0, :-2] >= 0).all()
    with pytest.raises(ValueError, match="scan must be 'query' or 'union', got 'all'"):
        IVFSearchConfig(nlist=4, device="cpu", scan="all").build(keys, metric="l2")
    assert backend_config(IVFSearchConfig(scan="union").to_dict()).scan == "union"


def _self_recall_reference(backend, keys, k, num_queries, seed=0, batch_size=None):
    """The recall `self_recall` should report: the IVF answers for the sampled keys (searched ``batch_size`` at a time)
    against a float64 brute force, each query's own entry left out of both."""
    rows = np.sort(np.random.default_rng(seed).choice(len(keys), size=num_queries, replace=False))
    queries = keys[torch.from_numpy(rows)].to(backend.device)
    step = batch_size or num_queries
    got = torch.cat([backend.search(queries[i : i + step], k + 1)[1].cpu() for i in range(0, num_queries, step)])
    want = brute_force(keys, keys[torch.from_numpy(rows)], k + 1, "l2")[1]
    hits = 0
    for g, w, own in zip(got.tolist(), want.tolist(), rows.tolist(), strict=True):
        hits += len({x for x in g if x != own and x >= 0} & set([x for x in w if x != own][:k]))
    return hits / (k * num_queries)


def test_self_recall_and_nprobe_tuning_against_float64():
    from hf_realm.search import self_recall, tune_nprobe

    keys, _ = data(n=2000, d=8, spread=0.0)  # no clusters: few lists miss neighbours
    backend = IVFSearchConfig(nlist=64, nprobe=1, device="cpu").build(keys, metric="l2")
    want = _self_recall_reference(backend, keys, 10, 100)
    assert self_recall(backend, k=10, num_queries=100, batch_size=7) == want and want < 0.9
    found = tune_nprobe(backend, target=0.95, k=10, num_queries=100)
    # doubled from 1 until the recall (measured each time, float64 reference) reached the target
    assert [n for n, _ in found["tried"]] == [2**i for i in range(len(found["tried"]))]
    assert found["tried"][-2][1] < 0.95 <= found["recall"] and found["nprobe"] == backend.config.nprobe
    assert found["recall"] == _self_recall_reference(backend, keys, 10, 100)
    capped = tune_nprobe(IVFSearchConfig(nlist=64, nprobe=1, device="cpu").build(keys, metric="l2"), max_nprobe=2)
    assert capped["nprobe"] == 2 and capped["recall"] < capped["target"]  # stopped at the cap, below the target
    with pytest.raises(ValueError, match=r"target recall must be in \(0, 1\], got 1.5"):
        tune_nprobe(backend, target=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_union_scan_on_cuda_reads_the_lists_in_place(metric, monkeypatch):
    """`read_in_place`: on a GPU the fused kernel reads the probed lists where they are stored (no gathered copy of
    their keys); the answers are still a float64 brute force's over the keys of the batch's lists."""
    from hf_realm.search import exact

    cut = []
    real = exact._range_buckets
    monkeypatch.setattr(exact, "_range_buckets", lambda *a: cut.append(a[2]) or real(*a))
    keys, queries = data(n=20000, d=32, q=16, seed=5, spread=0.0)
    union = IVFSearchConfig(nlist=100, nprobe=3, device="cuda", scan="union", read_in_place=True).build(
        keys, metric=metric
    )
    assert union.keys.dtype == torch.float16
    probed = union.probe(queries).cpu()
    allowed = torch.isin(_stored_lists(union), probed.flatten()).expand(len(queries), -1)
    assert 0 < int(allowed[0].sum()) < len(keys)
    scores, ids = union.search(queries.cuda(), 10)
    assert cut  # the in-place path ran
    want_scores, want_ids = brute_force(keys, queries, 10, metric, allowed)
    np.testing.assert_array_equal(ids.cpu().numpy(), want_ids)
    np.testing.assert_allclose(scores.cpu().numpy(), want_scores, rtol=1e-5, atol=1e-4)


# The Triton interpreter must be on before triton is imported: the in-place cases run in a subprocess.
_IN_PLACE_CASES = textwrap.dedent(
    """
    import json, sys
    import torch
    from hf_realm.search import IVFSearchConfig, ivf
    from tests.test_ivf import data

    ivf._triton_eligible = lambda *a: True  # the fused kernel on CPU tensors runs in Triton's interpreter
    calls = []
    real = ivf.IVFBackend._search_union_in_place
    ivf.IVFBackend._search_union_in_place = lambda self, *a: calls.append(1) or real(self, *a)
    ivf._disable_triton = lambda err: (_ for _ in ()).throw(err)  # a failure of the fast path must not hide here
    out = []
    for case in json.loads(sys.argv[1]):
        keys, queries = data(n=case["n"], d=16, q=case["q"], seed=case["seed"], spread=0.0)
        backend = IVFSearchConfig(nlist=case["nlist"], nprobe=case["nprobe"], device="cpu", scan="union",
                                  read_in_place=True).build(keys, metric=case["metric"])
        before = len(calls)
        scores, ids = backend.search(queries, case["k"])
        out.append({"scores": scores.tolist(), "ids": ids.tolist(), "ran": len(calls) - before})
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_union_scan_read_in_place_without_host_sync_against_float64():
    """`read_in_place=True` (CUDA, here the same kernel in Triton's interpreter): the probed lists, repeats included,
    go to the fused kernel as row ranges sized by the largest lists (no ``unique``, no size read back). Same answers as
    the gathered union scan, and both are the float64 brute force over the keys of the batch's lists; a union with
    fewer rows than the re-ranked candidates pads with id -1, as the gathered scan does."""
    cases = [
        # many queries probing the same lists (repeats become empty ranges), lists of several 128/256-row buckets
        {"seed": 6, "n": 3000, "q": 24, "nlist": 6, "nprobe": 2, "k": 10, "metric": "l2"},
        {"seed": 7, "n": 3000, "q": 9, "nlist": 40, "nprobe": 3, "k": 5, "metric": "inner_product"},
        # one query, one list of a few rows: fewer rows than rerank * k (and than k): padded
        {"seed": 8, "n": 300, "q": 1, "nlist": 100, "nprobe": 1, "k": 12, "metric": "l2"},
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _IN_PLACE_CASES, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=subprocess_env(TRITON_INTERPRET="1"),
        timeout=600,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, res in zip(cases, results, strict=True):
        assert res["ran"] == 1, case  # the in-place path answered
        keys, queries = data(n=case["n"], d=16, q=case["q"], seed=case["seed"], spread=0.0)
        gathered = IVFSearchConfig(nlist=case["nlist"], nprobe=case["nprobe"], device="cpu", scan="union").build(
            keys, metric=case["metric"]
        )
        want_scores, want_ids = gathered.search(queries, case["k"])
        np.testing.assert_array_equal(np.array(res["ids"]), want_ids.numpy(), err_msg=str(case))
        np.testing.assert_allclose(np.array(res["scores"]), want_scores.numpy(), rtol=1e-6, err_msg=str(case))
        allowed = torch.isin(_stored_lists(gathered), gathered.probe(queries).flatten()).expand(len(queries), -1)
        ref_scores, ref_ids = brute_force(keys, queries, case["k"], case["metric"], allowed)
        rows = int(allowed[0].sum())
        if rows < case["k"]:  # the padded case: the brute force's -inf tail is the -1 tail
            assert (want_ids.numpy()[:, rows:] == -1).all(), case
            ref_ids, ref_scores = ref_ids[:, :rows], ref_scores[:, :rows]
        np.testing.assert_array_equal(want_ids.numpy()[:, : ref_ids.shape[1]], ref_ids, err_msg=str(case))


def _stored_lists(backend) -> torch.Tensor:
    """The list of every key id, as the backend stored it (lists are contiguous runs of stored rows)."""
    owner = torch.repeat_interleave(torch.arange(backend.nlist), backend.list_sizes.cpu())
    out = torch.empty_like(owner)
    out[backend.ids.cpu()] = owner
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scan", ["query", "union"])
def test_datastore_ivf_recall_on_cuda_against_float64(scan):
    """The GPU path of the tuned IVF build: keys, lists and queries on the device, reference on the CPU in float64."""
    keys, _ = data(n=20000, d=32, spread=0.0)
    store = KNNDatastore(keys=keys.half().numpy(), values=np.arange(20000, dtype=np.int32) % 50)
    store.build_index("torch-ivf", device="cuda", nlist=128, nprobe=1, scan=scan, target_recall=0.9)
    recall = store.index_recall
    assert store._backend.device.type == "cuda" and recall["nprobe"] > 1 and recall["recall"] >= 0.9
    exact_keys = torch.from_numpy(store.keys.astype(np.float32))
    # a union scan's answers depend on the batch (the lists of all its queries are read): self_recall's batches of 128
    want = _self_recall_reference(store._backend, exact_keys, 16, 256, batch_size=128)
    assert abs(recall["recall"] - want) <= 1 / (16 * 256)  # one near-tie ranked apart by fp32 (device) vs float64


def test_datastore_ivf_reports_its_recall_and_tunes_nprobe(caplog):
    from hf_realm.knn_datastore import AUTO_IVF_MIN_KEYS, auto_index_name

    keys, _ = data(n=2000, d=8, spread=0.0)
    store = KNNDatastore(keys=keys.half().numpy(), values=np.arange(2000, dtype=np.int32) % 50)
    with caplog.at_level("INFO", logger="hf_realm.knn_datastore"):
        store.build_index("torch-ivf", device="cpu", nlist=64, nprobe=1, target_recall=0.95)
    recall = store.index_recall
    assert recall["recall"] >= 0.95 and store.search_config.nprobe == recall["nprobe"] > 1
    assert recall["k"] == 16 and recall["queries"] == 256 and "recall@16" in caplog.text
    exact_keys = torch.from_numpy(store.keys.astype(np.float32))
    assert recall["recall"] == _self_recall_reference(store._backend, exact_keys, 16, 256)
    store.build_index("torch-ivf", device="cpu", nlist=64, nprobe=2)  # measured, not tuned
    assert store.index_recall["nprobe"] == 2 and store.index_recall["target"] is None
    store.build_index("torch", device="cpu")
    assert store.index_recall is None
    with pytest.raises(ValueError, match="target_recall applies to index_type='torch-ivf', got 'torch'"):
        store.build_index("torch", device="cpu", target_recall=0.9)
    # the same with a config object in place of a name
    from hf_realm.search import IVFSearchConfig, TorchSearchConfig

    store.build_index(IVFSearchConfig(nlist=64, nprobe=1, device="cpu"), device="cpu", target_recall=0.95)
    assert store.index_recall["recall"] >= 0.95 and store.index_recall["target"] == 0.95
    store.build_index(IVFSearchConfig(nlist=64, nprobe=2, device="cpu"), device="cpu")
    assert store.index_recall["nprobe"] == 2 and store.index_recall["target"] is None
    with pytest.raises(ValueError, match="target_recall applies to a torch-ivf search, got 'torch'"):
        store.build_index(TorchSearchConfig(), device="cpu", target_recall=0.9)
    # "auto": by size and memory
    gib = 2**30
    assert auto_index_name(AUTO_IVF_MIN_KEYS, AUTO_IVF_MIN_KEYS * 256, "cuda", 100 * gib) == "torch"
    assert auto_index_name(AUTO_IVF_MIN_KEYS + 1, (AUTO_IVF_MIN_KEYS + 1) * 256, "cuda", 100 * gib) == "torch-ivf"
    assert auto_index_name(10**8, 10**8 * 1024, "cuda", 100 * gib) == "faiss-ivfpq"  # 102 GB of keys: no room
    assert auto_index_name(2_000_000, 2_000_000 * 256, "cpu") == "torch"
    assert auto_index_name(2_000_001, 2_000_001 * 256, "cpu") == "faiss-ivfpq"
