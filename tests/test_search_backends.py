"""Tests of the search layer's backends (`hf_realm.search`): the exact torch backend (float64 rescoring of fp16 / bf16
candidates), faiss, PQ, the name -> config vocabulary, a registered custom backend, and the REALM index and the kNN
datastore searching through them; every result against a float64 numpy brute force."""

import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch

from hf_realm import RealmBlockIndex
from hf_realm.knn_datastore import KNNDatastore
from hf_realm.search import (
    BACKENDS,
    BackendConfig,
    FaissSearchConfig,
    PQCodes,
    PQSearchConfig,
    SearchBackend,
    TorchSearchConfig,
    backend_config,
    pq_decode,
    register_backend,
)
from hf_realm.search.rescore import score_slack


try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")


def brute_force(queries, keys, k, metric="inner_product"):
    """float64 top-k, ties by the smaller id (the package's definition of exact)."""
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(keys, dtype=np.float64)
    if metric == "inner_product":
        scores = q @ x.T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        ids = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def near_ties(n=3000, d=32, spread=1e-4, seed=0, num_queries=6):
    """Keys all close to one direction: their scores differ by less than fp16 resolves (~5e-4 relative)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    keys = base + spread * torch.randn(n, d, generator=g)
    queries = base + 0.5 * torch.randn(num_queries, d, generator=g)
    return keys.float(), queries.float()


# ----------------------------------------------------------------------------------------------------------------------
# What "exact" means: fp16 / bf16 storage + float64 rescoring == float64 brute force
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage_with_rescoring_equals_float64_brute_force(metric, dtype):
    keys, queries = near_ties()
    ref_scores, ref_ids = brute_force(queries, keys, 10, metric)
    exact = TorchSearchConfig(device="cpu", dtype=dtype).build(keys, metric=metric)
    scores, ids = exact.search(queries, 10)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-6)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    # Without the oversampling the ranking is the fp16 / bf16 one: on this data it is wrong, so the check can fail.
    _, fast_ids = (
        TorchSearchConfig(device="cpu", dtype=dtype, rescore=False).build(keys, metric=metric).search(queries, 10)
    )
    assert not np.array_equal(fast_ids.numpy(), ref_ids)


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_without_rescoring_no_host_synchronisation_and_within_the_rounding_bound(metric, monkeypatch):
    """`rescore=False` on fp16 keys stored in fp16: not one tensor read by the host during the search (on a GPU each
    read is a synchronisation that stalls the decoding step), while the exact mode reads its bound check's verdict.
    With queries that fp16 represents (an fp16 model's states) the answer is the float64 one; with fp32 queries
    (rounded to fp16 by the fast pass) each returned score is within the rounding bound of the exact score at its
    rank, and the scores returned are exact for the ids returned."""
    g = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(3000, 32, generator=g).half(), torch.randn(64, 32, generator=g)
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a)
        )
    fast = TorchSearchConfig(device="cpu", dtype=torch.float16, rescore=False).build(keys, metric=metric)
    exact = TorchSearchConfig(device="cpu", dtype=torch.float16).build(keys, metric=metric)
    reads.clear()
    scores16, ids16 = fast.search(queries.half().float(), 16)
    scores, ids = fast.search(queries, 16)
    assert reads == []
    exact.search(queries, 16)
    assert reads  # the bound check reads its verdict
    monkeypatch.undo()

    ref16_scores, ref16_ids = brute_force(queries.half().float(), keys.float(), 16, metric)
    np.testing.assert_array_equal(ids16.numpy(), ref16_ids)
    np.testing.assert_allclose(scores16.numpy(), ref16_scores, rtol=1e-6)

    ref_scores, ref_ids = brute_force(queries, keys.float(), 16, metric)
    own = brute_force(queries, keys.float(), 3000, metric)  # every key's exact score, to look up the ids returned
    by_id = np.empty((64, 3000))
    np.put_along_axis(by_id, own[1], own[0], axis=1)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(by_id, ids.numpy(), axis=1), rtol=1e-6)
    bias = 0.0 if metric == "inner_product" else float((0.5 * keys.double().pow(2).sum(-1)).max())
    slack = score_slack(queries, torch.float16, keys.float().abs().amax(0), None, bias).numpy()
    gap = np.abs(scores.numpy() - ref_scores)  # inner products, or squared distances (= -2 x the fast score + const)
    assert (gap <= (1 if metric == "inner_product" else 2) * slack[:, None] + 1e-6).all()
    assert (ids.numpy() != ref_ids).any(axis=1).mean() < 0.1  # on this data few rows differ at all


def test_rescoring_searches_again_when_the_bound_does_not_prove_the_top_k():
    """Keys equal in fp16 but distinct in fp32: the first candidates cannot prove anything and the search widens (up
    to every key); the answer is still the float64 one."""
    g = torch.Generator().manual_seed(1)
    base = torch.full((16,), 0.5)
    keys = base + 1e-6 * torch.randn(700, 16, generator=g)  # below fp16 resolution: all stored keys are equal
    assert bool((keys.half() == keys[0].half()).all())
    queries = torch.randn(3, 16, generator=g)
    _, ref_ids = brute_force(queries, keys, 5)
    backend = TorchSearchConfig(device="cpu", dtype=torch.float16).build(keys)
    calls = []
    fast = backend._fast
    backend._fast = lambda q, kk: calls.append(kk) or fast(q, kk)
    _, ids = backend.search(queries, 5)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    assert calls[0] == 21 and calls[-1] == 700  # 5 + 16 candidates first, then 4x, ..., all keys


def test_exact_ties_are_broken_by_the_smaller_id():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    for dtype in (torch.float32, torch.float16):
        scores, ids = TorchSearchConfig(device="cpu", dtype=dtype).build(keys).search(torch.tensor([[2.0, 1.0]]), 4)
        assert ids.tolist() == [[0, 2, 4, 3]]
        assert scores.tolist() == [[2.0, 2.0, 2.0, 1.5]]


def test_fp16_overflow_and_nan_keys_are_refused():
    with pytest.raises(ValueError, match=r"keys \(rows 0\.\.2\) exceed the range of torch.float16 \(max 65504\)"):
        TorchSearchConfig(device="cpu", dtype=torch.float16).build(torch.tensor([[1.0], [1e6], [2.0]]))
    with pytest.raises(ValueError, match="keys contain NaN or inf"):
        TorchSearchConfig(device="cpu").build(torch.tensor([[1.0], [float("nan")]]))


def test_add_replace_nbytes_and_protocol():
    keys, queries = near_ties(n=400, d=8, spread=1e-2)
    backend = TorchSearchConfig(device="cpu", dtype=torch.float16).build(keys[:300], metric="l2")
    assert isinstance(backend, SearchBackend)
    assert backend.nbytes == 300 * 8 * 2 + 300 * 4  # fp16 keys + fp32 norms
    backend.add(keys[300:])
    assert backend.num_keys == 400
    np.testing.assert_array_equal(backend.search(queries, 7)[1].numpy(), brute_force(queries, keys, 7, "l2")[1])
    backend.replace(-keys)
    np.testing.assert_array_equal(backend.search(queries, 7)[1].numpy(), brute_force(queries, -keys, 7, "l2")[1])
    assert backend.save("unused") is False  # no state beyond the keys


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_pq_backend_equals_float64_search_over_the_reconstructions(metric):
    g = torch.Generator().manual_seed(2)
    codebooks = torch.randn(4, 16, 3, generator=g)
    codes = torch.randint(0, 16, (900, 4), generator=g, dtype=torch.uint8)
    queries = torch.randn(5, 12, generator=g)
    backend = PQSearchConfig(device="cpu", chunk_size=256).build(PQCodes(codes, codebooks), metric=metric)
    assert isinstance(backend, SearchBackend) and backend.dim == 12
    ref_scores, ref_ids = brute_force(queries, pq_decode(codes, codebooks), 9, metric)
    scores, ids = backend.search(queries, 9)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)  # duplicate reconstructions: ties by the smaller id
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# faiss
# ----------------------------------------------------------------------------------------------------------------------


@needs_faiss
@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_faiss_flat_and_ivfpq_rerank(tmp_path, metric):
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(16, 16)) * 4
    keys = (centers[rng.integers(0, 16, 1500)] + rng.normal(size=(1500, 16))).astype(np.float32)
    queries = torch.from_numpy((centers[rng.integers(0, 16, 20)] + rng.normal(size=(20, 16))).astype(np.float32))
    ref_scores, ref_ids = brute_force(queries, keys, 8, metric)
    flat = FaissSearchConfig().build(keys, metric=metric)
    assert isinstance(flat, SearchBackend) and flat.nbytes == 1500 * 16 * 4
    scores, ids = flat.search(queries, 8)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-4, atol=1e-3)

    ivfpq = backend_config("faiss-ivfpq", num_keys=1500, dim=16, nlist=8, m=4, nbits=6, nprobe=8, rerank=16)
    approx = ivfpq.build(keys, metric=metric)
    scores, ids = approx.search(queries, 8)
    recall = np.mean([len(np.intersect1d(a, b)) / 8 for a, b in zip(ids.numpy(), ref_ids, strict=True)])
    assert recall >= 0.9, recall
    exact = brute_force(queries, keys, 1500, metric)  # every key's float64 score, to check the re-ranked scores
    by_id = np.take_along_axis(exact[0], np.argsort(exact[1], axis=1), axis=1)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(by_id, ids.numpy(), axis=1), rtol=1e-6)
    assert approx.save(str(tmp_path / "ivfpq.index")) is True
    loaded = ivfpq.build(keys, metric=metric, state=str(tmp_path / "ivfpq.index"))
    np.testing.assert_array_equal(loaded.search(queries, 8)[1].numpy(), ids.numpy())
    with pytest.raises(ValueError, match="holds 1500 vectors of dim 16, expected 1499 x 16"):
        ivfpq.build(keys[:-1], metric=metric, state=str(tmp_path / "ivfpq.index"))
    (tmp_path / "bad.index").write_bytes((tmp_path / "ivfpq.index").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the faiss index"):
        ivfpq.build(keys, metric=metric, state=str(tmp_path / "bad.index"))


@needs_faiss
def test_faiss_pads_missing_results_with_minus_one():
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(400, 8)).astype(np.float32)
    backend = FaissSearchConfig(index_factory="IVF16,Flat", search_params={"nprobe": 1}, train_size=400).build(keys)
    scores, ids = backend.search(torch.from_numpy(keys[:4]), 100)  # one list of ~25 keys cannot hold 100
    missing = ids < 0
    assert bool(missing.any())
    assert bool(torch.isneginf(scores[missing]).all()) and bool(torch.isfinite(scores[~missing]).all())


# ----------------------------------------------------------------------------------------------------------------------
# One vocabulary: names -> configs; a new backend in one place
# ----------------------------------------------------------------------------------------------------------------------


def test_backend_names_map_onto_configs():
    assert backend_config("torch", device="cpu") == TorchSearchConfig(device="cpu")
    assert backend_config("faiss") == FaissSearchConfig()
    assert backend_config("faiss-flat") == FaissSearchConfig(index_factory="Flat")
    assert backend_config("faiss-gpu", device="cuda:1").gpu == 1
    assert backend_config("faiss-gpu").gpu == 0
    # the kNN datastore's IVF-PQ sizing: 4 sqrt(n) lists (at least 39 keys a list), key_dim / 8 sub-quantisers
    config = backend_config("faiss-ivfpq", num_keys=40_000, dim=64)
    assert config.index_factory == "IVF800,PQ8x8" and config.search_params == {"nprobe": 32}
    assert config.rerank == 4 and config.train_size == 40_000
    assert backend_config("pq", device="cpu") == PQSearchConfig(device="cpu")
    round_trip = TorchSearchConfig(device="cpu", dtype=torch.bfloat16)
    assert backend_config(json.loads(json.dumps(round_trip.to_dict()))) == round_trip
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        backend_config("annoy")
    with pytest.raises(ValueError, match="m=5 sub-quantisers must divide the key dim 64"):
        backend_config("faiss-ivfpq", num_keys=1000, dim=64, m=5)


class NumpyBackend:
    """A brute-force backend written in a test: the protocol is all the index and the datastore need."""

    def __init__(self, keys, metric):
        self.metric, self.keys = metric, np.asarray(keys, dtype=np.float64)

    num_keys = property(lambda self: self.keys.shape[0])
    dim = property(lambda self: self.keys.shape[1])
    nbytes = property(lambda self: self.keys.nbytes)

    def search(self, queries, k):
        scores, ids = brute_force(queries.detach().cpu(), self.keys, k, self.metric)
        return torch.from_numpy(scores).float(), torch.from_numpy(ids)

    def add(self, keys):
        self.keys = np.concatenate([self.keys, np.asarray(keys, dtype=np.float64)])

    def replace(self, keys):
        self.keys = np.asarray(keys, dtype=np.float64)

    def save(self, path):
        return False


@dataclasses.dataclass
class NumpyConfig(BackendConfig):
    name = "numpy-test"

    def build(self, keys, *, metric="inner_product", state=None):
        return NumpyBackend(keys, metric)


@pytest.fixture
def numpy_backend():
    register_backend(NumpyConfig)
    yield NumpyConfig
    BACKENDS.pop(NumpyConfig.name)


def test_a_registered_backend_serves_the_index_and_the_datastore(numpy_backend):
    keys, queries = near_ties(n=200, d=8, spread=1e-2)
    corpus = datasets.Dataset.from_dict({"text": [f"block {i}" for i in range(200)]})
    for backend in ("numpy-test", NumpyConfig()):
        index = RealmBlockIndex(corpus, keys, backend=backend)
        assert isinstance(index.backend, NumpyBackend) and index.backend_name == "numpy-test"
        np.testing.assert_array_equal(index.search(queries, 5)[1].numpy(), brute_force(queries, keys, 5)[1])
    store = KNNDatastore(keys=keys.numpy(), values=np.arange(200))
    store.build_index(NumpyConfig(), device="cpu")
    ref = brute_force(queries, keys.half().float(), 5, "l2")[1]  # the datastore keeps fp16 keys
    np.testing.assert_array_equal(store.search(queries, 5)[1].numpy(), ref)


# ----------------------------------------------------------------------------------------------------------------------
# The REALM index and the kNN datastore through the backends
# ----------------------------------------------------------------------------------------------------------------------


def test_realm_index_fp16_storage_is_exact_on_near_ties():
    """The cause of the GPU failure of `test_refresh_and_block_inputs`: a tiny random embedder gives embeddings whose
    scores differ by ~1e-4 relative, and fp16 storage alone returned the same wrong blocks for every query."""
    keys, queries = near_ties(n=500, d=16)
    corpus = datasets.Dataset.from_dict({"text": [str(i) for i in range(500)]})
    index = RealmBlockIndex(corpus, keys, backend=TorchSearchConfig(device="cpu", dtype=torch.float16))
    _, ref_ids = brute_force(queries, keys, 6)
    np.testing.assert_array_equal(index.search(queries, 6)[1].numpy(), ref_ids)
    np.testing.assert_array_equal(index.exact_search(queries, 6)[1].numpy(), ref_ids)
    assert index.evaluate_recall(queries, 6) == 1.0
    with pytest.raises(ValueError, match=r"backend is a TorchSearchConfig: set \['search_dtype'\] in it"):
        RealmBlockIndex(corpus, keys, backend=TorchSearchConfig(), search_dtype=torch.float16)


@needs_faiss
def test_realm_index_keeps_datasets_faiss_api_in_step_with_refreshes():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    corpus = datasets.Dataset.from_dict({"block_id": np.arange(60)})
    index = RealmBlockIndex(corpus, emb, backend="faiss")
    _, examples = index.corpus.get_nearest_examples_batch("embeddings", queries, k=3)
    assert [ex["block_id"] for ex in examples] == brute_force(queries, emb, 3)[1].tolist()
    index.update_embeddings(-emb)
    _, examples = index.corpus.get_nearest_examples_batch("embeddings", queries, k=3)
    assert [ex["block_id"] for ex in examples] == brute_force(queries, -emb, 3)[1].tolist()
    assert index.corpus.list_indexes() == ["embeddings"]


@needs_faiss
def test_datastore_index_config_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(2000, 16)).astype(np.float16)
    queries = torch.from_numpy(rng.normal(size=(10, 16)).astype(np.float32))
    store = KNNDatastore(keys=keys, values=rng.integers(0, 50, 2000))
    config = FaissSearchConfig(index_factory="IVF8,Flat", search_params={"nprobe": 8}, train_size=2000)
    store.build_index(config, device="cpu")
    assert store.search_config is config and store.index_type == "faiss"
    sqdist, ids = store.search(queries, 6)
    np.testing.assert_array_equal(ids.numpy(), brute_force(queries, keys, 6, "l2")[1])  # every list probed: exact
    loaded = KNNDatastore.from_pretrained(store.save_pretrained(tmp_path / "ds"))
    assert loaded.search_config == config and loaded.index_type == "faiss"
    np.testing.assert_array_equal(loaded.search(queries, 6)[1].numpy(), ids.numpy())
    store.build_index("torch", device="cpu")
    assert isinstance(store.search_config, TorchSearchConfig)
    np.testing.assert_array_equal(store.search(queries, 6)[1].numpy(), ids.numpy())


def test_datastore_public_tables_and_reconstruct():
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(50, 4)).astype(np.float16)
    store = KNNDatastore(keys=keys, values=np.arange(50) % 7, counts=np.arange(1, 51))
    values, log_counts = store.lookup_tables("cpu")
    assert values.tolist() == (np.arange(50) % 7).tolist()
    np.testing.assert_allclose(log_counts.numpy(), np.log(np.arange(1, 51)), rtol=1e-6)
    np.testing.assert_array_equal(store.reconstruct(10, 20).numpy(), keys[10:20].astype(np.float32))
    with pytest.raises(ValueError, match=r"entries \[40, 60\) out of range for 50 entries"):
        store.reconstruct(40, 60)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_cuda_fp16_search_equals_float64_brute_force(metric):
    """On the GPU (fp16 keys, the Triton kernel where installed): the same ids and order as a float64 search."""
    keys, queries = near_ties(n=20_000, d=64)
    backend = TorchSearchConfig().build(keys, metric=metric)
    assert backend.dtype == torch.float16 and backend.device.type == "cuda"
    ref_scores, ref_ids = brute_force(queries, keys, 16, metric)
    scores, ids = backend.search(queries.cuda(), 16)
    assert ids.device.type == "cuda"
    np.testing.assert_array_equal(ids.cpu().numpy(), ref_ids)
    np.testing.assert_allclose(scores.cpu().numpy(), ref_scores, rtol=1e-6)
    store = KNNDatastore(keys=keys.numpy(), values=np.arange(20_000))
    ref = brute_force(queries, keys.half().float(), 16, "l2")[1]
    np.testing.assert_array_equal(store.search(queries.cuda(), 16)[1].cpu().numpy(), ref)
