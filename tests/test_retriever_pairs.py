"""`RealmRetriever` builds the reader inputs from cached block ids: they must equal tokenizing every
`(question, block)` pair, answers and their positions included, for every length, truncation and tokenizer."""

import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from hf_realm import RealmRetriever

from .conftest import WORDS, toy_tokenizer


def random_text(rng, words, length):
    extra = ["Hamlet", "Zürich", "don't", "1,564", "(born", "unseenword", "é", "x-y", "?"]
    return " ".join(rng.choice(words + extra) for _ in range(length))


def by_tokenizer(retriever, block_ids, question_ids, answers, max_length):
    """The reference: every pair through the tokenizer (4.x's way)."""
    question = retriever.tokenizer.decode(question_ids[0], skip_special_tokens=True)
    return retriever._tokenize_pairs(np.asarray(block_ids), question, answers, max_length, "pt")


def assert_same(got, want):
    assert got[:3] == want[:3]
    assert set(got[3].keys()) == set(want[3].keys())
    for key in want[3]:
        assert got[3][key].dtype == want[3][key].dtype, key
        assert torch.equal(got[3][key], want[3][key]), key


@pytest.mark.parametrize("max_length", [None, 9, 16, 24, 64])
def test_pairs_equal_the_tokenizer(max_length):
    tokenizer = toy_tokenizer()
    rng = np.random.default_rng(max_length or 0)
    words = [w for w in WORDS if not w.startswith("[")]
    blocks = [random_text(rng, words, int(rng.integers(0, 40))) for _ in range(30)]
    retriever = RealmRetriever(np.array([b.encode() for b in blocks], dtype=object), tokenizer)
    fallbacks = 0
    for trial in range(40):
        question = random_text(rng, words, int(rng.integers(1, 14)))
        question_ids = tokenizer([question], return_tensors="pt").input_ids
        answers = [tokenizer(random_text(rng, words, int(rng.integers(1, 3))), add_special_tokens=False).input_ids]
        answers.append(list(tokenizer(blocks[trial % 30], add_special_tokens=False).input_ids[2:4]) or [5])
        block_ids = rng.integers(0, len(blocks), int(rng.integers(1, 8)))
        got = retriever(block_ids, question_ids, answers, max_length=max_length)
        assert_same(got, by_tokenizer(retriever, block_ids, question_ids, answers, max_length))
        no_answers = retriever(torch.as_tensor(block_ids), question_ids, None, max_length=max_length)
        assert no_answers[:3] == (None, None, None)
        assert torch.equal(no_answers[3]["input_ids"], got[3]["input_ids"])
        limit = max_length or tokenizer.model_max_length
        fallbacks += len(tokenizer(question, add_special_tokens=False).input_ids) > (limit - 3) // 2
    assert retriever._template_is_bert
    if max_length == 9:
        assert fallbacks > 0  # questions longer than half the room went through the tokenizer, and still matched


def test_changed_records_are_tokenized_again():
    tokenizer = toy_tokenizer()
    records = np.array([b"shakespeare wrote hamlet", b"romulus founded rome"], dtype=object)
    retriever = RealmRetriever(records, tokenizer)
    question = tokenizer(["who wrote hamlet ?"], return_tensors="pt").input_ids
    answer = [tokenizer("hamlet", add_special_tokens=False).input_ids]
    assert retriever([0, 1], question, answer)[0] == [True, False]
    records[0] = b"romulus founded rome"  # changed in place
    retriever.block_records = np.array([b"romulus founded rome", b"shakespeare wrote hamlet"], dtype=object)
    got = retriever([0, 1], question, answer)
    assert got[0] == [False, True]
    assert_same(got, by_tokenizer(retriever, [0, 1], question, answer, None))


def test_other_templates_take_the_tokenizer_path():
    """A tokenizer that pads on the left is not `[CLS] A [SEP] B [SEP]` padded right: the tokenizer builds the pairs,
    also when it is switched to the left after the retriever was used."""
    tokenizer = toy_tokenizer()
    retriever = RealmRetriever(np.array([b"shakespeare wrote hamlet", b"rome"], dtype=object), tokenizer)
    question = tokenizer(["who wrote hamlet ?"], return_tensors="pt").input_ids
    answer = [tokenizer("hamlet", add_special_tokens=False).input_ids]
    retriever([0, 1], question, answer)
    assert retriever._template_is_bert
    tokenizer.padding_side = "left"
    got = retriever([0, 1], question, answer)
    assert not retriever._template_is_bert
    assert got[3]["attention_mask"][1, 0] == 0  # left padding, as the tokenizer does it
    assert_same(got, by_tokenizer(retriever, [0, 1], question, answer, None))


def test_a_cased_wordpiece_tokenizer(tmp_path):
    """A BertTokenizer with its own (cased) vocabulary: the same inputs as tokenizing the pairs."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris", "is", "in", "France", "##ce", "Fran", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False)
    blocks = ["Paris is in France .", "paris is in Fran ce", "France France France France France"]
    retriever = RealmRetriever(np.array(blocks, dtype=object), tokenizer)  # str records, not bytes
    question = tokenizer(["Paris is in ."], return_tensors="pt").input_ids
    answer = [tokenizer("France", add_special_tokens=False).input_ids]
    for max_length in (None, 8, 10):
        got = retriever([2, 0, 1], question, answer, max_length=max_length)
        assert_same(got, by_tokenizer(retriever, [2, 0, 1], question, answer, max_length))
