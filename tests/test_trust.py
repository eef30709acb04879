"""Trust (issue 14): inputs that used to give silently wrong answers or obscure errors now raise, or are right.

Non-finite kNN keys and queries, duplicate or unordered block ids, a processor attached but not passed to generate,
weights fingerprints that miss unsampled changes, tokenizers larger than the model's vocabulary, empty answers.
"""

from __future__ import annotations

import hashlib
import json
import types
import warnings

import datasets
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel, LogitsProcessorList

from hf_realm import (
    KNNDatastore,
    KNNLogitsProcessor,
    RealmBlockIndex,
    RealmForInverseClozeTask,
    RealmForMaskedLM,
    RealmForOpenQA,
    embedder_fingerprint,
)
from hf_realm.checks import _validate_finite
from hf_realm.fingerprint import _fingerprints_match, model_fingerprint
from hf_realm.openqa import DataCollatorForOpenQA, evaluate_open_qa
from hf_realm.pretraining import evaluate_masked_lm, train_inverse_cloze_task

from .conftest import BLOCKS, WORDS, toy_openqa, toy_openqa_config, toy_tokenizer
from .test_knn_generation import PAD, tiny_gpt2


pytestmark = pytest.mark.usefixtures("one_thread")


def random_keys(n=40, dim=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float16)


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite keys and queries
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_and_inf_keys_are_refused_in_the_constructor():
    keys = random_keys()
    keys[3, 5] = np.nan
    keys[7, 0] = np.inf
    keys[30, 31] = -np.inf
    with pytest.raises(ValueError, match=r"^keys: 3 of 40 rows hold NaN or inf, the first is row 3\."):
        KNNDatastore(keys=keys, values=np.arange(40))
    big = random_keys().astype(np.float32)
    big[11, 2] = 1e6  # finite in float32, inf once stored as float16
    with pytest.raises(ValueError, match=r"1 of 40 rows hold NaN or inf, the first is row 11\. float16 holds"):
        KNNDatastore(keys=big, values=np.arange(40))
    with pytest.raises(ValueError, match="first is row 0"):
        KNNDatastore(keys=torch.full((2, 4), float("nan")), values=[1, 2])
    store = KNNDatastore(keys=random_keys(), values=np.arange(40))  # finite keys: accepted
    assert len(store) == 40


def test_the_finite_check_streams_in_chunks():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(1000, 8)).astype(np.float16)
    bad_rows = np.sort(rng.choice(1000, size=17, replace=False))
    keys[bad_rows, rng.integers(0, 8, 17)] = np.nan
    # 3 rows (48 bytes) a chunk: the count and the first row must come out the same across 334 chunks
    with pytest.raises(ValueError, match=rf"^keys: 17 of 1000 rows hold NaN or inf, the first is row {bad_rows[0]}\."):
        _validate_finite(keys, "keys", chunk_bytes=48)
    reads = []

    class Spy(np.ndarray):
        def __getitem__(self, item):
            reads.append(item)
            return np.ndarray.__getitem__(self, item)

    _validate_finite(np.zeros((1000, 8), np.float16).view(Spy), "keys", chunk_bytes=1600)  # 100 rows a chunk
    assert reads == [slice(s, s + 100) for s in range(0, 1000, 100)]


def test_nan_keys_written_on_disk_are_refused_at_load(tmp_path):
    KNNDatastore(keys=random_keys(), values=np.arange(40)).save_pretrained(tmp_path / "ds")
    keys = np.load(tmp_path / "ds" / "keys.npy", mmap_mode="r+")
    keys[21, 4] = np.nan
    keys[25, 4] = np.inf
    keys.flush()
    del keys
    with pytest.raises(ValueError, match=r"keys\.npy is altered"):  # the hash recorded at save catches it first
        KNNDatastore.from_pretrained(tmp_path / "ds")
    # without the hash check (a trusted multi-GB store), or a store written with NaN keys: the constructor refuses it
    match = r"keys \(in .*keys\.npy\): 2 of 40 rows hold NaN or inf, the first is row 21"
    with pytest.raises(ValueError, match=match):
        KNNDatastore.from_pretrained(tmp_path / "ds", verify_hashes=False)
    with pytest.raises(ValueError, match="first is row 21"):
        KNNDatastore.from_pretrained(tmp_path / "ds", mmap=False, verify_hashes=False)


def test_non_finite_pq_codebooks_and_projection_are_refused():
    codes = np.zeros((5, 2), np.uint8)
    codebooks = np.ones((2, 4, 3), np.float32)
    KNNDatastore(values=np.arange(5), pq={"codes": codes, "codebooks": codebooks})
    codebooks[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"^pq codebooks: 1 of 2 rows hold NaN or inf, the first is row 1\."):
        KNNDatastore(values=np.arange(5), pq={"codes": codes, "codebooks": codebooks})
    matrix, bias = np.ones((6, 4), np.float32), np.zeros(4, np.float32)
    matrix[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"^projection matrix: 1 of 6 rows .* row 4\."):
        KNNDatastore(keys=random_keys(dim=4), values=np.arange(40), projection={"matrix": matrix, "bias": bias})
    bias[2] = np.nan
    with pytest.raises(ValueError, match=r"^projection bias: 1 of 1 rows"):
        KNNDatastore(
            keys=random_keys(dim=4),
            values=np.arange(40),
            projection={"matrix": np.ones((6, 4), np.float32), "bias": bias},
        )


def test_a_non_finite_query_raises_instead_of_returning_nan_distances():
    store = KNNDatastore(keys=random_keys(), values=np.arange(40))
    queries = torch.randn(4, 32)
    queries[2, 7] = float("nan")
    queries[3, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"^2 of 4 queries hold NaN or inf, the first is row 2$"):
        store.search(queries, k=3)
    # finite queries: squared distances equal a float64 brute force
    q = torch.randn(3, 32)
    sqdist, ids = store.search(q, k=3)
    ref = ((q.double()[:, None] - torch.from_numpy(store.keys.astype(np.float64))[None]) ** 2).sum(-1)
    ref_d, ref_ids = ref.sort(dim=1)
    assert torch.equal(ids, ref_ids[:, :3])
    torch.testing.assert_close(sqdist.double(), ref_d[:, :3], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Block ids
# ----------------------------------------------------------------------------------------------------------------------


def corpus_with_ids(block_ids):
    return datasets.Dataset.from_dict({"block_id": block_ids, "text": [f"block {i}" for i in range(len(block_ids))]})


def test_duplicate_block_ids_are_refused():
    with pytest.raises(ValueError, match=r"holds 1 duplicated ids \(block_id 2 is at rows 2 and 3\)"):
        RealmBlockIndex(corpus_with_ids([0, 1, 2, 2]), torch.eye(4), backend="torch")


def test_block_ids_must_be_row_numbers():
    with pytest.raises(ValueError, match=r"must be 0\.\.3 in row order .* but row 0 has block_id 3"):
        RealmBlockIndex(corpus_with_ids([3, 2, 1, 0]), torch.eye(4), backend="torch")
    with pytest.raises(ValueError, match="row 2 has block_id 7"):
        RealmBlockIndex(corpus_with_ids([0, 1, 7, 3]), torch.eye(4), backend="torch")
    # a selection of a built corpus keeps its old block ids: refused, not silently renumbered
    corpus = corpus_with_ids([0, 1, 2, 3])
    with pytest.raises(ValueError, match="row 0 has block_id 2"):
        RealmBlockIndex(corpus.select([2, 0, 1]), torch.eye(3), backend="torch")
    # the same corpus sorted back into block-id order is accepted, and search agrees with get_blocks
    shuffled = corpus_with_ids([2, 0, 3, 1]).sort("block_id")
    index = RealmBlockIndex(shuffled, torch.eye(4), backend="torch")
    _, ids = index.search(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), k=1)
    assert ids.tolist() == [[2], [1]]
    assert index.get_blocks(ids)["block_id"] == [2, 1]
    assert len(RealmBlockIndex(datasets.Dataset.from_dict({"text": ["a", "b"]}), torch.eye(2), backend="torch")) == 2


# ----------------------------------------------------------------------------------------------------------------------
# A processor attached but not passed to generate()
# ----------------------------------------------------------------------------------------------------------------------


def test_attached_but_not_passed_to_generate_warns():
    model = tiny_gpt2()
    store = KNNDatastore(keys=random_keys(), values=np.full(40, 7))
    proc = KNNLogitsProcessor(store, k=2, lmbda=1.0)
    ids = torch.tensor([[5, 6]])
    with pytest.warns(UserWarning, match=r"3 forward passes but the KNNLogitsProcessor was called 0 times") as rec:
        with torch.no_grad(), proc.attach(model, check_weights=False):
            plain = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert "logits_processor=[processor]" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the `with` statement
    # the same through detach()
    proc.attach(model, check_weights=False)
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with pytest.warns(UserWarning, match="2 forward passes .* called 0 times"):
        proc.detach()
    # passed to generate: no warning, and lmbda=1 puts the datastore's only value everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), proc.attach(model, check_weights=False):
            out = model.generate(
                ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD, logits_processor=LogitsProcessorList([proc])
            )
        with proc.attach(model, check_weights=False):  # attached, the model never ran: nothing to warn about
            pass
    assert out[0, 2:].tolist() == [7, 7, 7] and plain[0, 2:].tolist() != [7, 7, 7]


def test_no_warning_over_an_exception():
    model = tiny_gpt2()
    proc = KNNLogitsProcessor(KNNDatastore(keys=random_keys(), values=np.full(40, 7)), k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError), torch.no_grad(), proc.attach(model, check_weights=False):
            model(torch.tensor([[5, 6]]))
            raise KeyError("user error")


# ----------------------------------------------------------------------------------------------------------------------
# Weights fingerprints
# ----------------------------------------------------------------------------------------------------------------------


def reference_embedder_fingerprint(module) -> str:
    """The embedder fingerprint as written before the shared implementation (indexes on disk hold it)."""
    digests = set()
    for tensor in module.state_dict().values():
        if not tensor.is_floating_point():
            continue
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h = hashlib.sha256(repr(tuple(t.shape)).encode())
        h.update(t.numpy().astype("<f4", copy=False).data)
        digests.add(h.hexdigest())
    return "sha256:" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def reference_sampled_fingerprint(model, samples_per_tensor=16) -> dict:
    """The 16-sample fingerprint that datastores saved before the full hash hold (scheme 1)."""
    names, values, seen = [], [], set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if not torch.is_floating_point(tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, steps=min(flat.numel(), samples_per_tensor)).round().long()
        names.append(f"{name}:{tuple(tensor.shape)}")
        values.append(flat[positions].float())
    sample = torch.cat(values).numpy().astype(np.float32)
    digest = hashlib.sha256("\n".join(names).encode() + sample.tobytes()).hexdigest()
    return {"sha256": digest, "values": sample.tolist(), "num_parameters": sum(p.numel() for p in model.parameters())}


def unsampled_change(model) -> GPT2LMHeadModel:
    """``model`` with one weight changed at a position the 16-sample fingerprint does not read."""
    weight = model.transformer.h[1].mlp.c_fc.weight  # 32 x 128: samples at round(linspace(0, 4095, 16))
    sampled = set(torch.linspace(0, weight.numel() - 1, 16).round().long().tolist())
    position = 1000
    assert position not in sampled
    with torch.no_grad():
        weight.view(-1)[position] += 0.5
    return model


def test_embedder_fingerprint_is_unchanged_and_shared_with_the_model_fingerprint():
    model = tiny_gpt2()
    assert embedder_fingerprint(model) == reference_embedder_fingerprint(model)
    assert model_fingerprint(model)["sha256"] == embedder_fingerprint(model).removeprefix("sha256:")
    assert embedder_fingerprint(model.to(torch.bfloat16)) == reference_embedder_fingerprint(model)


def test_a_store_from_weights_differing_in_an_unsampled_value_is_refused(tmp_path):
    model = tiny_gpt2()
    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11]]})
    store = KNNDatastore.build(model, data, tmp_path / "ds", progress=False)
    store.check_model(model)
    other = unsampled_change(tiny_gpt2())
    assert reference_sampled_fingerprint(other)["sha256"] == reference_sampled_fingerprint(model)["sha256"]
    with pytest.raises(ValueError, match="weights do not match"):
        store.check_model(other)
    with pytest.raises(ValueError, match="weights do not match"):
        KNNLogitsProcessor(store, k=2).attach(other)
    # dtype tolerance kept: the same weights in bf16 or fp16, and back, match; other weights in bf16 do not
    store.check_model(tiny_gpt2().to(torch.bfloat16))
    store.check_model(tiny_gpt2().half())
    with pytest.raises(ValueError, match="weights do not match"):
        store.check_model(unsampled_change(tiny_gpt2()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="weights do not match"):
        store.check_model(tiny_gpt2(seed=1).half())
    bf16_store = KNNDatastore.build(tiny_gpt2().to(torch.bfloat16), data, tmp_path / "bf16", progress=False)
    bf16_store.check_model(tiny_gpt2())


def test_the_fingerprint_follows_in_place_changes():
    model = tiny_gpt2()
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before  # cached
    unsampled_change(model)  # in place: the cache must notice
    after = model_fingerprint(model)
    assert after["sha256"] != before["sha256"] and after["sample_sha256"] == before["sample_sha256"]
    assert not _fingerprints_match(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_host_bytes", [1 << 31, 0])  # hashed on a helper thread, or at once (a large model)
def test_fingerprint_started_beside_a_build_equals_the_direct_one(dtype, max_host_bytes):
    from hf_realm.fingerprint import _CACHE, start_model_fingerprint

    model = tiny_gpt2().to(dtype)  # its output layer is tied to the input embedding
    started = start_model_fingerprint(model, max_host_bytes=max_host_bytes)()
    assert _CACHE[model][1] == started  # cached like model_fingerprint's
    del _CACHE[model]
    assert started == model_fingerprint(model)
    assert started["sha256"] == reference_embedder_fingerprint(model).removeprefix("sha256:")
    assert start_model_fingerprint(model)() == started  # from the cache


def test_fingerprint_started_before_an_in_place_change_is_not_cached():
    from hf_realm.fingerprint import _CACHE, start_model_fingerprint

    model = tiny_gpt2()
    result = start_model_fingerprint(model)
    before = model_fingerprint(tiny_gpt2())  # the same weights, another model
    unsampled_change(model)
    assert result()["sha256"] == before["sha256"]  # the weights as they were when it started
    assert model not in _CACHE
    assert model_fingerprint(model)["sha256"] != before["sha256"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fingerprint_hashed_on_the_host_equals_the_one_hashed_on_the_device():
    from hf_realm.fingerprint import _CACHE, start_model_fingerprint

    for dtype in (torch.float16, torch.float32):
        model = tiny_gpt2().to("cuda", dtype)
        started = start_model_fingerprint(model)()  # bf16 cast and widening on the host
        del _CACHE[model]
        assert started == model_fingerprint(model)  # bf16 cast and widening on the device


def test_datastores_with_the_old_sampled_fingerprint_still_load(tmp_path):
    model = tiny_gpt2()
    KNNDatastore(keys=random_keys(dim=32), values=np.arange(40)).save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "knn_datastore.json"
    meta = json.loads(config.read_text())
    meta["model_fingerprint"] = reference_sampled_fingerprint(model)
    config.write_text(json.dumps(meta))
    store = KNNDatastore.from_pretrained(tmp_path / "old")
    store.check_model(model)  # equal sample hash
    store.check_model(tiny_gpt2().to(torch.bfloat16))  # samples within the bf16 tolerance
    with pytest.raises(ValueError, match="weights do not match"):
        store.check_model(tiny_gpt2(seed=1))
    assert model_fingerprint(model)["sample_sha256"] == reference_sampled_fingerprint(model)["sha256"]


# ----------------------------------------------------------------------------------------------------------------------
# A tokenizer larger than the model's vocabulary; empty answers
# ----------------------------------------------------------------------------------------------------------------------


def open_qa_model(tokenizer) -> RealmForOpenQA:
    return toy_openqa(tokenizer, toy_openqa_config(num_block_records=len(BLOCKS))).eval()


def big_tokenizer():
    tokenizer = toy_tokenizer()
    tokenizer.add_tokens(["zebra", "yak"])
    assert len(tokenizer) == len(WORDS) + 2
    return tokenizer


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_early():
    small, big = toy_tokenizer(), big_tokenizer()
    expected = rf"has {len(WORDS) + 2} tokens but the model's config.vocab_size is {len(WORDS)}"
    questions = datasets.Dataset.from_dict({"question": ["who wrote hamlet ?"], "answers": [["shakespeare"]]})
    model = open_qa_model(small)
    with pytest.raises(ValueError, match="the question tokenizer " + expected):
        evaluate_open_qa(model, questions, big)
    batch = DataCollatorForOpenQA(big)([{"question": "who wrote zebra ?", "answers": ["yak"]}])
    with pytest.raises(ValueError, match=rf"input_ids hold token id {len(WORDS)} but .*vocab_size is {len(WORDS)}"):
        model(**batch)  # was: IndexError: index out of range in self
    with pytest.raises(ValueError, match="the retriever's tokenizer " + expected):
        open_qa_model(big)(**DataCollatorForOpenQA(small)([{"question": "who wrote hamlet ?", "answers": ["x"]}]))
    ict = RealmForInverseClozeTask(toy_openqa_config())
    with pytest.raises(ValueError, match="the tokenizer " + expected):
        train_inverse_cloze_task(ict, datasets.Dataset.from_dict({"text": BLOCKS}), big, training_args=None)
    collator = types.SimpleNamespace(tokenizer=big)
    with pytest.raises(ValueError, match="the collator's tokenizer " + expected):
        evaluate_masked_lm(
            RealmForMaskedLM(toy_openqa_config()), datasets.Dataset.from_dict({"text": ["a"]}), collator
        )
    # the model's own tokenizer: evaluation runs (EM is a number in [0, 1])
    metrics, _ = evaluate_open_qa(model, questions, small, recall_ks=(1,))
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_empty_answers_are_refused_with_a_clear_error():
    tokenizer = toy_tokenizer()
    model = open_qa_model(tokenizer)
    batch = DataCollatorForOpenQA(tokenizer, with_answers=False)([{"question": "who wrote hamlet ?"}])
    for empty in ([[]], torch.zeros(1, 0, dtype=torch.long), [[[]]], [[[5], []]]):
        with pytest.raises(ValueError, match="question 0: answer_ids holds an empty answer list or an empty answer"):
            model(**batch, answer_ids=empty)
    with pytest.raises(ValueError, match="answer_ids must hold lists of token ids"):
        model(**batch, answer_ids=[5, 6])
    out = model(**batch, answer_ids=[[19]])  # "shakespeare": a real answer trains, with a finite loss
    assert torch.isfinite(out.loss)
    collator = DataCollatorForOpenQA(tokenizer)
    with pytest.raises(ValueError, match=r"example 0 \('who wrote hamlet \?'\) has an empty answer list"):
        collator([{"question": "who wrote hamlet ?", "answers": []}])
    with pytest.raises(ValueError, match=r"example 0: no answer of \[''\] has any token"):
        collator([{"question": "who wrote hamlet ?", "answers": [""]}])


def test_fingerprint_of_a_marian_size_embedding():
    """58,101 x 512 weights (an opus-mt Marian embedding): float32 sample positions past 2**24 round the last one to n,
    one past the end (an IndexError; a device-side assert on CUDA). Every sampled value is the tensor's value at
    round(i (n - 1) / 15) in exact arithmetic, within the float32 spacing there, and the last is the last weight."""
    n = 58101 * 512
    weight = torch.arange(n, dtype=torch.float32) / n  # distinct values: a position error shows as a value error
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(weight)
    values = np.asarray(model_fingerprint(module)["values"])
    exact = np.round(np.arange(16, dtype=np.float64) * (n - 1) / 15)
    assert values[-1] == weight[-1].item()
    assert np.all(np.abs(values * n - exact) <= 2.0)  # float32 positions are 2 apart at 2**24..2**25
