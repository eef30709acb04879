"""Open-domain QA: the index path of RealmForOpenQA, the collator, evaluation, PEFT adapters."""

import types

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer

from hf_realm import RealmBlockIndex, RealmForOpenQA, RealmRetriever, build_corpus
from hf_realm.openqa import DataCollatorForOpenQA, evaluate_open_qa

from .conftest import BLOCKS, NO_DROPOUT, tiny_training_args, toy_openqa, toy_openqa_config
from .hub_mock import mock_hub


QUESTIONS = [
    {"question": "who wrote hamlet ?", "answers": ["shakespeare"]},
    {"question": "who painted the mona lisa ?", "answers": ["leonardo"]},
    {"question": "who founded rome ?", "answers": ["romulus"]},
    {"question": "where is paris ?", "answers": ["river", "city"]},
]


def config(**kw):
    return toy_openqa_config(**{**NO_DROPOUT, "pad_token_id": 0, **kw})


def models(tokenizer):
    """The same weights twice: 4.x-style with `block_emb`, and with a RealmBlockIndex holding the same embeddings."""
    legacy = toy_openqa(tokenizer, config(num_block_records=len(BLOCKS)))
    retriever = legacy.retriever
    corpus = build_corpus(datasets.Dataset.from_dict({"text": BLOCKS}), tokenizer, block_seq_len=32)
    index = RealmBlockIndex(corpus, legacy.block_emb.clone(), backend="torch")
    modern = RealmForOpenQA(config(num_block_records=0), retriever=retriever, index=index)
    modern.load_state_dict({k: v for k, v in legacy.state_dict().items() if k != "block_emb"}, strict=False)
    return legacy.eval(), modern.eval()


def test_index_path_equals_the_block_emb_path(tokenizer):
    legacy, modern = models(tokenizer)
    assert modern.block_emb.shape == (0, 16)
    batch = DataCollatorForOpenQA(tokenizer)(QUESTIONS)
    for mode in ("eval", "train"):
        legacy.train(mode == "train")
        modern.train(mode == "train")
        with torch.no_grad():
            a, b = legacy(**batch), modern(**batch)
        for x, y in zip(a.predicted_answer_ids, b.predicted_answer_ids, strict=True):
            assert torch.equal(x, y)
        torch.testing.assert_close(a.loss, b.loss)
        assert torch.equal(a.reader_output.block_idx, b.reader_output.block_idx)
        assert torch.equal(a.reader_output.retriever_correct, b.reader_output.retriever_correct)


def test_gradients_reach_the_query_embedder_not_the_frozen_index(tokenizer):
    _, modern = models(tokenizer)
    modern.train()
    before = modern.index.embeddings.clone()
    modern(**DataCollatorForOpenQA(tokenizer)(QUESTIONS)).loss.backward()
    assert modern.embedder.cls.dense.weight.grad.abs().sum() > 0
    assert torch.equal(modern.index.embeddings, before)


def test_no_index_and_no_block_embeddings_is_an_error(tokenizer):
    _, modern = models(tokenizer)
    modern.index = None
    with pytest.raises(ValueError, match="no block embeddings to search"):
        modern(**DataCollatorForOpenQA(tokenizer, with_answers=False)(QUESTIONS))


def test_collator(tokenizer):
    batch = DataCollatorForOpenQA(tokenizer, max_question_length=4)(QUESTIONS[:2])
    # [CLS] who wrote [SEP] and [CLS] who painted [SEP]: truncated to 4 tokens, [SEP] kept
    assert batch["input_ids"].tolist() == [[2, 5, 8, 3], [2, 5, 9, 3]]
    assert batch["answer_ids"] == [[[20]], [[23]]]
    with pytest.raises(ValueError, match="empty answer list"):
        DataCollatorForOpenQA(tokenizer)([{"question": "who ?", "answers": []}])


def test_evaluation_numbers_against_hand_computed(tokenizer):
    """A stand-in model with fixed predictions and retrievals: EM, F1 and recall@k are what we count by hand."""
    retriever = RealmRetriever(np.array([b.encode() for b in BLOCKS], dtype=object), tokenizer)
    answers = {
        "who wrote hamlet ?": "shakespeare",
        "who painted the mona lisa ?": "the mona lisa",
        "who founded rome ?": "romulus",
        "where is paris ?": "a city",
    }
    retrieved = {
        "who wrote hamlet ?": [4, 0, 1],
        "who painted the mona lisa ?": [2, 3, 5],
        "who founded rome ?": [2, 0, 1],
        "where is paris ?": [0, 1, 3],
    }

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.retriever, self.index, self.config = retriever, None, types.SimpleNamespace(max_span_width=3)
            self.block_emb = torch.zeros(len(BLOCKS), 2)

        def _questions(self, input_ids):
            return [tokenizer.decode(ids, skip_special_tokens=True).replace("?", " ?") for ids in input_ids]

        def forward(self, input_ids, **kwargs):
            preds = [
                torch.tensor(tokenizer(answers[q], add_special_tokens=False).input_ids)
                for q in self._questions(input_ids)
            ]
            return types.SimpleNamespace(predicted_answer_ids=preds)

        def embedder(self, input_ids, **kwargs):
            return types.SimpleNamespace(projected_score=input_ids)

        def search_blocks(self, q, k):
            return torch.tensor([retrieved[x][:k] for x in self._questions(q)]), None

    ds = datasets.Dataset.from_list(QUESTIONS)
    metrics, records = evaluate_open_qa(Fake(), ds, tokenizer, batch_size=3, recall_ks=(1, 3))
    # EM: shakespeare ✓, "the mona lisa" ✗, romulus ✓, "a city" ✓ (articles are dropped) -> 3/4
    assert metrics["exact_match"] == 0.75
    # F1 of "the mona lisa" vs "leonardo": 0 -> (1 + 0 + 1 + 1) / 4
    assert metrics["f1"] == 0.75
    # answer in the k first blocks: q1 [block 4 has shakespeare] ✓@1; q2 [blocks 2, 3, 5: leonardo in 5] ✓@3;
    # q3 [block 2] ✓@1; q4 [blocks 0, 1, 3: "city"/"river" in 3] ✓@3
    assert metrics["answer_recall@1"] == 0.5 and metrics["answer_recall@3"] == 1.0
    assert [r["prediction"] for r in records] == [answers[q["question"]] for q in QUESTIONS]


def test_predicted_answer_spans_give_the_answer_as_its_block_writes_it(tokenizer):
    """`predicted_answer_spans` point at the predicted ids among the block's own tokens, in the block the reader
    chose; `evaluate_open_qa` reads the answer from the block's text there. The blocks are written capitalised and
    the tokenizer is uncased: the same ids, so the predictions are the decoded ids with the block's case."""
    legacy, modern = models(tokenizer)
    written = [" ".join(w.capitalize() for w in b.split()) for b in BLOCKS]
    for model in (legacy, modern):
        model.retriever = RealmRetriever(np.array([b.encode() for b in written], dtype=object), tokenizer)
        batch = DataCollatorForOpenQA(tokenizer, with_answers=False)(QUESTIONS)
        with torch.no_grad():
            out = model(**batch)
            retrieved, _ = model.search_blocks(model.embedder(**batch, return_dict=True).projected_score)
        assert len(out.predicted_answer_spans) == len(QUESTIONS)
        for i, (block_id, first, last) in enumerate(out.predicted_answer_spans):
            assert block_id == int(retrieved[i][out.reader_output.block_idx[i]])
            block_ids = tokenizer(BLOCKS[block_id], add_special_tokens=False).input_ids
            assert block_ids[first : last + 1] == out.predicted_answer_ids[i].tolist()
        with torch.no_grad():
            one = model(**{k: v[:1] for k, v in batch.items()})  # 4.x shapes for one question, spans the same
        assert one.predicted_answer_spans == out.predicted_answer_spans[:1]
        _, records = evaluate_open_qa(model, datasets.Dataset.from_list(QUESTIONS), tokenizer, batch_size=3)
        predicted = zip(records, out.predicted_answer_ids, out.predicted_answer_spans, strict=True)
        for record, ids, (block_id, _, _) in predicted:
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            assert record["prediction"] == " ".join(w.capitalize() for w in decoded.split())
            assert record["prediction"] in written[block_id]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_open_qa_on_cuda_gives_the_cpu_answers_spans_and_losses(tokenizer):
    """RealmForOpenQA on CUDA (both index paths, with and without answers) against the same weights on the CPU: the
    same blocks, answer ids and `predicted_answer_spans`, losses within float32 noise; and the same
    `evaluate_open_qa` records, read from the blocks' text."""
    questions = datasets.Dataset.from_list(QUESTIONS)
    for cpu_model, moved in zip(models(tokenizer), models(tokenizer), strict=True):
        moved.to("cuda")
        for with_answers in (False, True):
            batch = DataCollatorForOpenQA(tokenizer, with_answers=with_answers)(QUESTIONS)
            with torch.no_grad():
                want = cpu_model(**batch)
                got = moved(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()})
            assert got.predicted_answer_spans == want.predicted_answer_spans
            for g, w in zip(got.predicted_answer_ids, want.predicted_answer_ids, strict=True):
                assert g.device.type == "cuda" and g.cpu().tolist() == w.tolist()
            for name in ("block_idx", "start_pos", "end_pos"):
                assert getattr(got.reader_output, name).cpu().tolist() == getattr(want.reader_output, name).tolist()
            if with_answers:
                for name in ("retriever_loss", "reader_loss"):
                    torch.testing.assert_close(
                        getattr(got.reader_output, name).cpu(), getattr(want.reader_output, name), rtol=1e-4, atol=1e-5
                    )
                torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=1e-4, atol=1e-5)
        want_metrics, want_records = evaluate_open_qa(cpu_model, questions, tokenizer, batch_size=3)
        got_metrics, got_records = evaluate_open_qa(moved, questions, tokenizer, batch_size=3)
        assert [r["prediction"] for r in got_records] == [r["prediction"] for r in want_records]
        assert got_metrics == pytest.approx(want_metrics)


def test_span_text_keeps_punctuation_accents_and_refuses_what_it_cannot_check(tokenizer):
    from hf_realm import RealmTokenizer

    vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] in the at levi ' s stadium , 30 000 fans krasinski garden".split()
    tok = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    text = "In the Krasiński Garden, at Levi's Stadium: 30,000 fans"
    retriever = RealmRetriever(np.array([text.encode()], dtype=object), tok)
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids[2:4]) == "krasinski garden" and tok.decode(ids[11:14]) == "30, 000"
    assert retriever.span_text(0, 2, 3) == "Krasiński Garden"
    assert retriever.span_text(0, 6, 9, expected_ids=ids[6:10]) == "Levi's Stadium"
    assert retriever.span_text(0, 11, 14) == "30,000 fans"
    assert retriever.span_text(0, 11, len(ids)) is None  # past the block's last token
    assert retriever.span_text(0, 3, 2) is None and retriever.span_text(0, -1, 2) is None
    assert retriever.span_text(0, 6, 9, expected_ids=ids[5:9]) is None  # not the ids the reader read
    slow = RealmRetriever(retriever.block_records, types.SimpleNamespace(is_fast=False))
    assert slow.span_text(0, 2, 3) is None

    class Fake(torch.nn.Module):  # predicts "levi ' s stadium" in block 0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.retriever, self.index, self.config = retriever, None, types.SimpleNamespace(max_span_width=3)
            self.block_emb = torch.zeros(1, 2)

        def forward(self, input_ids, **kwargs):
            n = len(input_ids)
            return types.SimpleNamespace(
                predicted_answer_ids=[torch.tensor(ids[6:10])] * n, predicted_answer_spans=[(0, 6, 9)] * n
            )

        def embedder(self, input_ids, **kwargs):
            return types.SimpleNamespace(projected_score=input_ids)

        def search_blocks(self, q, k):
            return torch.zeros(len(q), k, dtype=torch.long), None

    questions = datasets.Dataset.from_list([{"question": "at the stadium ?", "answers": ["Levi's Stadium"]}])
    metrics, records = evaluate_open_qa(Fake(), questions, tok, recall_ks=(1,))
    assert records[0]["prediction"] == "Levi's Stadium" and metrics["exact_match"] == 1.0
    closed, records = evaluate_open_qa(Fake(), questions, tok, recall_ks=(), closed_book=True)
    assert records[0]["prediction"] == "levi ' s stadium" and closed["exact_match"] == 0.0  # no block: the ids


def test_lora_adapters_train_alone_and_round_trip(tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    _, modern = models(tokenizer)
    modern.train()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["qa_outputs"])
    model = get_peft_model(modern, lora)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = tiny_training_args(tmp_path / "run", max_steps=2, disable_tqdm=True)
    Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(QUESTIONS),
        data_collator=DataCollatorForOpenQA(tokenizer),
    ).train()
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}
    assert changed, "nothing trained"
    assert all("lora_" in k or "modules_to_save" in k for k in changed), sorted(changed)[:5]
    assert any("embedder" in k and "lora_" in k for k in changed)  # the query embedder's adapters
    assert any("reader" in k and "lora_" in k for k in changed)

    model.eval()
    batch = DataCollatorForOpenQA(tokenizer, with_answers=False)(QUESTIONS)
    with torch.no_grad():
        expected = model(**batch).predicted_answer_ids
    model.save_pretrained(tmp_path / "adapter")
    _, fresh = models(tokenizer)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(**batch).predicted_answer_ids
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
    with mock_hub(tmp_path / "hub") as repos:
        model.push_to_hub("me/realm-lora")
    assert (tmp_path / "hub" / "me" / "realm-lora" / "adapter_config.json").exists()
    assert set(repos) == {"me/realm-lora"}


def test_question_longer_than_the_reader_is_refused(tokenizer):
    _, modern = models(tokenizer)
    long = {"question": " ".join(["who"] * 30) + " ?", "answers": ["rome"]}
    with pytest.raises(ValueError, match=r"a question has 33 tokens; .* reader_seq_len=24 .* at most 20"):
        modern(**DataCollatorForOpenQA(tokenizer, max_question_length=64)([long]))
    # the collator's truncation is the way out
    out = modern(**DataCollatorForOpenQA(tokenizer, max_question_length=16)([long]))
    assert out.reader_output.block_idx.dim() == 0


def test_index_of_another_dimension_is_refused(tokenizer):
    _, modern = models(tokenizer)
    modern.index = RealmBlockIndex(modern.index.corpus, torch.randn(len(BLOCKS), 8), backend="torch")
    with pytest.raises(ValueError, match="query dim 16 != index dim 8"):
        modern(**DataCollatorForOpenQA(tokenizer, with_answers=False)(QUESTIONS))
