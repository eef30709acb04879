"""A key set split across processes (`"sharded"`): one process equals the inner backend; two processes under
`accelerate launch` (gloo, CPU) hold half the keys each and return, on both, the ids of one exact search over all of
them, in a direct search and inside `generate()`; a datastore built by two processes equals the 1-process build."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from hf_realm import KNNDatastore
from hf_realm.search import BACKENDS, ShardedSearchConfig, TorchSearchConfig, backend_config
from hf_realm.search.sharded import merge_best

from .conftest import ACCELERATE_LAUNCHER, free_port, needs_accelerate, subprocess_env, tiny_marian
from .scripts.sharded_knn_worker import run
from .test_knn_generation import random_pairs, random_store


WORKER = os.path.join(os.path.dirname(__file__), "scripts", "sharded_knn_worker.py")


def brute_force_l2(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d = ((queries.astype(np.float64)[:, None] - keys.astype(np.float64)[None]) ** 2).sum(-1)
    return np.stack([np.lexsort((np.arange(len(keys)), row)) for row in d])[:, :k]


def test_simulated_shards_merge_to_the_exact_search():
    """Each process's shard searched on its own, then the merge the backend does after its all-gather."""
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(101, 8, generator=g), torch.randn(9, 8, generator=g)
    parts = []
    for rank in range(3):
        backend = ShardedSearchConfig(inner="torch", process_index=rank, num_processes=3).build(keys, metric="l2")
        assert backend.inner.num_keys == [34, 34, 33][rank] and backend.num_keys == 101
        parts.append(backend.search_local(queries, 7))  # this shard's best 7, with global ids
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        backend.search(queries, 7)  # shard 2 of 3 alone would be a wrong answer
    dist, ids = merge_best(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 7, "l2")
    # the shards live on CUDA when there is one
    np.testing.assert_array_equal(ids.cpu().numpy(), brute_force_l2(keys.numpy(), queries.numpy(), 7))
    small = ShardedSearchConfig(inner="torch", process_index=1, num_processes=2).build(keys[:9], metric="l2")
    d, i = small.search_local(queries, 7)  # 4 keys in this shard: padded
    assert (i[:, 4:] == -1).all() and torch.isinf(d[:, 4:]).all() and (i[:, :4] >= 5).all()
    one = backend_config("sharded", inner={"name": "torch", "device": "cpu"}).build(keys, metric="l2")
    np.testing.assert_array_equal(one.search(queries, 7)[1].numpy(), brute_force_l2(keys.numpy(), queries.numpy(), 7))
    assert BACKENDS["sharded"] is ShardedSearchConfig
    with pytest.raises(ValueError, match="process 3 gets none"):
        ShardedSearchConfig(inner="torch", process_index=3, num_processes=4).build(keys[:3], metric="l2")


@needs_accelerate
def test_two_processes_equal_one_exact_search(tmp_path):
    launcher = ACCELERATE_LAUNCHER
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        WORKER, str(tmp_path),
    ]  # fmt: skip
    # Both processes on the CPU (gloo) even where there is a GPU: with one GPU, accelerate's barrier would put rank 1 on
    # a `cuda:1` that does not exist.
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["shard"] for r in ranks] == [[0, 151], [151, 301]] and [r["inner_keys"] for r in ranks] == [151, 150]

    store = random_store(n=301)
    store.build_index(TorchSearchConfig(device="cpu"), device="cpu")
    want = {}
    run(store, want, "")  # one process, every key
    queries = torch.randn(12, 32, generator=torch.Generator().manual_seed(7)).numpy()
    np.testing.assert_array_equal(np.array(want["ids"]), brute_force_l2(store.keys, queries, 10))
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["ids"] == want["ids"]
        np.testing.assert_allclose(rank["sqdist"], want["sqdist"], rtol=1e-6)
        assert rank["generated"] == want["generated"]
    # The datastore both processes built (each its contiguous shard of the pairs) is the 1-process one, on both ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same reduction order, so the same fp32 sums
    try:
        single = KNNDatastore.build(tiny_marian(), random_pairs(9, seed=11), tmp_path / "single", batch_size=4,
                                    progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for rank in ranks:
        np.testing.assert_array_equal(
            np.array(rank["built"]["keys"], dtype=np.float32), single.keys.astype(np.float32)
        )
        assert rank["built"]["values"] == single.values.tolist()
        assert rank["built"]["provenance"] == single.provenance.tolist()
    assert len(single) > 40 and len({tuple(p) for p in single.provenance.tolist()}) == len(single)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "built",
        "rank0.json",
        "rank1.json",
        "single",
    ]  # no shards left
