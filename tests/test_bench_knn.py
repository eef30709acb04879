"""`benchmarks/bench_knn.py` on the CPU with a tiny model: several search configs on one store, the PCA layout, and
the recall it reports checked against a float64 brute force of the same store."""

import numpy as np
import pytest
import torch

from .test_knn_generation import _load_script


TINY = ["--batch_size", "2", "--num_beams", "2", "--new_tokens", "3", "--device", "cpu", "--d_model", "16",
        "--layers", "1", "--vocab_size", "50", "--repeats", "2", "--k", "4"]  # fmt: skip


def test_configs_on_one_store_with_their_recall(tmp_path):
    bench = _load_script("benchmarks/bench_knn.py")
    out = tmp_path / "bench.json"
    result = bench.main(["--sizes", "600", "--key_dim", "8", "--configs", "torch;torch:rescore=0;torch-ivf:nlist=8,nprobe=2",
                         "--output", str(out), *TINY])  # fmt: skip
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["torch", "torch:rescore=False", "torch-ivf:nlist=8,nprobe=2"]
    assert all(r["entries"] == 600 and r["key_dim"] == 8 and len(r["ratios"]) == 2 for r in rows)
    assert rows[0]["recall_vs_exact"] == 1.0 and rows[1]["recall_vs_exact"] == 1.0  # fp32 on the CPU: lossless

    # The IVF recall is the share of a float64 brute force's top k that the IVF search returns, on the same queries.
    store = bench.random_store(600, 16, 50, torch.device("cpu"), key_dim=8, seed=0)
    matrix = store.projection["matrix"]
    assert np.allclose(matrix.T @ matrix, np.eye(8), atol=1e-5)  # orthonormal columns, as PCA's
    store.build_index(bench.parse_configs("torch-ivf:nlist=8,nprobe=2", "cpu")[0], device="cpu")
    queries = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    _, got = store.search(queries, 4)
    q = store.project(queries).double().numpy()
    keys = store.keys.astype(np.float64)
    want = np.argsort(((q[:, None] - keys[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :4]
    recall = np.mean([len(set(g) & set(w)) / 4 for g, w in zip(got.tolist(), want.tolist(), strict=True)])
    from hf_realm.search import TorchSearchConfig, ivf_recall

    exact = TorchSearchConfig(device="cpu").build(store.keys, metric="l2")
    assert 0.5 < recall < 1  # approximate here: 2 of 8 lists read
    assert ivf_recall(store._search_backend(torch.device("cpu")), exact, store.project(queries), 4) == recall
    assert out.is_file()


def test_bad_configs_are_named():
    bench = _load_script("benchmarks/bench_knn.py")
    with pytest.raises(ValueError, match="unknown search backend 'torch-hnsw'"):
        bench.parse_configs("torch;torch-hnsw", "cpu")
    with pytest.raises(ValueError, match="'nprobes=4' in --configs"):
        bench.parse_configs("torch-ivf:nprobes=4", "cpu")
    assert bench.parse_configs("torch:rescore=0", "cpu")[0].rescore is False


def test_profile_ivf_union_counts_the_keys_of_the_probed_lists(tmp_path):
    """`benchmarks/profile_ivf_union.py`: the union it times holds exactly the keys whose nearest centroid (float64) is
    among some query's ``nprobe`` nearest centroids (float64), and the IVF search it times returns the float64 top k
    when every list is read."""
    prof = _load_script("benchmarks/profile_ivf_union.py")
    out = tmp_path / "profile.json"
    result = prof.main(["--num_keys", "3000", "--dim", "8", "--queries", "6", "--k", "4", "--nprobe", "3",
                        "--repeats", "1", "--variants", "nprobe=100000", "--device", "cpu", "--output", str(out)])  # fmt: skip
    assert out.is_file() and result["nlist"] == round(4 * 3000**0.5) and result["nprobe"] == 3
    assert [s["stage"] for s in result["stages"]][:2] == ["whole search", "probe (centroid scores, top nprobe)"]
    # the same keys and queries as the script (seeded), and the same lists (the build is seeded)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 8, generator=gen)
    queries = torch.randn(6, 8, generator=gen)
    from hf_realm.search import IVFSearchConfig

    ivf = IVFSearchConfig(nprobe=3, scan="union", device="cpu").build(keys, metric="l2")
    c = ivf.centroids.double()
    nearest = torch.cdist(keys.double(), c).argmin(1)
    probed = torch.cdist(queries.double(), c).topk(3, largest=False).indices.unique()
    assert result["union_lists"] == probed.numel()
    assert result["union_keys"] == int(torch.isin(nearest, probed).sum())
    # every list read: the float64 brute force
    every = IVFSearchConfig(nprobe=100000, scan="union", device="cpu").build(keys, metric="l2")
    want = torch.cdist(queries.double(), keys.double()).topk(4, largest=False).indices
    assert torch.equal(every.search(queries, 4)[1], want) and result["variants"][0]["change"] == "nprobe=100000"


def test_bench_knn_build_times_the_build_against_a_forward_pass(tmp_path):
    from hf_realm import KNNDatastore, hub_io

    bench = _load_script("benchmarks/bench_knn_build.py")
    commit, load = hub_io.Staging.commit, KNNDatastore.from_pretrained
    result = bench.main(["--num_examples", "12", "--length", "5", "--batch_size", "4", "--d_model", "16", "--layers",
                         "1", "--vocab_size", "50", "--device", "cpu", "--dtype", "float32", "--repeats", "2",
                         "--output", str(tmp_path / "build.json")])  # fmt: skip
    assert result["entries"] == 60 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["ratio"] == row["forward_seconds"] / row["build_seconds"]
        assert 0 < row["commit_seconds"] + row["load_seconds"] < row["build_seconds"]
    assert result["best"]["ratio"] == pytest.approx(
        max(r["build_tokens_per_s"] for r in result["rows"]) / max(r["forward_tokens_per_s"] for r in result["rows"])
    )
    # the timers are gone after the run
    assert hub_io.Staging.commit is commit and KNNDatastore.from_pretrained == load
