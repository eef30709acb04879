"""Tests of the REALM corpus and its MIPS index (`hf_realm.corpus_index`): corpus building, embedding, search backends
against a float64 numpy brute force, persistence, the 4.x import and bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from hf_realm import (
    CorpusTokens,
    RealmBlockIndex,
    RealmEmbedder,
    build_corpus,
    embed_corpus,
    embedder_fingerprint,
    shard_range,
    sharded_search,
)

from .conftest import subprocess_env, tiny_realm_config


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tf4")
WORDS = (
    "the a of in is was born city river king queen paris london rome berlin who year john mary worked as teacher "
    "doctor for school and he she it his her one two three first last new old big small red blue house book war art"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + WORDS + ["##s", "##ed", "##er"]
try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def tiny_embedder(seed=0, proj=16, dropout=0.0):
    torch.manual_seed(seed)
    config = tiny_realm_config(
        vocab_size=len(VOCAB),
        retriever_proj_size=proj,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return RealmEmbedder(config).eval()


DOCS = [
    {
        "title": "Paris",
        "text": "Paris is a city. The river in Paris is old. John was born in Paris in the first year.",
    },
    {"title": "", "text": "Mary worked as a teacher for the school. She was born in Rome."},
    {"title": "Berlin", "text": "Berlin is a big city"},
    {"title": "Empty", "text": ""},
    {"title": "London", "text": "The king of London was born in the last year. His house was red. " * 3},
]


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return build_corpus(DOCS, tokenizer, block_seq_len=16)


def brute_force(queries, keys, k):
    scores = np.asarray(queries, dtype=np.float64) @ np.asarray(keys, dtype=np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


# ----------------------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------------------


def test_build_corpus_blocks(tokenizer, corpus):
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert list(corpus["block_id"]) == list(range(len(corpus)))
    # The empty document gives no block; every other document's body tokens are covered, in order, exactly once.
    assert sorted(set(corpus["doc_id"])) == [0, 1, 2, 4]
    for doc_id, doc in enumerate(DOCS):
        rows = [r for r in corpus if r["doc_id"] == doc_id]
        body = tokenizer(doc["text"], add_special_tokens=False).input_ids
        title = tokenizer(doc["title"], add_special_tokens=False).input_ids
        head = [cls] + title + [sep] if title else [cls]
        got = []
        for r in rows:
            ids = r["input_ids"]
            assert len(ids) <= 16
            assert ids[: len(head)] == head and ids[-1] == sep
            assert r["token_type_start"] == (len(head) if title else len(ids))
            assert r["title"] == doc["title"]
            # The block text is the document's span and tokenizes to the block's body tokens.
            assert r["text"] in doc["text"]
            assert tokenizer(r["text"], add_special_tokens=False).input_ids == ids[len(head) : -1]
            got += ids[len(head) : -1]
        assert got == body
    # Greedy on sentences: "paris is a city. the river in paris is old." has 11 tokens + head 4 > 16 - 1, so the first
    # block of doc 0 ends at the first sentence end that leaves it at least half full.
    first = corpus[0]
    assert first["text"] == "Paris is a city. The river in Paris is old."
    assert [r["text"] for r in corpus if r["doc_id"] == 0][1] == "John was born in Paris in the first year."


def test_build_corpus_hard_split_without_boundaries(tokenizer):
    text = " ".join(["art"] * 30)  # no sentence end: cut at word boundaries, full blocks
    blocks = build_corpus([text], tokenizer, block_seq_len=10)
    lengths = [len(ids) for ids in blocks["input_ids"]]
    assert lengths == [10, 10, 10, 8]  # 8 body tokens per block (+ CLS and SEP): 30 = 8 + 8 + 8 + 6
    assert sum(len(ids) - 2 for ids in blocks["input_ids"]) == 30


def test_build_corpus_keeps_block_ids_and_matches_pair_encoding(tokenizer):
    rows = {
        "block_id": [0, 1, 2],
        "doc_id": [5, 5, 9],
        "title": ["paris", "paris", "rome"],
        "text": ["paris is a city", "the river is old", "rome is old"],
    }
    blocks = build_corpus(rows, tokenizer, block_seq_len=32)
    assert list(blocks["block_id"]) == [0, 1, 2] and list(blocks["doc_id"]) == [5, 5, 9]
    ref = tokenizer(rows["title"], rows["text"], padding=True, return_tensors="np")
    batch = CorpusTokens.from_dataset(blocks).batch([0, 1, 2])
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(batch["token_type_ids"], ref["token_type_ids"])
    # Reordering (a shuffled dataset with an indices mapping) is read in its logical order.
    shuffled = blocks.select([2, 0, 1])
    np.testing.assert_array_equal(
        CorpusTokens.from_dataset(shuffled).batch([0])["input_ids"][0], batch["input_ids"][2][:7]
    )


def test_build_corpus_bad_input(tokenizer):
    with pytest.raises(ValueError, match="the corpus is empty: no documents"):
        build_corpus(datasets.Dataset.from_dict({"text": []}), tokenizer)
    with pytest.raises(ValueError, match="no document has body text"):
        build_corpus(["", ""], tokenizer)
    with pytest.raises(TypeError, match="DatasetDict"):
        build_corpus(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}), tokenizer)
    with pytest.raises(ValueError, match=r"no text column 'text' in the documents \(columns: \['body'\]\)"):
        build_corpus([{"body": "paris"}], tokenizer)
    with pytest.raises(ValueError, match="block_id column must be 0..n-1"):
        build_corpus({"block_id": [1, 0], "text": ["paris", "rome"]}, tokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------------------------------


def reference_embeddings(embedder, corpus):
    """Each block alone (no padding), the embedder in float64."""
    model = tiny_embedder()
    model.load_state_dict(embedder.state_dict())
    model = model.double().eval()
    out = []
    with torch.no_grad():
        for row in corpus:
            ids = torch.tensor([row["input_ids"]])
            tt = (torch.arange(ids.shape[1]) >= row["token_type_start"]).long()[None]
            out.append(model(input_ids=ids, token_type_ids=tt).projected_score[0])
    return torch.stack(out).numpy()


def test_embed_corpus_matches_per_block_reference(corpus):
    embedder = tiny_embedder()
    ref = reference_embeddings(embedder, corpus)
    for batch_size in (1, 3, 64):
        emb = embed_corpus(embedder, corpus, batch_size=batch_size, show_progress=False)
        assert emb.dtype == torch.float32 and emb.device.type == "cpu"
        np.testing.assert_allclose(emb.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_embed_corpus_eval_mode_and_restores_training(corpus):
    embedder = tiny_embedder(dropout=0.5).train()
    ref = embed_corpus(tiny_embedder(dropout=0.5).eval(), corpus, batch_size=4, show_progress=False)
    emb = embed_corpus(embedder, corpus, batch_size=4, show_progress=False)
    np.testing.assert_allclose(emb.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)  # no dropout while embedding
    assert embedder.training


def test_embed_corpus_shards(corpus):
    embedder = tiny_embedder()
    full = embed_corpus(embedder, corpus, batch_size=4, show_progress=False)
    parts = []
    for rank in range(3):
        state = mock.Mock(process_index=rank, num_processes=3)
        part = embed_corpus(embedder, corpus, batch_size=2, accelerator=state, gather=False, show_progress=False)
        start, end = shard_range(len(corpus), rank, 3)
        assert part.shape[0] == end - start
        parts.append(part)
    np.testing.assert_allclose(torch.cat(parts).numpy(), full.numpy(), rtol=1e-5, atol=1e-6)
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_sharded_search_single_process():
    keys = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    scores, ids = sharded_search(queries, keys[10:], 4, shard_start=10)
    ref_scores, ref_ids = brute_force(queries.numpy(), keys[10:].numpy(), 4)
    np.testing.assert_array_equal(ids.numpy(), ref_ids + 10)
    with pytest.raises(ValueError, match="k=25 is larger than the total number of keys"):
        sharded_search(queries, keys[10:], 25, shard_start=10)


_TWO_PROCESS = textwrap.dedent(
    """
    import sys, torch, datasets
    from accelerate import PartialState
    from tests.test_retrieval_index import tiny_embedder  # the repository root is on PYTHONPATH
    from hf_realm import embed_corpus, shard_range, sharded_search
    state = PartialState(cpu=True)  # gloo
    assert state.num_processes == 2
    corpus = datasets.load_from_disk(sys.argv[1] + "/corpus")
    emb = embed_corpus(tiny_embedder(), corpus, batch_size=2, accelerator=state, show_progress=False)
    local = embed_corpus(tiny_embedder(), corpus, batch_size=3, accelerator=state, gather=False, show_progress=False)
    start, end = shard_range(len(corpus), state.process_index, state.num_processes)
    assert torch.allclose(local, emb[start:end], atol=1e-6)
    queries, keys = torch.load(sys.argv[1] + "/search.pt")
    start, end = shard_range(len(keys), state.process_index, state.num_processes)
    scores, ids = sharded_search(queries, keys[start:end], 5, shard_start=start, accelerator=state)
    torch.save((emb, scores, ids), sys.argv[1] + f"/out{state.process_index}.pt")
    """
)


def test_embed_corpus_two_processes_gloo(tmp_path, corpus):
    """`torchrun` with 2 CPU processes (gloo): each embeds its shard, the gathered matrix equals one process'; a sharded
    search with a distributed top-k merge gives the ids of one exact search, on both processes."""
    corpus.save_to_disk(str(tmp_path / "corpus"))
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(4, 16, generator=g), torch.randn(37, 16, generator=g)
    torch.save((queries, keys), tmp_path / "search.pt")
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS)
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = embed_corpus(tiny_embedder(), corpus, batch_size=4, show_progress=False)
    ref_scores, ref_ids = brute_force(queries.numpy(), keys.numpy(), 5)
    for rank in range(2):
        gathered, scores, ids = torch.load(tmp_path / f"out{rank}.pt")
        np.testing.assert_allclose(gathered.numpy(), single.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-4, atol=1e-5)


def test_embed_corpus_bad_input(corpus):
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        embed_corpus(tiny_embedder(), datasets.Dataset.from_dict({"text": ["a"]}), show_progress=False)
    empty = datasets.Dataset.from_dict({"input_ids": []}, features=corpus.select_columns(["input_ids"]).features)
    with pytest.raises(ValueError, match="the corpus is empty"):
        embed_corpus(tiny_embedder(), empty, show_progress=False)
    long = datasets.Dataset.from_dict({"input_ids": [[2] + [5] * 70 + [3]]})
    with pytest.raises(ValueError, match="72 tokens > the embedder's max_position_embeddings=64"):
        embed_corpus(tiny_embedder(), long, show_progress=False)


def test_embedder_fingerprint():
    a, b = tiny_embedder(seed=0), tiny_embedder(seed=1)
    assert embedder_fingerprint(a) != embedder_fingerprint(b)
    renamed = {"embedder." + k: v.clone() for k, v in a.state_dict().items()}
    assert embedder_fingerprint(a) == embedder_fingerprint(renamed)
    assert embedder_fingerprint(a) == embedder_fingerprint(dict(reversed(list(a.state_dict().items()))))
    assert embedder_fingerprint(a) != embedder_fingerprint(a.to(torch.bfloat16))  # narrower weights are different


# ----------------------------------------------------------------------------------------------------------------------
# index
# ----------------------------------------------------------------------------------------------------------------------


def random_index_inputs(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    corpus = datasets.Dataset.from_dict(
        {"block_id": np.arange(n), "doc_id": np.arange(n) // 3, "text": [f"block {i}" for i in range(n)]}
    )
    return corpus, rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((5, d)).astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_search_matches_brute_force(backend):
    corpus, emb, queries = random_index_inputs()
    index = RealmBlockIndex(corpus, torch.from_numpy(emb), backend=backend)
    ref_scores, ref_ids = brute_force(queries, emb, 7)
    scores, ids = index.search(torch.from_numpy(queries), 7)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)
    np_scores, np_ids = index.search(queries, 7)  # numpy in, numpy out
    assert isinstance(np_ids, np.ndarray)
    np.testing.assert_array_equal(np_ids, ref_ids)
    assert index.evaluate_recall(queries, 7) == 1.0
    assert index.get_blocks(ids[0, :2])["text"] == [f"block {i}" for i in ref_ids[0, :2]]
    np.testing.assert_array_equal(index.doc_ids, np.arange(300) // 3)


@needs_faiss
def test_datasets_faiss_integration():
    corpus, emb, queries = random_index_inputs()
    index = RealmBlockIndex(corpus, emb, backend="faiss")
    scores, examples = index.corpus.get_nearest_examples_batch("embeddings", queries, k=4)
    ref_ids = brute_force(queries, emb, 4)[1]
    assert [ex["block_id"] for ex in examples] == ref_ids.tolist()


@needs_faiss
@pytest.mark.parametrize("factory,params", [("IVF8,Flat", {"nprobe": 2}), ("HNSW16", {"efSearch": 8})])
def test_approximate_recall_reported(factory, params):
    corpus, emb, _ = random_index_inputs(n=2000, d=16, seed=1)
    queries = np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32)
    index = RealmBlockIndex(corpus, emb, backend="faiss", index_factory=factory, search_params=params, train_size=2000)
    _, ids = index.search(queries, 10)
    ref_ids = brute_force(queries, emb, 10)[1]
    expected = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, ref_ids, strict=True)])
    recall = index.evaluate_recall(queries, 10)
    assert recall == pytest.approx(expected)
    assert recall < 1.0  # approximate at these settings: the recall is measured, not assumed
    exact = RealmBlockIndex(corpus, emb, backend="faiss", index_factory="IVF8,Flat", search_params={"nprobe": 8})
    assert exact.evaluate_recall(queries, 10) == 1.0  # every list probed


def test_search_bad_input():
    corpus, emb, queries = random_index_inputs(n=20, d=4)
    index = RealmBlockIndex(corpus, emb, backend="torch")
    q = torch.from_numpy(queries)
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\] \(the number of blocks\), got 21"):
        index.search(q, 21)
    with pytest.raises(ValueError, match="got 0"):
        index.search(q, 0)
    with pytest.raises(ValueError, match="query dim 3 != index dim 4"):
        index.search(q[:, :3], 2)
    with pytest.raises(ValueError, match="must be \\(num_queries, dim\\)"):
        index.search(q[0], 2)
    bad = q.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, 2)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, 2)
    with pytest.raises(TypeError, match="floating point, got torch.int64"):
        index.search(q.long(), 2)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(q, 2.0)
    emb_bad = emb.copy()
    emb_bad[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"embeddings contain NaN or inf \(1 blocks\)"):
        RealmBlockIndex(corpus, emb_bad, backend="torch")
    with pytest.raises(TypeError, match="floating point"):
        RealmBlockIndex(corpus, emb.astype(np.int32), backend="torch")
    with pytest.raises(ValueError, match="19 embeddings != 20 blocks"):
        RealmBlockIndex(corpus, emb[:19], backend="torch")
    with pytest.raises(ValueError, match="the corpus is empty"):
        RealmBlockIndex(corpus.select([]), emb[:0], backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        RealmBlockIndex(corpus, emb, backend="annoy")
    with pytest.raises(ValueError, match="needs a faiss backend"):
        RealmBlockIndex(corpus, emb, backend="torch", index_factory="IVF8,Flat")


def test_missing_faiss_names_the_package():
    corpus, emb, queries = random_index_inputs(n=20, d=4)
    with mock.patch.dict(sys.modules, {"faiss": None}):
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            RealmBlockIndex(corpus, emb, backend="faiss")
        if not torch.cuda.is_available():
            index = RealmBlockIndex(corpus, emb)  # auto falls back to exact torch search
            assert index.backend_name == "torch"
            np.testing.assert_array_equal(index.search(queries, 3)[1], brute_force(queries, emb, 3)[1])


@needs_faiss
def test_faiss_hidden_once_is_not_refused_for_good():
    """A first faiss check made while the module is hidden (a test, or a notebook before `pip install`) must not stick:
    transformers' `is_faiss_available` caches its answer for the process, so it does not decide."""
    from transformers.utils import is_faiss_available

    corpus, emb, queries = random_index_inputs(n=20, d=4)
    is_faiss_available.cache_clear()
    try:
        with mock.patch.dict(sys.modules, {"faiss": None}):
            with pytest.raises(ImportError, match="pip install faiss-cpu"):
                RealmBlockIndex(corpus, emb, backend="faiss")
        index = RealmBlockIndex(corpus, emb, backend="faiss")
        np.testing.assert_array_equal(index.search(queries, 3)[1], brute_force(queries, emb, 3)[1])
    finally:
        is_faiss_available.cache_clear()


def test_update_embeddings_swaps_and_failure_keeps_old():
    corpus, emb, queries = random_index_inputs(n=50, d=4)
    index = RealmBlockIndex(corpus, emb, backend="torch")
    new = -emb
    index.update_embeddings(new, embedder_hash="sha256:new")
    np.testing.assert_array_equal(index.search(queries, 5)[1], brute_force(queries, new, 5)[1])
    assert index.embedder_hash == "sha256:new"
    bad = new.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.update_embeddings(bad)
    with pytest.raises(ValueError, match="new embedding dim 3 != index dim 4"):
        index.update_embeddings(new[:, :3])
    np.testing.assert_array_equal(index.search(queries, 5)[1], brute_force(queries, new, 5)[1])
    assert index.embedder_hash == "sha256:new"


def test_refresh_and_block_inputs(tokenizer, corpus):
    embedder = tiny_embedder()
    index = RealmBlockIndex(corpus, torch.zeros(len(corpus), 16), backend="torch")
    index.refresh(embedder, batch_size=3, show_progress=False)
    ref = reference_embeddings(embedder, corpus)
    np.testing.assert_allclose(index.embeddings.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert index.embedder_hash == embedder_fingerprint(embedder)
    query = ref[[2, 4]] * 3.0
    np.testing.assert_array_equal(index.search(query.astype(np.float32), 3)[1], brute_force(query, ref, 3)[1])
    inputs = index.block_inputs(torch.tensor([[1, 0]]))
    assert inputs["input_ids"].shape[:2] == (1, 2)
    row = corpus[1]
    n = len(row["input_ids"])
    assert inputs["input_ids"][0, 0, :n].tolist() == row["input_ids"]
    assert inputs["attention_mask"][0, 0].sum().item() == n
    with pytest.raises(IndexError, match="block ids must be in"):
        index.block_inputs([len(corpus)])


# ----------------------------------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,factory",
    [
        ("torch", "Flat"),
        pytest.param("faiss", "Flat", marks=needs_faiss),
        pytest.param("faiss", "IVF4,Flat", marks=needs_faiss),
    ],
)
def test_save_load_round_trip(tmp_path, corpus, backend, factory):
    embedder = tiny_embedder()
    kwargs = {"search_params": {"nprobe": 1}} if factory != "Flat" else {}
    if factory != "Flat":
        # IVF4 needs enough points to train: repeat the corpus with a little noise.
        big = datasets.concatenate_datasets([corpus] * 30)
        big = big.remove_columns("block_id").add_column("block_id", np.arange(len(big)))  # unique block ids
        emb = embed_corpus(embedder, big, show_progress=False) + 0.01 * torch.randn(len(big), 16)
        index = RealmBlockIndex(big, emb, backend=backend, index_factory=factory, **kwargs)
    else:
        index = RealmBlockIndex.build(corpus, embedder, backend=backend, embed_kwargs={"show_progress": False})
    queries = torch.randn(4, 16)
    scores, ids = index.search(queries, 3)
    index.save_pretrained(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "index_config.json").read_text())
    assert meta["count"] == len(index) and meta["dim"] == 16 and meta["metric"] == "inner_product"
    assert meta["backend"] == backend and meta["index_factory"] == factory
    assert meta["hf_realm_version"] and meta["embeddings_dtype"] == "float32"
    assert ("faiss.index" in meta["files"]) == (factory != "Flat")
    loaded = RealmBlockIndex.from_pretrained(tmp_path / "index")
    loaded_scores, loaded_ids = loaded.search(queries, 3)
    np.testing.assert_array_equal(loaded_ids.numpy(), ids.numpy())  # the same trained IVF index, same probes
    np.testing.assert_allclose(loaded_scores.numpy(), scores.numpy(), rtol=1e-6)
    assert loaded.corpus["text"][:3] == index.corpus["text"][:3]
    if factory == "Flat":
        assert loaded.embedder_hash == embedder_fingerprint(embedder)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            RealmBlockIndex.from_pretrained(tmp_path / "index", embedder=embedder)  # same embedder: no warning
        with pytest.warns(UserWarning, match="built by a different embedder"):
            RealmBlockIndex.from_pretrained(tmp_path / "index", embedder=tiny_embedder(seed=3))
        with pytest.raises(ValueError, match="retriever_proj_size 8 != index dim 16"):
            RealmBlockIndex.from_pretrained(tmp_path / "index", embedder=tiny_embedder(proj=8))


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    corpus, emb, _ = random_index_inputs(n=40, d=4)
    RealmBlockIndex(corpus, emb, backend="torch").save_pretrained(tmp_path / "a")
    # truncated embeddings
    shutil.copytree(tmp_path / "a", tmp_path / "trunc")
    path = tmp_path / "trunc" / "embeddings.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or altered"):
        RealmBlockIndex.from_pretrained(tmp_path / "trunc")
    # a corpus from another index (30 blocks)
    other_corpus, other_emb, _ = random_index_inputs(n=30, d=4)
    RealmBlockIndex(other_corpus, other_emb, backend="torch").save_pretrained(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "corpus")
    shutil.copytree(tmp_path / "b" / "corpus", tmp_path / "mixed" / "corpus")
    with pytest.raises(ValueError, match="the corpus has 30 blocks but the index holds 40"):
        RealmBlockIndex.from_pretrained(tmp_path / "mixed")
    # count in the metadata disagrees with the embeddings
    shutil.copytree(tmp_path / "a", tmp_path / "count")
    meta = json.loads((tmp_path / "count" / "index_config.json").read_text())
    meta["count"] = 41
    (tmp_path / "count" / "index_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"embeddings have shape \(40, 4\), index_config.json says \(41, 4\)"):
        RealmBlockIndex.from_pretrained(tmp_path / "count")
    with pytest.raises(ValueError, match="not a RealmBlockIndex directory"):
        RealmBlockIndex.from_pretrained(tmp_path / "a" / "corpus")


def test_interrupted_save_keeps_previous_index(tmp_path):
    corpus, emb, queries = random_index_inputs(n=40, d=4)
    RealmBlockIndex(corpus, emb, backend="torch").save_pretrained(tmp_path / "idx")
    newer = RealmBlockIndex(corpus, -emb, backend="torch")
    with mock.patch("safetensors.torch.save_file", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            newer.save_pretrained(tmp_path / "idx")
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary directory left behind
    loaded = RealmBlockIndex.from_pretrained(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], brute_force(queries, emb, 3)[1])
    newer.save_pretrained(tmp_path / "idx")  # and a complete save replaces it
    np.testing.assert_array_equal(
        RealmBlockIndex.from_pretrained(tmp_path / "idx").search(queries, 3)[1], brute_force(queries, -emb, 3)[1]
    )


def test_push_to_hub_and_load_from_repo(tmp_path):
    corpus, emb, queries = random_index_inputs(n=40, d=4)
    index = RealmBlockIndex(corpus, emb, backend="torch", embedder_hash="sha256:abc")
    remote = tmp_path / "remote"
    calls = {}

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, repo_type=None, **kwargs):
        calls["upload"] = (repo_id, repo_type, path_in_repo)
        shutil.copytree(folder_path, remote / repo_id / (path_in_repo or ""), dirs_exist_ok=True)
        return mock.Mock(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/1")

    def create_repo(self, repo_id, repo_type=None, **kwargs):
        calls["create"] = (repo_id, repo_type)

    def snapshot_download(repo_id, repo_type=None, **kwargs):
        calls["download"] = (repo_id, repo_type)
        return str(remote / repo_id)

    with (
        mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder),
        mock.patch("huggingface_hub.HfApi.create_repo", create_repo),
        mock.patch("huggingface_hub.snapshot_download", snapshot_download),
    ):
        url = index.push_to_hub("user/realm-index")
        loaded = RealmBlockIndex.from_pretrained("user/realm-index")
    assert url.endswith("/commit/1")
    assert calls == {
        "create": ("user/realm-index", "dataset"),
        "upload": ("user/realm-index", "dataset", None),
        "download": ("user/realm-index", "dataset"),
    }
    assert loaded.embedder_hash == "sha256:abc"
    np.testing.assert_array_equal(loaded.search(queries, 4)[1], brute_force(queries, emb, 4)[1])


# ----------------------------------------------------------------------------------------------------------------------
# transformers 4.x import
# ----------------------------------------------------------------------------------------------------------------------


def test_legacy_import_needs_pickle_opt_in(monkeypatch):
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        RealmBlockIndex.from_legacy_checkpoint(os.path.join(FIXTURE, "openqa"), backend="torch")


def test_legacy_import_fixture(tmp_path, monkeypatch):
    openqa = os.path.join(FIXTURE, "openqa")
    meta = json.load(open(os.path.join(FIXTURE, "meta.json")))
    state = torch.load(os.path.join(openqa, "pytorch_model.bin"), weights_only=True)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "True")  # 4.x's opt-in works as well as allow_pickle=True
    index = RealmBlockIndex.from_legacy_checkpoint(openqa, backend="torch")
    np.testing.assert_array_equal(index.embeddings.numpy(), state["block_emb"].numpy())
    assert list(index.corpus["text"]) == meta["blocks"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(openqa)
    assert index.corpus["input_ids"] == tok(meta["blocks"]).input_ids  # [CLS] text [SEP]
    embedder_state = {k[len("embedder.") :]: v for k, v in state.items() if k.startswith("embedder.")}
    assert index.embedder_hash == embedder_fingerprint(embedder_state)
    # Search = 4.x RealmForOpenQA's `einsum("BD,QD->QB", block_emb, question_projection)` then top-k.
    queries = torch.randn(3, 8)
    ref = brute_force(queries.numpy(), state["block_emb"].numpy(), 6)[1]
    np.testing.assert_array_equal(index.search(queries, 6)[1].numpy(), ref)
    # Round trip into the new format, loaded with the checkpoint's own embedder: no stale-index warning.
    index.save_pretrained(tmp_path / "orqa-index")
    from hf_realm import RealmForOpenQA

    model = RealmForOpenQA.from_pretrained(openqa, retriever=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = RealmBlockIndex.from_pretrained(tmp_path / "orqa-index", embedder=model.embedder)
    with torch.no_grad():
        question = tok(["who was born in london ?"], return_tensors="pt")
        projection = model.embedder(**question).projected_score
    expected = (state["block_emb"] @ projection[0]).topk(4).indices
    np.testing.assert_array_equal(loaded.search(projection, 4)[1][0].numpy(), expected.numpy())


def test_legacy_import_count_mismatch(tmp_path):
    openqa = os.path.join(FIXTURE, "openqa")
    with pytest.raises(ValueError, match="block_emb has 12 rows but there are 11 block records"):
        RealmBlockIndex.from_legacy_checkpoint(openqa, block_records=[b"x"] * 11, backend="torch", tokenizer=None)


def test_build_index_example_default(tmp_path):
    """`examples/build_index.py` with no corpus argument: the generated world, a tiny random embedder, a flat index."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "build_index.py")
    spec = importlib.util.spec_from_file_location("build_index_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    results = module.main(["--output_dir", str(tmp_path / "idx"), "--eval_queries", "50"])
    from hf_realm.world import KnowledgeWorld

    assert results["num_blocks"] == len(KnowledgeWorld().corpus())
    assert results["recall@10_vs_exact"] == 1.0
    saved = json.loads((tmp_path / "idx" / "all_results.json").read_text())
    assert saved["num_blocks"] == results["num_blocks"]
    index = RealmBlockIndex.from_pretrained(tmp_path / "idx" / "index", backend="torch")
    module.main(["--output_dir", str(tmp_path / "idx"), "--eval_queries", "50"])  # a re-run replaces its own output
    queries = np.random.default_rng(0).standard_normal((3, index.dim)).astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 5)[1], brute_force(queries, index.embeddings.numpy(), 5)[1])
    assert list(index.corpus["block_id"]) == list(range(len(index)))  # the world's gold block ids are kept
