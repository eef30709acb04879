"""What code written for transformers 4.x REALM relies on (as its own tests exercised it): tokenizer methods that
transformers 5 dropped, the module constants, retriever save / load round trips (4.x reads `block_records.npy`), and
configs 4.x accepted."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
import torch

from hf_realm import (
    RealmConfig,
    RealmEmbedder,
    RealmKnowledgeAugEncoder,
    RealmReader,
    RealmRetriever,
    RealmTokenizer,
    RealmTokenizerFast,
    retrieval_realm,
    tokenization_realm,
)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "re", "##read", "##ing", "book", "books", ",", "the", "a"]
VOCAB += ["first", "second", "third", "fourth", "page", "who", "what", "question", "record", "long", "##er", "."]
ID = {w: i for i, w in enumerate(VOCAB)}


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / tokenization_realm.VOCAB_FILES_NAMES["vocab_file"]
    path.write_text("".join(w + "\n" for w in VOCAB), encoding="utf-8")
    return str(path)


@pytest.fixture
def tokenizer(vocab_file):
    return RealmTokenizer.from_pretrained(os.path.dirname(vocab_file))


def test_module_constants():
    assert tokenization_realm.VOCAB_FILES_NAMES == {"vocab_file": "vocab.txt", "tokenizer_file": "tokenizer.json"}
    assert retrieval_realm._REALM_BLOCK_RECORDS_FILENAME == retrieval_realm.BLOCK_RECORDS_NPY == "block_records.npy"


@pytest.mark.parametrize("cls", [RealmTokenizer, RealmTokenizerFast])
def test_tokenizer_from_a_vocab_file(vocab_file, cls):
    tokenizer = cls(vocab_file)
    tokens = tokenizer.tokenize("REreadÌng, Books")  # lower-cased, accent stripped, punctuation split
    assert tokens == ["re", "##read", "##ing", ",", "books"]
    assert tokenizer.convert_tokens_to_ids(tokens) == [5, 6, 7, 10, 9]
    cased = cls.from_pretrained(os.path.dirname(vocab_file), do_lower_case=False)
    assert cased.tokenize("Books books") == ["[UNK]", "books"]


def test_save_writes_the_vocab_file_4x_reads(tokenizer, tmp_path):
    files = tokenizer.save_pretrained(tmp_path / "saved")
    vocab = tmp_path / "saved" / "vocab.txt"
    assert str(vocab) in files and vocab.read_text(encoding="utf-8").split("\n")[:-1] == VOCAB
    # a tokenizer built from that vocab.txt alone (what 4.x's slow RealmTokenizer reads) encodes the same
    text = "who reread the first page ?"
    assert RealmTokenizer(str(vocab))(text).input_ids == tokenizer(text).input_ids


def test_encode_plus(tokenizer):
    enc = tokenizer.encode_plus("who reread the book", "the first page")
    assert enc.input_ids == [ID["[CLS]"], 18, 5, 6, 11, 8, ID["[SEP]"], 11, 13, 17, ID["[SEP]"]]
    assert enc.token_type_ids == [0] * 7 + [1] * 4
    assert enc.attention_mask == [1] * 11
    text = "A book, [MASK] page."
    offsets = tokenizer.encode_plus(
        text, return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False
    )
    assert tokenizer.convert_ids_to_tokens(offsets.input_ids) == [
        "[CLS]", "a", "book", ",", "[MASK]", "page", ".", "[SEP]"
    ]  # fmt: skip
    assert offsets.offset_mapping == [(0, 0), (0, 1), (2, 6), (6, 7), (8, 14), (15, 19), (19, 20), (0, 0)]
    assert set(offsets) == {"input_ids", "offset_mapping"}
    assert tokenizer.encode_plus("the book", return_tensors="pt").input_ids.shape == (1, 4)
    with pytest.raises(ValueError, match="encode_plus takes one text"):
        tokenizer.encode_plus(["the book", "a page"])


def test_batch_encode_plus(tokenizer):
    single = tokenizer.batch_encode_plus(["the book", "a first page"], padding=True)
    assert single.input_ids == [[2, 11, 8, 3, 0], [2, 12, 13, 17, 3]]
    pairs = tokenizer.batch_encode_plus([("who", "the book"), ("what", "a page")])
    assert pairs.input_ids == [[2, 18, 3, 11, 8, 3], [2, 19, 3, 12, 17, 3]]
    assert pairs.token_type_ids == [[0, 0, 0, 1, 1, 1]] * 2


def test_build_inputs_and_token_types_match_what_the_tokenizer_itself_adds(tokenizer):
    a = tokenizer.encode("who reread the book", add_special_tokens=False)
    b = tokenizer.encode("the second page", add_special_tokens=False)
    assert tokenizer.build_inputs_with_special_tokens(a) == [2, *a, 3]
    assert tokenizer.build_inputs_with_special_tokens(a, b) == [2, *a, 3, *b, 3]
    pair = tokenizer("who reread the book", "the second page")
    assert tokenizer.build_inputs_with_special_tokens(a, b) == pair.input_ids
    assert tokenizer.create_token_type_ids_from_sequences(a, b) == pair.token_type_ids
    assert tokenizer.create_token_type_ids_from_sequences(a) == [0] * (len(a) + 2)
    mask = [1] + [0] * len(a) + [1] + [0] * len(b) + [1]
    assert tokenizer.get_special_tokens_mask(a, b) == mask
    assert tokenizer.get_special_tokens_mask(pair.input_ids, already_has_special_tokens=True) == mask
    assert tokenizer.num_special_tokens_to_add(pair=True) == 3


def test_batch_encode_candidates_numpy(tokenizer):
    texts = [["the book", "a first page"], ["who reread", "the long record"]]
    enc = tokenizer.batch_encode_candidates(texts, max_length=7, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[key].shape == (2, 2, 7)
    np.testing.assert_array_equal(enc["input_ids"][1, 1], [2, 11, 22, 21, 3, 0, 0])
    np.testing.assert_array_equal(enc["attention_mask"][0, 0], [1, 1, 1, 1, 0, 0, 0])


RECORDS = [b"the first record", b"the second record", b"the third record", b"the fourth record", b"a longer record"]


@pytest.fixture
def retriever(tokenizer):
    return RealmRetriever(block_records=np.array(RECORDS, dtype=object), tokenizer=tokenizer)


def test_retriever_call_and_answer_positions(retriever, tokenizer):
    question = tokenizer(["what question"]).input_ids
    answers = tokenizer(["fourth record", "record", "long"], add_special_tokens=False).input_ids
    has, starts, ends, inputs = retriever(
        np.array([0, 3, 4]), question, answer_ids=answers, max_length=16, return_tensors="np"
    )
    assert inputs.input_ids.shape == inputs.special_tokens_mask.shape == (3, 9)
    assert tokenizer.convert_ids_to_tokens(inputs.input_ids[1]) == [
        "[CLS]", "what", "question", "[SEP]", "the", "fourth", "record", "[SEP]", "[PAD]"
    ]  # fmt: skip
    # positions in [CLS] q q [SEP] block [SEP]; -1 pads every block to the most answers found in one block
    assert has == [True, True, True]
    assert starts == [[6, -1], [5, 6], [7, 5]] and ends == [[6, -1], [6, 6], [7, 5]]  # answers in given order


@pytest.mark.parametrize("legacy_npy", [False, True])
def test_retriever_round_trip(retriever, tmp_path, legacy_npy):
    retriever.save_pretrained(tmp_path, legacy_npy=legacy_npy)
    assert (tmp_path / "block_records.npy").exists() == legacy_npy
    loaded = RealmRetriever.from_pretrained(tmp_path)
    assert loaded.block_records[0] == b"the first record" and list(loaded.block_records) == RECORDS
    assert loaded.tokenizer("who reread").input_ids == retriever.tokenizer("who reread").input_ids


def test_legacy_npy_is_readable_as_4x_reads_it_and_needs_no_pickle(retriever, tmp_path, monkeypatch):
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    retriever.save_pretrained(tmp_path, legacy_npy=True)
    safe = np.load(tmp_path / "block_records.npy", allow_pickle=False)
    assert safe.dtype == np.dtype("S17") and list(safe) == RECORDS  # width of the longest record
    assert list(np.load(tmp_path / "block_records.npy", allow_pickle=True)) == RECORDS  # 4.x's call
    (tmp_path / "block_records.parquet").unlink()  # as a 4.x-only directory: no opt-in needed, nothing unpickled
    assert list(RealmRetriever.from_pretrained(tmp_path).block_records) == RECORDS


def test_hub_download_of_either_format(retriever, tmp_path):
    """4.x mocked `hf_hub_download` to return its local `block_records.npy`; any downloaded file is read by content."""
    retriever.save_pretrained(tmp_path, legacy_npy=True)
    for name in ("block_records.npy", "block_records.parquet"):
        with (
            mock.patch.object(retrieval_realm, "hf_hub_download", return_value=str(tmp_path / name)),
            mock.patch.object(retrieval_realm.AutoTokenizer, "from_pretrained", return_value=retriever.tokenizer),
        ):
            loaded = RealmRetriever.from_pretrained("someone/realm-openqa")
        assert loaded.block_records[0] == b"the first record" and list(loaded.block_records) == RECORDS


def test_legacy_npy_refuses_a_record_it_would_change(tokenizer, tmp_path):
    bad = RealmRetriever(np.array([b"ok", b"ends with nul\x00"], dtype=object), tokenizer)
    with pytest.raises(ValueError, match="block record 1 ends with a NUL byte"):
        bad.save_pretrained(tmp_path / "out", legacy_npy=True)
    assert os.listdir(tmp_path / "out") == []  # nothing written


def test_unknown_block_records_file_is_refused(tmp_path, tokenizer):
    (tmp_path / "block_records.parquet").write_bytes(b"not parquet")
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither Parquet nor a numpy .npy file"):
        RealmRetriever.from_pretrained(tmp_path)


def tiny(**kw):
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return RealmConfig(**{**fields, **kw})


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_relative_position_embeddings_are_refused(kind, tmp_path):
    with pytest.raises(ValueError, match=f"position_embedding_type: expected 'absolute', got '{kind}'"):
        tiny(position_embedding_type=kind)
    config = tiny()
    config.position_embedding_type = kind  # how 4.x code (and its tests) switched it
    with pytest.raises(ValueError, match="dropped relative position embeddings"):
        RealmEmbedder(config)
    tiny().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "position_embedding_type": kind}))
    with pytest.raises(ValueError, match=f"got '{kind}'"):
        RealmConfig.from_pretrained(tmp_path)


def test_config_round_trip_and_legacy_keys(tmp_path):
    config = tiny(reader_beam_size=3, searcher_seq_len=64)  # searcher_seq_len: a key of 4.x hub configs
    config.save_pretrained(tmp_path)
    loaded = RealmConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.searcher_seq_len == 64 and loaded.position_embedding_type == "absolute"
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.num_hidden_layers) == (32, 4, 2)
    assert RealmConfig.from_dict(json.loads(config.to_json_string())).reader_beam_size == 3


def test_from_pretrained_overrides_and_explicit_config(tmp_path):
    """4.x: `from_pretrained(path, num_candidates=2)` and `RealmReader.from_pretrained(path, config=...)`."""
    torch.manual_seed(0)
    encoder = RealmKnowledgeAugEncoder(tiny(num_candidates=8)).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    loaded = RealmKnowledgeAugEncoder.from_pretrained(tmp_path / "encoder", num_candidates=2).eval()
    assert loaded.config.num_candidates == 2
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3]])
    with torch.no_grad():
        out = loaded(ids, relevance_score=torch.tensor([[0.3, 0.7]]))
        ref = encoder(ids, relevance_score=torch.tensor([[0.3, 0.7]]))
    assert out.logits.shape == (2, 4, 99)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)  # same weights; num_candidates is a shape
    reader = RealmReader(tiny()).eval()
    reader.save_pretrained(tmp_path / "reader")
    again = RealmReader.from_pretrained(tmp_path / "reader", config=tiny(reader_beam_size=2, max_span_width=3))
    assert again.config.max_span_width == 3
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reader.state_dict().items())
