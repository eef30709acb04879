"""Tests for hf_realm.knn_generation: datastore build/save/load, the logits processor against float64 references."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessorList,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_realm import (
    KNNDatastore,
    KNNDatastoreWriter,
    KNNLogitsProcessor,
    KNNQueryHook,
    knn_lm_perplexity,
    merge_datastores,
)

from .conftest import tiny_marian


VOCAB = 99
PAD, EOS = 0, 1


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.3)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def random_pairs(n: int, seed: int = 0, min_len: int = 3, max_len: int = 9) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(n):
        src.append(rng.integers(2, VOCAB, rng.integers(min_len, max_len + 1)).tolist() + [EOS])
        tgt.append(rng.integers(2, VOCAB, rng.integers(min_len, max_len + 1)).tolist() + [EOS])
    return datasets.Dataset.from_dict({"input_ids": src, "labels": tgt})


def random_texts(n: int, seed: int = 0, min_len: int = 5, max_len: int = 12) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts = [rng.integers(2, VOCAB, rng.integers(min_len, max_len + 1)).tolist() + [EOS] for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": texts})


def pad_left(seqs, value=PAD):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs, value=PAD):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def reference_mix(states, lm_scores, keys, values, k, temperature, lmbda, counts=None):
    """float64 brute force over all keys: log(λ p_kNN + (1-λ) softmax(lm_scores)), banned tokens kept banned."""
    states = np.asarray(states, dtype=np.float64)
    lm_scores = np.asarray(lm_scores, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    d = ((states[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    logits = -np.take_along_axis(d, idx, 1) / temperature
    if counts is not None:
        logits = logits + np.log(np.asarray(counts, dtype=np.float64)[idx])
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p_knn = np.zeros_like(lm_scores)
    rows = np.repeat(np.arange(states.shape[0]), k)
    np.add.at(p_knn, (rows, np.asarray(values)[idx].reshape(-1)), w.reshape(-1))
    finite = np.where(np.isneginf(lm_scores), -np.inf, lm_scores)
    m = finite.max(1, keepdims=True)
    p_lm = np.exp(finite - m)
    p_lm /= p_lm.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        out = np.log(lmbda * p_knn + (1 - lmbda) * p_lm)
    out[np.isneginf(lm_scores)] = -np.inf
    return out, idx


def random_store(n=300, dim=32, seed=0, counts=False):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, dim)).astype(np.float16)
    values = rng.integers(2, VOCAB, n).astype(np.int32)
    c = rng.integers(1, 5, n).astype(np.int32) if counts else None
    return KNNDatastore(keys=keys, values=values, counts=c)


# ----------------------------------------------------------------------------------------------------------------------
# The processor against the float64 reference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_processor_matches_float64_bruteforce(counts, lmbda):
    model = tiny_gpt2()
    store = random_store(counts=counts)
    proc = KNNLogitsProcessor(store, k=7, temperature=3.0, lmbda=lmbda)
    input_ids = torch.randint(2, VOCAB, (5, 6), generator=torch.Generator().manual_seed(1))
    with proc.attach(model, check_weights=False):
        logits = model(input_ids).logits[:, -1].float()
        state = proc.hook.state.clone()
        scores = logits.clone()
        scores[:, 3] = float("-inf")  # a token banned upstream
        before = scores.clone()
        out = proc(input_ids, scores)
    assert torch.equal(scores, before), "scores must not be modified in place"
    # hidden states of GPT-2 are small; scale the store so that neighbours are informative at T=3
    ref, _ = reference_mix(state.numpy(), scores.numpy(), store.keys, store.values, 7, 3.0, lmbda, store.counts)
    out = out.double().numpy()
    assert np.array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=0, atol=2e-5)
    assert np.isneginf(out[:, 3]).all()


def test_processor_matches_reference_with_near_queries():
    """Queries close to stored keys (the realistic case): distances small, p_kNN peaked, still exact."""
    model = tiny_gpt2()
    input_ids = torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    with KNNQueryHook(model) as hook:
        model(input_ids)
    rng = np.random.default_rng(3)
    base = hook.state.numpy()
    keys = np.concatenate([base + rng.normal(scale=0.05, size=base.shape), rng.normal(size=(200, 32))]).astype(
        np.float16
    )
    store = KNNDatastore(keys=keys, values=rng.integers(2, VOCAB, len(keys)))
    proc = KNNLogitsProcessor(store, k=5, temperature=0.5, lmbda=0.6)
    with proc.attach(model, check_weights=False):
        scores = model(input_ids).logits[:, -1].float()
        out = proc(input_ids, scores)
        state = proc.hook.state
    ref, idx = reference_mix(state.numpy(), scores.numpy(), store.keys, store.values, 5, 0.5, 0.6)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=2e-5)
    sqdist, ids = store.search(state, 5)
    assert ids.tolist() == idx.tolist()


def test_search_matches_numpy_exact():
    store = random_store(n=500, dim=16, seed=4)
    q = torch.from_numpy(np.random.default_rng(5).normal(size=(9, 16)).astype(np.float32))
    sqdist, ids = store.search(q, 10)
    d = ((q.double().numpy()[:, None] - store.keys.astype(np.float64)[None]) ** 2).sum(-1)
    ref = np.argsort(d, axis=1)[:, :10]
    assert ids.tolist() == ref.tolist()
    np.testing.assert_allclose(sqdist.numpy(), np.take_along_axis(d, ref, 1), rtol=1e-5)


def test_faiss_indexes_against_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(20, 16)) * 4
    keys = (centers[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 16))).astype(np.float16)
    store = KNNDatastore(keys=keys, values=rng.integers(2, VOCAB, 4000))
    q = torch.from_numpy((centers[rng.integers(0, 20, 50)] + rng.normal(size=(50, 16))).astype(np.float32))
    exact_d, exact_ids = store.search(q, 8)
    store.build_index("faiss-flat", device="cpu")
    flat_d, flat_ids = store.search(q, 8)
    assert flat_ids.tolist() == exact_ids.tolist()
    np.testing.assert_allclose(flat_d.numpy(), exact_d.numpy(), rtol=1e-3, atol=1e-3)
    store.build_index("faiss-ivfpq", device="cpu", nlist=16, m=4, nprobe=16, rerank=8)
    ivf_d, ivf_ids = store.search(q, 8)
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ivf_ids.tolist(), exact_ids.tolist(), strict=True)])
    assert recall >= 0.9, recall  # re-ranked from the stored keys: distances are exact for what is found
    found = ivf_ids == exact_ids
    np.testing.assert_allclose(ivf_d[found].numpy(), exact_d[found].numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# generate(): λ = 0, beam search reference, λ = 1 on the test set
# ----------------------------------------------------------------------------------------------------------------------


def _generate(model, proc, **kwargs):
    lp = LogitsProcessorList([proc]) if proc is not None else None
    if proc is None:
        return model.generate(**kwargs)
    with proc.attach(model, check_weights=False):
        return model.generate(logits_processor=lp, **kwargs)


@pytest.mark.parametrize(
    "mode", [{"do_sample": False}, {"do_sample": False, "num_beams": 3}, {"do_sample": True, "top_k": 20}]
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_lmbda_zero_equals_plain_generate_marian(mode, use_cache):
    src, mask = pad_right([[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS]])
    kw = dict(input_ids=src, attention_mask=mask, max_new_tokens=8, use_cache=use_cache, **mode)
    proc = assert_lmbda_zero_is_plain_generate(tiny_marian(), **kw)
    assert proc.num_searches > 0


def assert_lmbda_zero_is_plain_generate(model, **generate_kwargs) -> KNNLogitsProcessor:
    """With λ = 0 the processor changes nothing: the same tokens as plain `generate()` under the same seed."""
    proc = KNNLogitsProcessor(random_store(dim=32), k=4, temperature=10.0, lmbda=0.0)
    torch.manual_seed(0)
    plain = _generate(model, None, **generate_kwargs)
    torch.manual_seed(0)
    assert _generate(model, proc, **generate_kwargs).tolist() == plain.tolist()
    return proc


@pytest.mark.parametrize("mode", [{"do_sample": False}, {"do_sample": False, "num_beams": 2}, {"do_sample": True}])
def test_lmbda_zero_equals_plain_generate_gpt2_left_padding(mode):
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, **mode)
    assert_lmbda_zero_is_plain_generate(tiny_gpt2(), **kw)


class HandMixedModel:
    """Wraps a model so that its last-position logits are replaced by the float64 hand-computed kNN mixture."""

    def __init__(self, model, store, k, temperature, lmbda):
        self.model, self.store, self.k, self.t, self.l = model, store, k, temperature, lmbda
        self.calls = 0

    def __enter__(self):
        head = self.model.get_output_embeddings()
        self._pre = head.register_forward_pre_hook(lambda m, a: setattr(self, "_state", a[0][:, -1].detach()))
        self._post = self.model.register_forward_hook(self._replace)
        return self

    def __exit__(self, *exc):
        self._pre.remove()
        self._post.remove()

    def _replace(self, module, args, output):
        scores = output.logits[:, -1].double().numpy()
        mixed, _ = reference_mix(
            self._state.numpy(), scores, self.store.keys, self.store.values, self.k, self.t, self.l, self.store.counts
        )
        logits = output.logits.clone()
        logits[:, -1] = torch.from_numpy(mixed).to(logits.dtype)
        output.logits = logits
        self.calls += 1
        return output


def store_near_model_states(model, n_random=150, seed=0, counts=False):
    """Keys near the states the model visits, so that the kNN distribution actually changes the beams."""
    pairs = random_pairs(12, seed=seed)
    store = KNNDatastore.build(model, pairs, _tmp_dir(), progress=False)
    rng = np.random.default_rng(seed)
    keys = np.concatenate([store.keys, rng.normal(size=(n_random, store.key_dim))]).astype(np.float16)
    values = rng.integers(2, VOCAB, len(keys))
    return KNNDatastore(keys=keys, values=values, counts=rng.integers(1, 4, len(keys)) if counts else None)


def _tmp_dir():
    return Path(tempfile.mkdtemp()) / "store"


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_hand_mixed_reference(num_beams):
    model = tiny_marian()
    store = store_near_model_states(model, counts=True)
    src, mask = pad_right([[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS]])
    kw = dict(
        input_ids=src,
        attention_mask=mask,
        max_new_tokens=10,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    proc = KNNLogitsProcessor(store, k=6, temperature=2.0, lmbda=0.7)
    knn = _generate(model, proc, **kw)
    with HandMixedModel(model, store, 6, 2.0, 0.7) as ref_model:
        ref = model.generate(**kw)
    assert ref_model.calls > 0
    assert knn.sequences.tolist() == ref.sequences.tolist()
    np.testing.assert_allclose(knn.sequences_scores.numpy(), ref.sequences_scores.numpy(), rtol=0, atol=1e-4)
    plain = model.generate(**kw)
    assert plain.sequences.tolist() != knn.sequences.tolist(), "the datastore should change the beams"


def test_greedy_and_sampling_match_hand_mixed_reference_gpt2():
    model = tiny_gpt2()
    texts = random_texts(10, seed=1)
    store = KNNDatastore.build(model, texts, _tmp_dir(), progress=False)
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]])
    for mode in ({"do_sample": False}, {"do_sample": True}):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, **mode)
        torch.manual_seed(0)
        knn = _generate(model, KNNLogitsProcessor(store, k=4, temperature=1.0, lmbda=0.5), **kw)
        torch.manual_seed(0)
        with HandMixedModel(model, store, 4, 1.0, 0.5):
            ref = model.generate(**kw)
        assert knn.tolist() == ref.tolist(), mode


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_lambda_one_with_test_set_datastore_reproduces_references_marian(use_cache, num_beams):
    model = tiny_marian()
    pairs = random_pairs(16, seed=7)
    store = KNNDatastore.build(model, pairs, _tmp_dir(), batch_size=5, progress=False)
    assert len(store) == sum(len(x) for x in pairs["labels"])
    proc = KNNLogitsProcessor(store, k=1, temperature=1.0, lmbda=1.0)
    src, mask = pad_right(pairs["input_ids"])
    out = _generate(
        model, proc, input_ids=src, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, use_cache=use_cache
    )
    for row, ref in zip(out.tolist(), pairs["labels"], strict=True):
        assert row[1 : 1 + len(ref)] == ref
        assert all(t in (PAD, EOS) for t in row[1 + len(ref) :])  # beam search pads finished rows with EOS


def test_lambda_one_with_test_set_datastore_reproduces_references_gpt2():
    model = tiny_gpt2()
    texts = random_texts(12, seed=8)
    store = KNNDatastore.build(model, texts, _tmp_dir(), batch_size=4, progress=False)
    proc = KNNLogitsProcessor(store, k=3, temperature=0.01, lmbda=1.0)
    prompts = [t[:3] for t in texts["input_ids"]]
    ids, mask = pad_left(prompts)
    out = _generate(model, proc, input_ids=ids, attention_mask=mask, max_new_tokens=14, pad_token_id=PAD)
    width = ids.shape[1]
    for row, ref in zip(out.tolist(), texts["input_ids"], strict=True):
        gen = row[width:]
        assert gen[: len(ref) - 3] == ref[3:]


# ----------------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------------


def test_build_marian_keys_values_provenance_match_teacher_forcing():
    model = tiny_marian()
    pairs = random_pairs(7, seed=9)
    store = KNNDatastore.build(model, pairs, _tmp_dir(), batch_size=3, progress=False)
    i = 0
    for ex, (src, tgt) in enumerate(zip(pairs["input_ids"], pairs["labels"], strict=True)):
        dec = torch.tensor([[PAD] + tgt[:-1]])
        out = model(torch.tensor([src]), decoder_input_ids=dec, output_hidden_states=True)
        hidden = out.decoder_hidden_states[-1][0].numpy()
        for t, tok in enumerate(tgt):
            np.testing.assert_allclose(store.keys[i].astype(np.float32), hidden[t], rtol=2e-3, atol=2e-3)
            assert store.values[i] == tok
            assert store.provenance[i].tolist() == [ex, t]
            i += 1
    assert i == len(store)
    meta = store.metadata
    assert meta["model_class"] == "MarianMTModel" and meta["key_dim"] == 32 and meta["num_entries"] == i


def test_build_hashes_each_file_once_and_syncs_while_it_writes(tmp_path, monkeypatch):
    """The files' SHA-256 is recorded once: while they are written when the number of entries is known in advance
    (pre-tokenised data), else at the commit; never again at the build's own load. The rows reach the disk while the
    model runs (a sync per `sync_bytes`), not all at the close."""
    from hf_realm import hub_io
    from hf_realm.knn_build import _NpyAppender

    hashed, syncs = [], []
    real_hash, real_sync = hub_io.file_sha256, os.fdatasync
    monkeypatch.setattr(hub_io, "file_sha256", lambda path: hashed.append(Path(path).name) or real_hash(path))
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd) or real_sync(fd))
    names = ["keys.npy", "provenance.npy", "values.npy"]
    pairs = random_pairs(5, seed=3)
    store = KNNDatastore.build(tiny_marian(), pairs, tmp_path / "ds", batch_size=2, progress=False)
    assert hashed == []  # hashed as written: 5 examples' labels counted up front
    recorded = json.loads((tmp_path / "ds" / "knn_datastore.json").read_text())["sha256"]
    assert recorded == {name: real_hash(tmp_path / "ds" / name) for name in names}
    assert len(store) == sum(map(len, pairs["labels"]))
    # raw text (no count in advance): hashed at the commit, once
    with mock.patch("hf_realm.knn_build._expected_rows", return_value=None):
        KNNDatastore.build(tiny_marian(), pairs, tmp_path / "ds2", batch_size=2, progress=False)
    assert sorted(hashed) == names
    recorded = json.loads((tmp_path / "ds2" / "knn_datastore.json").read_text())["sha256"]
    assert recorded == {name: real_hash(tmp_path / "ds2" / name) for name in names}
    # the appender: a sync each time 2,500 more bytes are written, and the same file as numpy's own, whatever count
    # was expected; the digest is kept only when the count came true
    rows = np.random.default_rng(0).standard_normal((10, 125)).astype(np.float32)  # 500 bytes a row
    np.save(tmp_path / "b.npy", rows)
    for expected in (None, 10, 7, 12, 0):
        syncs.clear()
        out = _NpyAppender(tmp_path / "a.npy", np.float32, (125,), sync_bytes=2500, expected_rows=expected)
        for start in range(0, 10, 2):
            out.append(rows[start : start + 2])  # 1,000 bytes each: synced after the 3rd append (3,000 bytes unsynced)
        out.close()  # waits for the flush started on the helper thread
        assert len(syncs) == 1
        assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes(), expected
        assert out.digest == (real_hash(tmp_path / "b.npy") if expected == 10 else None), expected
        assert out.nbytes == (tmp_path / "b.npy").stat().st_size


def test_appender_flushes_on_a_helper_thread_and_reports_its_errors(tmp_path, monkeypatch):
    """The periodic `fdatasync` runs beside the writes (on a helper thread), one at a time; close waits for it, and a
    failed flush raises there: a datastore whose rows may not have reached the disk is never committed."""
    import threading

    from hf_realm.knn_build import _NpyAppender

    threads = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: threads.append(threading.current_thread().name))
    rows = np.ones((4, 250), dtype=np.float32)  # 1,000 bytes a row
    out = _NpyAppender(tmp_path / "a.npy", np.float32, (250,), sync_bytes=1000)
    for _ in range(3):
        out.append(rows)
    out.close()
    assert threads and all(name.startswith("knn-datastore-flush") for name in threads)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.ones((12, 250), dtype=np.float32))

    def failing(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", failing)
    out = _NpyAppender(tmp_path / "b.npy", np.float32, (250,), sync_bytes=1000)
    out.append(rows)
    with pytest.raises(OSError, match="No space left"):
        out.close()


def test_expected_rows_counts_what_the_build_stores(tmp_path):
    """The count a build writes its files for up front equals the entries it then stores, for an encoder-decoder's
    labels and for a decoder-only model's shifted targets under attention masks and -100 labels."""
    from hf_realm.knn_build import _expected_rows

    pairs = random_pairs(9, seed=4).map(lambda ex: {"labels": [t if t % 3 else -100 for t in ex["labels"]]})
    store = KNNDatastore.build(tiny_marian(), pairs, tmp_path / "ed", batch_size=4, progress=False)
    assert _expected_rows(pairs, 0, 9, True) == len(store) == sum(t != -100 for ex in pairs["labels"] for t in ex)
    assert _expected_rows(pairs, 2, 5, True) == sum(t != -100 for ex in pairs["labels"][2:5] for t in ex)
    rng = np.random.default_rng(5)
    ids = [rng.integers(2, VOCAB, rng.integers(2, 9)).tolist() for _ in range(7)]
    masks = [[1] * (len(x) - 1) + [int(i % 2)] for i, x in enumerate(ids)]
    labels = [[t if j % 4 else -100 for j, t in enumerate(x)] for x in ids]
    decoder_only = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": masks, "labels": labels})
    want = sum(m[t] != 0 and lab[t] != -100 for m, lab in zip(masks, labels, strict=True) for t in range(1, len(m)))
    built = KNNDatastore.build(tiny_gpt2(), decoder_only, tmp_path / "do", batch_size=3, progress=False)
    assert _expected_rows(decoder_only, 0, 7, False) == want == len(built)
    assert _expected_rows(decoder_only.select([6, 2, 4]), 0, 3, False) == sum(
        masks[i][t] != 0 and labels[i][t] != -100 for i in (6, 2, 4) for t in range(1, len(ids[i]))
    )
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]})
    assert _expected_rows(ragged, 0, 1, False) is None


def test_row_writer_queues_batches_up_to_its_byte_budget():
    """The build's writer thread takes batches in order; `submit` returns at once until the queued keys would pass
    `max_bytes_in_flight`, then waits for the oldest batch to be written."""
    import threading

    from hf_realm.knn_build import _OrderedRowWriter

    release, written = threading.Event(), []

    class SlowWriter:
        def add(self, keys, values, provenance):
            release.wait(10)
            written.append(int(values[0]))

    batch = torch.zeros(4, 8)  # 128 bytes of keys
    out = _OrderedRowWriter(SlowWriter(), max_bytes_in_flight=3 * 128)
    ok = torch.tensor(True)
    for i in range(3):
        out.submit(batch, ok, np.full(4, i), np.zeros((4, 2)), f"batch {i}")  # queued: 384 bytes, none written
    fourth = threading.Thread(target=out.submit, args=(batch, ok, np.full(4, 3), np.zeros((4, 2)), "batch 3"))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive() and written == []  # over the budget: waiting for batch 0
    release.set()
    fourth.join(10)
    out.finish()
    out.close()
    assert written == [0, 1, 2, 3]


def test_row_writer_hands_over_only_copies_seen_complete_and_its_thread_makes_no_cuda_call():
    """On CUDA the keys come back by an asynchronous copy: a batch goes to the writer thread only once its copy's event
    reports complete (queried, never waited on, by the submitting thread), in order; `finish` waits for the rest.
    The writer thread itself never touches an event (a thread blocked in a CUDA wait slowed the forward's launches)."""
    import threading

    from hf_realm.knn_build import _OrderedRowWriter

    main, calls, written = threading.get_ident(), [], []

    class FakeEvent:
        def __init__(self):
            self.complete = False

        def query(self):
            calls.append(("query", threading.get_ident()))
            return self.complete

        def synchronize(self):
            calls.append(("synchronize", threading.get_ident()))
            self.complete = True

    class Writer:
        def add(self, keys, values, provenance):
            written.append(int(values[0]))

    out = _OrderedRowWriter(Writer(), max_bytes_in_flight=10 * 128)
    events = [FakeEvent() for _ in range(4)]
    rows = lambda i: (torch.zeros(4, 8), torch.tensor(True), np.full(4, i), np.zeros((4, 2)), f"batch {i}")  # noqa: E731
    for i in range(3):  # as submit does on CUDA, with the copies' events
        out._copying.append((events[i], rows(i), 128))
        out._bytes += 128
        out._hand_over(wait=False)
    assert len(out._pending) == 0 and len(out._copying) == 3  # no copy seen complete: nothing handed over
    events[1].complete = True  # out of order: batch 1 waits behind batch 0
    out._hand_over(wait=False)
    assert len(out._pending) == 0
    events[0].complete = True
    out._hand_over(wait=False)
    assert len(out._pending) == 2 and len(out._copying) == 1
    out._copying.append((events[3], rows(3), 128))
    out._bytes += 128
    out.finish()  # waits for the copies of batches 2 and 3, then for the writes
    out.close()
    assert written == [0, 1, 2, 3]
    assert {thread for _, thread in calls} == {main}
    assert ("synchronize", main) in calls


def test_build_gpt2_and_raw_text_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    model = tiny_gpt2()
    texts = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9"]
    store = KNNDatastore.build(
        model, datasets.Dataset.from_dict({"text": texts}), tmp_path / "ds", tokenizer=tokenizer, text_column="text"
    )
    # decoder-only: state t -> token t + 1, so each text of n tokens gives n - 1 entries
    assert store.values.tolist() == [4, 5, 6, 8, 10, 11]
    assert store.provenance.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0], [2, 1]]
    out = model(torch.tensor([[3, 4, 5, 6]]), output_hidden_states=True)
    np.testing.assert_allclose(
        store.keys[:3].astype(np.float32), out.hidden_states[-1][0, :3].numpy(), rtol=2e-3, atol=2e-3
    )
    assert store.metadata["tokenizer_hash"] is not None
    store.check_model(model, tokenizer=tokenizer)
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    with pytest.raises(ValueError, match="tokenizer hash"):
        store.check_model(model, tokenizer=other)


def test_build_t5_and_bart_keys_are_the_lm_head_inputs():
    torch.manual_seed(0)
    t5_config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=PAD,
                         eos_token_id=EOS, decoder_start_token_id=PAD)  # fmt: skip
    t5 = T5ForConditionalGeneration(t5_config).eval()
    bart_config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, pad_token_id=PAD,
                             eos_token_id=EOS, bos_token_id=2, decoder_start_token_id=EOS, forced_eos_token_id=None,
                             max_position_embeddings=64)  # fmt: skip
    bart = BartForConditionalGeneration(bart_config).eval()
    pairs = random_pairs(3, seed=10)
    for model in (t5, bart):
        store = KNNDatastore.build(model, pairs, _tmp_dir(), progress=False)
        src, tgt = pairs["input_ids"][0], pairs["labels"][0]
        labels = torch.tensor([tgt])
        captured = {}
        h = model.get_output_embeddings().register_forward_pre_hook(lambda m, a, c=captured: c.update(x=a[0]))
        model(torch.tensor([src]), labels=labels)
        h.remove()
        np.testing.assert_allclose(
            store.keys[: len(tgt)].astype(np.float32), captured["x"][0].numpy(), rtol=2e-3, atol=2e-3
        )
        assert store.values[: len(tgt)].tolist() == tgt


class FakeAccelerator:
    def __init__(self, rank, world, log):
        self.process_index, self.num_processes, self.log = rank, world, log
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        self.log.append(self.process_index)


def test_multi_process_build_merges_shards_in_order(tmp_path):
    model = tiny_marian()
    pairs = random_pairs(9, seed=11)
    single = KNNDatastore.build(model, pairs, tmp_path / "single", batch_size=4, progress=False)
    log: list[int] = []
    # Rank 1 writes its shard first (it would block in wait_for_everyone); then rank 0 writes and merges.
    with mock.patch.object(KNNDatastore, "from_pretrained", side_effect=lambda p, **kw: p):
        KNNDatastore.build(model, pairs, tmp_path / "multi", batch_size=4, accelerator=FakeAccelerator(1, 2, log))
    assert (tmp_path / ".multi.shards" / "rank-00001" / "values.npy").is_file()
    # Whole batches per rank: 9 rows in batches of 4 are 3 batches, rank 1 gets the last (row 8 alone), so every
    # forward pass reads the rows the one-process build reads together and the keys agree to the bit.
    shard_rows = np.load(tmp_path / ".multi.shards" / "rank-00001" / "provenance.npy")[:, 0]
    assert sorted(set(shard_rows.tolist())) == [8]
    merged = KNNDatastore.build(model, pairs, tmp_path / "multi", batch_size=4, accelerator=FakeAccelerator(0, 2, log))
    assert np.array_equal(merged.values, single.values)
    assert np.array_equal(merged.provenance, single.provenance)
    np.testing.assert_array_equal(merged.keys, single.keys)
    assert not (tmp_path / ".multi.shards").exists()
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match=r"batch_size: expected an int >= 1, got"):
            KNNDatastore.build(model, pairs, tmp_path / "bad", batch_size=bad, progress=False)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_push_to_hub(tmp_path):
    store = random_store(counts=True)
    store.metadata["model_name_or_path"] = "tiny"
    path = store.save_pretrained(tmp_path / "ds")
    loaded = KNNDatastore.from_pretrained(path)
    np.testing.assert_array_equal(loaded.keys, store.keys)
    np.testing.assert_array_equal(loaded.values, store.values)
    np.testing.assert_array_equal(loaded.counts, store.counts)
    np.testing.assert_array_equal(loaded.provenance, store.provenance)
    assert loaded.metadata["model_name_or_path"] == "tiny"
    assert isinstance(loaded.keys, np.memmap)  # memory-mapped, not read into RAM
    meta = json.loads((path / "knn_datastore.json").read_text())
    assert meta["num_entries"] == 300 and meta["key_dtype"] == "float16" and meta["value_dtype"] == "int32"

    uploaded = {}

    def fake_upload(self, repo_id, folder_path, repo_type, commit_message):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), repo_type=repo_type)

    with (
        mock.patch("huggingface_hub.HfApi.create_repo") as create,
        mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload),
    ):
        store.push_to_hub("user/knn-store")
    create.assert_called_once()
    assert uploaded["repo_id"] == "user/knn-store" and uploaded["repo_type"] == "dataset"
    assert "keys.npy" in uploaded["files"] and "knn_datastore.json" in uploaded["files"]


def test_truncated_file_raises(tmp_path):
    path = random_store().save_pretrained(tmp_path / "ds")
    keys = path / "keys.npy"
    data = keys.read_bytes()
    keys.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        KNNDatastore.from_pretrained(path)


def test_interrupted_write_keeps_previous_store(tmp_path):
    good = random_store(seed=1).save_pretrained(tmp_path / "ds")
    writer = KNNDatastoreWriter(tmp_path / "ds", key_dim=32)
    writer.add(np.ones((3, 32)), np.arange(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not finite"):
        writer.add(np.full((2, 32), np.nan), np.arange(2), np.zeros((2, 2)))
    writer.abort()
    again = KNNDatastore.from_pretrained(good)
    assert len(again) == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp")]
    # a writer dropped without commit leaves the previous store in place as well
    w2 = KNNDatastoreWriter(tmp_path / "ds", key_dim=32)
    w2.add(np.ones((3, 32)), np.arange(3), np.zeros((3, 2)))
    assert len(KNNDatastore.from_pretrained(tmp_path / "ds")) == 300
    w2.commit()
    assert len(KNNDatastore.from_pretrained(tmp_path / "ds")) == 3


def test_merge_datastores(tmp_path):
    a, b = random_store(n=10, seed=1), random_store(n=7, seed=2, counts=True)
    pa, pb = a.save_pretrained(tmp_path / "a"), b.save_pretrained(tmp_path / "b")
    merged = KNNDatastore.from_pretrained(merge_datastores([pa, pb], tmp_path / "m"))
    np.testing.assert_array_equal(merged.keys, np.concatenate([a.keys, b.keys]))
    assert merged.counts.tolist() == [1] * 10 + b.counts.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_argument_validation_messages():
    store = random_store(n=20)
    with pytest.raises(ValueError, match=r"`k` has to be an integer in \[1, 20\].*but is 21"):
        KNNLogitsProcessor(store, k=21)
    with pytest.raises(ValueError, match="`temperature` has to be a strictly positive.*but is 0"):
        KNNLogitsProcessor(store, temperature=0)
    with pytest.raises(ValueError, match=r"`lmbda` has to be a float in \[0, 1\], but is 1.5"):
        KNNLogitsProcessor(store, lmbda=1.5)
    with pytest.raises(ValueError, match="skip_threshold"):
        KNNLogitsProcessor(store, skip_threshold=1.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        store.search(torch.zeros(1, 32), 21)


def test_model_mismatch_errors():
    model = tiny_marian(seed=0)
    store = KNNDatastore.build(model, random_pairs(3), _tmp_dir(), progress=False)
    KNNLogitsProcessor(store, k=2).attach(model).detach()  # same model: fine
    KNNLogitsProcessor(store, k=2).attach(tiny_marian(seed=0).to(torch.bfloat16)).detach()  # same weights in bf16
    with pytest.raises(ValueError, match="weights do not match"):
        KNNLogitsProcessor(store, k=2).attach(tiny_marian(seed=1))
    gpt = tiny_gpt2()  # same hidden size and vocabulary, another model
    with pytest.raises(ValueError, match="weights do not match"):
        KNNLogitsProcessor(store, k=2).attach(gpt)
    with pytest.raises(ValueError, match="model hidden size 32 != datastore key dim 16"):
        KNNLogitsProcessor(random_store(dim=16), k=2).attach(model)
    bert = BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    )
    with pytest.raises(ValueError, match="no hookable output embedding"):
        KNNLogitsProcessor(random_store(), k=2).attach(bert)
    big = KNNDatastore(keys=np.zeros((2, 32), np.float16), values=np.array([5, VOCAB + 3]))
    with pytest.raises(ValueError, match=f"token id {VOCAB + 3}"):
        KNNLogitsProcessor(big, k=1).attach(model, check_weights=False)


def test_generation_never_silently_runs_without_knn():
    model = tiny_gpt2()
    proc = KNNLogitsProcessor(random_store(), k=2)
    ids = torch.tensor([[5, 6, 7]])
    scores = torch.zeros(1, VOCAB)
    with pytest.raises(RuntimeError, match="not attached"):
        proc(ids, scores)
    with proc.attach(model, check_weights=False):
        with pytest.raises(RuntimeError, match="did not fire"):
            proc(ids, scores)  # no forward pass happened
        model(ids)
        with pytest.raises(RuntimeError, match="1 query states for 2 rows"):
            proc(ids, torch.zeros(2, VOCAB))
        model(ids)
        proc(ids, scores)
        model(ids)
        model(ids)
        with pytest.raises(RuntimeError, match="ran 2 times in one decoding step"):
            proc(torch.tensor([[5, 6, 7, 8]]), scores)
    # a second model generating while the processor hooks the first: the hook never fires
    other = tiny_gpt2(seed=3)
    with proc.attach(model, check_weights=False), pytest.raises(RuntimeError, match="did not fire"):
        other.generate(ids, max_new_tokens=2, logits_processor=LogitsProcessorList([proc]), pad_token_id=PAD)


def test_nan_states_raise():
    model = tiny_gpt2()
    proc = KNNLogitsProcessor(random_store(), k=2)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf hidden states"), proc.attach(model, check_weights=False):
        model.generate(
            torch.tensor([[5, 6]]), max_new_tokens=2, logits_processor=LogitsProcessorList([proc]), pad_token_id=PAD
        )
    with pytest.raises(ValueError, match="non-finite hidden states"):
        KNNDatastore.build(model, random_texts(2), _tmp_dir(), progress=False)


def test_nan_in_a_later_batch_leaves_the_previous_store(tmp_path):
    """Rows are written on a background thread while the next batch runs: a bad batch after good ones still fails
    the build, names its examples, and leaves the datastore already at the path as it was."""
    model = tiny_gpt2()
    target = tmp_path / "store"
    KNNDatastore.build(model, random_texts(3, seed=1), target, progress=False)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def third_batch_nan(module, args, output):
        calls.append(1)
        return output.masked_fill(torch.ones_like(output, dtype=torch.bool), float("nan")) if len(calls) == 3 else None

    handle = model.transformer.ln_f.register_forward_hook(third_batch_nan)
    try:
        with pytest.raises(ValueError, match=r"non-finite hidden states .* examples 4\.\.5"):
            KNNDatastore.build(model, random_texts(9), target, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) >= 3
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no staging directory left behind


# ----------------------------------------------------------------------------------------------------------------------
# Adaptive retrieval and kNN-LM perplexity
# ----------------------------------------------------------------------------------------------------------------------


def test_adaptive_retrieval_skips_confident_rows():
    model = tiny_gpt2()
    store = random_store()
    ids = torch.randint(2, VOCAB, (6, 4), generator=torch.Generator().manual_seed(3))
    full = KNNLogitsProcessor(store, k=4, temperature=3.0, lmbda=0.5)
    with full.attach(model, check_weights=False):
        scores = model(ids).logits[:, -1].float()
        ref = full(ids, scores)
    maxp = torch.softmax(scores, -1).max(-1).values
    threshold = float(maxp.median())
    proc = KNNLogitsProcessor(store, k=4, temperature=3.0, lmbda=0.5, skip_threshold=threshold)
    with proc.attach(model, check_weights=False):
        model(ids)
        out = proc(ids, scores)
    searched = maxp < threshold
    assert proc.num_searches == int(searched.sum()) and proc.num_skipped == 6 - int(searched.sum())
    assert 0 < proc.num_skipped < 6
    torch.testing.assert_close(out[searched], ref[searched], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[~searched], torch.log_softmax(scores[~searched], -1), rtol=0, atol=1e-6)


def test_knn_lm_perplexity_matches_numpy_reference():
    model = tiny_gpt2()
    data = random_texts(6, seed=12)
    store = random_store(seed=13)
    out = knn_lm_perplexity(model, store, data, k=5, temperature=2.0, lmbdas=[0.0, 0.4], batch_size=4, progress=False)
    nll_base = nll_knn = 0.0
    count = 0
    for seq in data["input_ids"]:
        cap = {}
        h = model.lm_head.register_forward_pre_hook(lambda m, a, c=cap: c.update(x=a[0]))
        logits = model(torch.tensor([seq])).logits[0, :-1].double().numpy()
        h.remove()
        states = cap["x"][0, :-1].numpy()
        gold = np.array(seq[1:])
        mixed, _ = reference_mix(states, logits, store.keys, store.values, 5, 2.0, 0.4)
        lm = logits - logits.max(1, keepdims=True)
        lm = lm - np.log(np.exp(lm).sum(1, keepdims=True))
        nll_base -= lm[np.arange(len(gold)), gold].sum()
        nll_knn -= mixed[np.arange(len(gold)), gold].sum()
        count += len(gold)
    assert out["num_tokens"] == count
    np.testing.assert_allclose(out["base_perplexity"], np.exp(nll_base / count), rtol=1e-5)
    np.testing.assert_allclose(out["knn_perplexity"][0.0], np.exp(nll_base / count), rtol=1e-5)
    np.testing.assert_allclose(out["knn_perplexity"][0.4], np.exp(nll_knn / count), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The example and the real-data experiment, end to end (slow)
# ----------------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _load_script(relpath: str):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_knn_translate_builtin_task_gains_bleu(tmp_path):
    with torch.enable_grad():
        results = _load_script("examples/knn_translate.py").main(
            [
                "--output_dir",
                str(tmp_path),
                "--k_grid",
                "8,16",
                "--temperature_grid",
                "1,10",
                "--lmbda_grid",
                "0.5,0.7",
            ]
        )
    saved = json.loads((tmp_path / "all_results.json").read_text())
    assert saved["test_knn_bleu"] == results["test_knn_bleu"]
    assert results["test_knn_bleu"] >= results["test_base_bleu"] + 5, results
    assert results["datastore_entries"] == len(KNNDatastore.from_pretrained(tmp_path / "datastore"))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "multi_domain_deen").is_dir(), reason="shared data not present")
def test_knn_mt_experiment_pipeline_on_cpu(tmp_path):
    exp = _load_script("benchmarks/knn_mt_experiment.py")
    with torch.enable_grad():
        exp.main(["train", "--data_dir", str(SHARED_DATA), "--output_dir", str(tmp_path / "model"), "--max_pairs",
                  "2000", "--max_steps", "30", "--d_model", "32", "--layers", "1", "--heads", "4", "--ffn_dim", "64",
                  "--vocab_size", "800", "--max_tokens", "2000", "--dev_samples", "10"])  # fmt: skip
    data = exp.main(["evaluate", "--model_dir", str(tmp_path / "model"), "--data_dir", str(SHARED_DATA),
                     "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
                     "--max_datastore_pairs", "60", "--max_dev_pairs", "8", "--max_test_pairs", "8", "--k_grid", "4",
                     "--lmbda_grid", "0.5", "--temperature_factors", "1", "--beams", "2", "--fractions", "0.5",
                     "--merge_neighbors", "4", "--merge_passes", "2", "--compression", "pca16,cluster0.5+pca16+pq4",
                     "--skip_thresholds", "0.9", "--max_new_tokens", "8", "--retune", "pca16,cluster@0.5",
                     "--ivf", "2:union,100000:query,100000:union@pca16"])  # fmt: skip
    for domain in ("koran", "it"):
        sweep = data[domain]["sweep"]
        # IVF rows: the same entries; reading every list (nprobe capped at nlist) is the exact search
        union, every = sweep["ivf-union-nprobe2"], sweep["ivf-query-nprobe100000"]
        assert union["nprobe"] == 2 and union["scan"] == "union" and 0 < union["recall_vs_exact"] <= 1
        assert every["nprobe"] == every["nlist"] and every["recall_vs_exact"] == 1.0
        assert every["bleu"] == sweep["full"]["bleu"] and every["entries"] == sweep["full"]["entries"]
        # lists over the PCA-16 store, every one read: that store's exact search, so its BLEU
        pca_every = sweep["pca16+ivf-union-nprobe100000"]
        assert pca_every["over"] == "pca16" and pca_every["recall_vs_exact"] == 1.0
        assert pca_every["bleu"] == sweep["pca16"]["bleu"] and pca_every["bytes"] == sweep["pca16"]["bytes"]
        names = {"full", "random@0.5", "cluster@0.5", "greedy_merge@0.5", "greedy_merge_mean@0.5", "confidence@0.5"}
        assert names | {"pca16", "pca16 (retuned)", "cluster0.5+pca16+pq4", "adaptive@0.9"} <= set(sweep)
        # the retuned row uses the setting picked on dev, from the grid it records
        grid = data[domain]["retune_grid"]["pca16"]
        best = max(grid, key=lambda g: g["dev_bleu"])
        assert sweep["pca16 (retuned)"]["retuned"] == {key: best[key] for key in ("k", "temperature", "lmbda")}
        assert sweep["random@0.5"]["entries"] == round(data[domain]["datastore"]["entries"] * 0.5)
        assert sweep["cluster@0.5 (retuned)"]["entries"] == sweep["cluster@0.5"]["entries"]
        # the saved hypotheses give the row's BLEU, and the bootstrap interval is taken from them
        refs = exp._pairs(SHARED_DATA / "multi_domain_deen", *(f"{exp.DOMAINS[domain][2]}.{x}" for x in ("de", "en")),
                          None, 8)[1]  # fmt: skip
        hyps = (tmp_path / "out" / "hyps" / domain / "cluster@0.5_retuned.txt").read_text().split("\n")[:-1]
        assert exp.corpus_bleu(hyps, refs) == sweep["cluster@0.5 (retuned)"]["bleu"]
        assert "ci95" in sweep["cluster@0.5 (retuned)"]["bootstrap"]
        assert sweep["cluster@0.5 (retuned)"]["dev_bleu"] == max(
            g["dev_bleu"] for g in data[domain]["retune_grid"]["cluster@0.5"]
        )
    assert (tmp_path / "out" / "knn_mt_pruning.png").is_file() and (tmp_path / "out" / "knn_mt_table.md").is_file()
    # `report` rebuilds the same table from the saved results and hypotheses
    table = (tmp_path / "out" / "knn_mt_table.md").read_text()
    (tmp_path / "out" / "knn_mt_table.md").unlink()
    exp.main(["report", "--output_dir", str(tmp_path / "out"), "--data_dir", str(SHARED_DATA)])
    assert (tmp_path / "out" / "knn_mt_table.md").read_text() == table


def test_knn_mt_experiment_ivf_row_names():
    exp = _load_script("benchmarks/knn_mt_experiment.py")
    assert exp.ivf_row_name("8") == "ivf-query-nprobe8"
    assert exp.ivf_row_name("8:union") == "ivf-union-nprobe8"
    assert exp.ivf_row_name("32:query@pca128+pq32") == "pca128+pq32+ivf-query-nprobe32"


def test_knn_mt_experiment_budget_picks_choose_on_dev():
    """The per-budget pick is the re-tuned store with the best dev BLEU that fits, whatever its test BLEU."""
    exp = _load_script("benchmarks/knn_mt_experiment.py")
    full = {"entries": 1000, "bytes": 100_000, "bleu": 12.0, "gain_kept": 1.0}
    d = {
        "base": {"dev_bleu_greedy": 4.0, "test_bleu_greedy": 2.0},
        "tuned": {"dev_bleu": 14.0, "k": 8, "temperature": 10.0, "lmbda": 0.5},
        "retune_grid": {
            name: [{"dev_bleu": dev - 1}, {"dev_bleu": dev}]
            for name, dev in [
                ("cluster@0.25", 13.0),
                ("random@0.25", 12.0),
                ("cluster@0.5", 13.9),
                ("pq32", 11.0),
                ("pca64+pq32", 12.5),
            ]
        },  # fmt: skip
        "sweep": {
            "full": full,
            "cluster@0.25": {"entries": 250, "bytes": 25_000, "bleu": 11.5, "gain_kept": 0.95},
            "cluster@0.25 (retuned)": {"entries": 250, "bytes": 25_000, "bleu": 10.0, "gain_kept": 0.8, "retuned": {}},
            "random@0.25 (retuned)": {"entries": 250, "bytes": 25_000, "bleu": 11.9, "gain_kept": 0.99, "retuned": {}},
            "cluster@0.5 (retuned)": {"entries": 500, "bytes": 50_000, "bleu": 12.0, "gain_kept": 1.0, "retuned": {}},
            "pq32 (retuned)": {
                "entries": 1000,
                "bytes": 9_000,
                "bleu": 9.0,
                "gain_kept": 0.7,
                "retuned": {},
                "dev_bleu": 11.0,
            },  # fmt: skip
            "pca64+pq32 (retuned)": {"entries": 1000, "bytes": 10_000, "bleu": 8.0, "gain_kept": 0.6, "retuned": {}},
        },
    }
    for row in d["sweep"].values():
        row["tokens_per_second"] = 1.0
    picks = {p["budget"]: p for p in exp.budget_picks(d)}
    entries, nbytes = picks["25% of the entries"], picks["10x fewer bytes"]
    # cluster@0.5 has the best dev BLEU but does not fit; random@0.25 has the best test BLEU but loses on dev
    assert entries["candidates"] == ["cluster@0.25 (retuned)", "random@0.25 (retuned)"]
    assert (entries["chosen"], entries["test_bleu"], entries["test_gain_kept"]) == (
        "cluster@0.25 (retuned)",
        10.0,
        0.8,
    )
    assert entries["dev_gain_kept"] == pytest.approx((13.0 - 4.0) / (14.0 - 4.0))
    assert nbytes["chosen"] == "pca64+pq32 (retuned)" and nbytes["dev_gain_kept"] == pytest.approx(0.85)
    assert "budget | chosen on dev" in exp.summary_table({"it": d})


def test_knn_mt_experiment_bleu_statistics_and_bootstrap():
    """Summed per-sentence statistics give sacrebleu's corpus BLEU; the bootstrap ratio is exact at the two ends."""
    import sacrebleu

    exp = _load_script("benchmarks/knn_mt_experiment.py")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat . dog ran far away , and then it slept".split()
    refs = [" ".join(rng.choice(words, rng.integers(3, 15))) for _ in range(60)]

    def noisy(p):
        return [" ".join(w if rng.random() > p else str(rng.choice(words)) for w in r.split()) for r in refs]

    base, full, row = noisy(0.7), noisy(0.2), noisy(0.3)
    base[0] = ""  # an empty hypothesis
    stats = {name: exp.sentence_bleu_stats(h, refs) for name, h in (("base", base), ("full", full), ("row", row))}
    for name, h in (("base", base), ("full", full), ("row", row)):
        assert exp.bleu_from_stats(stats[name].sum(0)) == pytest.approx(
            sacrebleu.corpus_bleu(h, [refs]).score, abs=1e-9
        )
        idx = rng.integers(0, len(refs), len(refs))  # a resample is the corpus BLEU of the resampled sentences
        assert exp.bleu_from_stats(stats[name][idx].sum(0)) == pytest.approx(
            sacrebleu.corpus_bleu([h[i] for i in idx], [[refs[i] for i in idx]]).score, abs=1e-9
        )
    same = exp.bootstrap_gain_kept(stats["base"], stats["full"], stats["full"], samples=50)
    assert same["ci95"] == [1.0, 1.0] and same["p_at_least_90"] == 1.0
    none = exp.bootstrap_gain_kept(stats["base"], stats["full"], stats["base"], samples=50)
    assert none["ci95"] == [0.0, 0.0] and none["p_at_least_90"] == 0.0
    mid = exp.bootstrap_gain_kept(stats["base"], stats["full"], stats["row"], samples=200)
    point = (exp.bleu_from_stats(stats["row"].sum(0)) - exp.bleu_from_stats(stats["base"].sum(0))) / (
        exp.bleu_from_stats(stats["full"].sum(0)) - exp.bleu_from_stats(stats["base"].sum(0))
    )
    assert mid["ci95"][0] < point < mid["ci95"][1]


def test_prune_datastore_example_sweeps_a_knn_translate_run(tmp_path):
    """examples/prune_datastore.py on a quick knn_translate.py run: every row is the BLEU of its own smaller store."""
    from hf_realm.knn_pruning import shrink_datastore

    knn_translate = _load_script("examples/knn_translate.py")
    prune = _load_script("examples/prune_datastore.py")
    knn_dir, out = tmp_path / "knn", tmp_path / "prune"
    # bad input fails before anything is written
    with pytest.raises(ValueError, match="--methods: expected some of"):
        prune.main(["--knn_dir", str(knn_dir), "--output_dir", str(out), "--methods", "random,magic"])
    with pytest.raises(ValueError, match="unknown step 'pcb8'"):
        prune.main(["--knn_dir", str(knn_dir), "--output_dir", str(out), "--compression", "pcb8"])
    with pytest.raises(FileNotFoundError, match="expected the output of knn_translate.py"):
        prune.main(["--knn_dir", str(knn_dir), "--output_dir", str(out)])
    assert not out.exists()

    with torch.enable_grad():
        knn_translate.main(["--output_dir", str(knn_dir), "--synthetic_train_steps", "300", "--tune", "false",
                            "--k", "8", "--temperature", "10", "--lmbda", "0.7", "--num_beams", "1"])  # fmt: skip
    results = prune.main(["--knn_dir", str(knn_dir), "--output_dir", str(out), "--methods", "random,cluster,greedy_merge",
                          "--fractions", "0.5,0.1", "--compression", "pca16,cluster@0.5+pq8", "--max_test_samples", "60",
                          "--merge_neighbors", "8", "--save_stores", "true"])  # fmt: skip
    sweep = results["sweep"]
    assert list(sweep) == ["full", "random@0.5", "random@0.1", "cluster@0.5", "cluster@0.1", "greedy_merge@0.5",
                           "greedy_merge@0.1", "pca16", "cluster@0.5+pq8"]  # fmt: skip

    # the reference: the same stores built and decoded by hand
    tok = AutoTokenizer.from_pretrained(knn_dir / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(knn_dir / "model").eval()
    store = KNNDatastore.from_pretrained(knn_dir / "datastore")
    rows = [json.loads(line) for line in (knn_dir / "test_hypotheses.jsonl").read_text().splitlines()[:60]]
    src, ref = [r["source"] for r in rows], [r["reference"] for r in rows]
    kw = dict(batch_size=64, max_new_tokens=62, max_source_length=64, num_beams=1)
    base = knn_translate.corpus_bleu(knn_translate.translate(model, tok, src, **kw)[0], ref)
    assert results["base"]["bleu"] == base
    full = sweep["full"]["bleu"]
    # Shrinking is a function of the seed on one device (faiss on the CPU; torch with sorted, not atomic, sums on the
    # GPU; PQ codebooks always trained on the CPU), but CPU and GPU k-means round differently: the reference shrinks
    # on the device the example used.
    for name in ("full", "random@0.1", "cluster@0.5+pq8"):
        small = store if name == "full" else shrink_datastore(store, name, device=results["device"])
        hyps, _ = knn_translate.translate_with_knn(model, tok, src, small, 8, 10.0, 0.7, **kw)
        assert sweep[name]["bleu"] == knn_translate.corpus_bleu(hyps, ref), name
        assert sweep[name]["entries"] == len(small) and sweep[name]["bytes"] == small.nbytes
        assert sweep[name]["gain_kept"] == pytest.approx((sweep[name]["bleu"] - base) / (full - base))
    assert sweep["random@0.1"]["fraction"] == sweep["random@0.1"]["entries"] / len(store)  # entries for pruning
    assert sweep["cluster@0.5+pq8"]["fraction"] == sweep["cluster@0.5+pq8"]["bytes"] / store.nbytes  # bytes otherwise
    assert sweep["random@0.1"]["entries"] == round(len(store) * 0.1)
    saved = KNNDatastore.from_pretrained(out / "stores" / "random@0.1")
    np.testing.assert_array_equal(saved.values, shrink_datastore(store, "random@0.1", device="cpu").values)
    assert json.loads((out / "prune_results.json").read_text())["sweep"] == sweep
    assert "| random@0.1 |" in (out / "prune_table.md").read_text() and (out / "prune_plot.png").stat().st_size > 0
