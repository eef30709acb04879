"""`RealmForOpenQA` and its index: the `BlockIndex` protocol, and the retrievals it refuses rather than read a wrong
block (ids -1 from an approximate index, an index and a retriever of different sizes, a beam larger than the corpus)."""

import datasets
import numpy as np
import pytest
import torch

from hf_realm import RealmBlockIndex, RealmForOpenQA, RealmRetriever, build_corpus
from hf_realm.openqa import DataCollatorForOpenQA
from hf_realm.retrieval import BlockIndex

from .conftest import BLOCKS, toy_tokenizer
from .test_openqa import QUESTIONS, config, models


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def batch(tokenizer, with_answers=True):
    return DataCollatorForOpenQA(tokenizer, with_answers=with_answers)(QUESTIONS)


class NumpyBlockIndex:
    """A BlockIndex written from the protocol alone: exact MIPS in float64 numpy."""

    def __init__(self, embeddings):
        self.embeddings = embeddings

    num_blocks = property(lambda self: self.embeddings.shape[0])
    dim = property(lambda self: self.embeddings.shape[1])

    def search(self, query_embeddings, k):
        scores = query_embeddings.detach().double().numpy() @ self.embeddings.double().numpy().T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return torch.from_numpy(np.take_along_axis(scores, ids, 1)).float(), torch.from_numpy(ids)


class DroppingIndex(NumpyBlockIndex):
    """An approximate index that finds fewer than k blocks: its last result is id -1."""

    def search(self, query_embeddings, k):
        scores, ids = super().search(query_embeddings, k)
        ids[:, -1] = -1
        scores[:, -1] = float("-inf")
        return scores, ids


def test_any_block_index_gives_the_realm_block_index_answers(tokenizer):
    legacy, modern = models(tokenizer)
    assert isinstance(modern.index, BlockIndex)
    with torch.no_grad():
        expected = modern(**batch(tokenizer))
        modern.index = NumpyBlockIndex(legacy.block_emb.clone())
        got = modern(**batch(tokenizer))
    torch.testing.assert_close(got.loss, expected.loss)
    for x, y in zip(got.predicted_answer_ids, expected.predicted_answer_ids, strict=True):
        assert torch.equal(x, y)


def test_an_object_without_the_protocol_is_refused(tokenizer):
    _, modern = models(tokenizer)
    with pytest.raises(TypeError, match=r"must implement hf_realm.retrieval.BlockIndex; object lacks \['num_blocks'"):
        modern.index = object()
    assert isinstance(modern.index, RealmBlockIndex)  # unchanged


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_missing_results_are_refused_not_read_as_the_last_block(tokenizer, mode):
    legacy, modern = models(tokenizer)
    modern.index = DroppingIndex(legacy.block_emb.clone())
    modern.train(mode == "train")
    k = 4 if mode == "train" else 2  # searcher_beam_size / reader_beam_size
    with pytest.raises(
        ValueError, match=rf"invalid block ids for question 0: expected {k} ids in \[0, 6\), got \[.*-1\]"
    ):
        modern(**batch(tokenizer))


def test_an_approximate_faiss_index_with_missing_results_is_refused(tokenizer):
    pytest.importorskip("faiss")
    legacy, modern = models(tokenizer)
    corpus = modern.index.corpus
    big = datasets.concatenate_datasets([corpus] * 10)  # IVF lists need points to train on
    big = big.remove_columns("block_id").add_column("block_id", np.arange(len(big)))  # unique block ids
    emb = legacy.block_emb.repeat(10, 1) + 0.01 * torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    index = RealmBlockIndex(big, emb, backend="faiss", index_factory="IVF8,Flat", search_params={"nprobe": 1})
    retriever = RealmRetriever(np.array([t.encode() for t in big["text"]], dtype=object), tokenizer)
    model = RealmForOpenQA(config(num_block_records=0, searcher_beam_size=40), retriever=retriever, index=index)
    model.load_state_dict(modern.state_dict(), strict=False)
    model.train()
    questions = batch(tokenizer)
    with torch.no_grad():
        query = model.embedder(input_ids=questions["input_ids"], attention_mask=questions["attention_mask"])
        assert bool((index.search(query.projected_score, 40)[1] < 0).any())  # one probed list cannot hold 40
    with pytest.raises(ValueError, match="invalid block ids .* an approximate index found fewer than 40 blocks"):
        model(**questions)


@pytest.mark.parametrize("extra", [2, -1])
def test_an_index_and_a_retriever_of_different_sizes_are_refused(tokenizer, extra):
    legacy, modern = models(tokenizer)
    texts = BLOCKS + ["romulus was born in rome"] * extra if extra > 0 else BLOCKS[:extra]
    corpus = build_corpus(datasets.Dataset.from_dict({"text": texts}), tokenizer, block_seq_len=32)
    modern.index = RealmBlockIndex(corpus, torch.randn(len(texts), 16), backend="torch")
    with pytest.raises(
        ValueError, match=rf"the retriever holds 6 block records but the index holds {len(texts)} blocks: expected"
    ):
        modern(**batch(tokenizer))
    legacy.block_emb = torch.randn(7, 16)
    with pytest.raises(ValueError, match=r"6 block records but block_emb \(config.num_block_records\) holds 7"):
        legacy(**batch(tokenizer))


def test_a_beam_larger_than_the_corpus_is_refused(tokenizer):
    _, modern = models(tokenizer)
    modern.config.searcher_beam_size = 10
    modern.train()
    with pytest.raises(ValueError, match=r"cannot retrieve 10 blocks per question from 6 blocks: expected k <= 6"):
        modern(**batch(tokenizer))
    modern.config.searcher_beam_size = 6  # the whole corpus is fine
    assert modern(**batch(tokenizer)).loss.isfinite()


def test_reader_encode_and_read_spans_equal_forward(tokenizer):
    _, modern = models(tokenizer)
    reader = modern.reader
    torch.manual_seed(0)
    input_ids = torch.randint(5, 30, (2, 12))
    block_mask = torch.zeros(4, 12, dtype=torch.bool)
    block_mask[:, 6:11] = True
    relevance = torch.randn(4)
    with torch.no_grad():
        expected = reader(input_ids, relevance_score=relevance, block_mask=block_mask)
        got = reader.read_spans(reader.encode(input_ids).last_hidden_state, relevance, block_mask)
    assert torch.equal(got.block_idx, expected.block_idx) and torch.equal(got.start_pos, expected.start_pos)
    assert torch.equal(got.end_pos, expected.end_pos)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        reader.read_spans(reader.encode(input_ids).last_hidden_state, relevance, block_mask[:, :5])
