"""A trainable doc tower in `RealmForOpenQA` (REALM-style fine-tuning, `finetune_openqa.py --train_doc_embedder`):
in training the retrieved blocks are scored with it, with gradient; in eval the index's embeddings are used; the index
is refreshed with it; what is saved loads, with or without the tower."""

from __future__ import annotations

import os

import pytest
import torch

from hf_realm import RealmBlockIndex, RealmEmbedder, RealmForOpenQA, RealmRetriever
from hf_realm.callbacks import _doc_embedder
from hf_realm.openqa import DataCollatorForOpenQA

from .conftest import toy_tokenizer
from .test_openqa import QUESTIONS, models


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def with_doc_tower(tokenizer):
    """The toy open-QA model with a doc tower of its own, and its index re-embedded by that tower."""
    _, model = models(tokenizer)
    torch.manual_seed(1)
    doc = RealmEmbedder(model.config).eval()
    model.index.refresh(doc, show_progress=False)
    model.doc_embedder = doc
    return model


def expected_retriever_loss(model, batch, doc):
    """Each question's retriever loss in float64, from the doc tower's embeddings of the blocks the index returns."""
    question = model.embedder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]).projected_score  # fmt: skip
    ids, _ = model.search_blocks(question)
    inputs = model.index.block_inputs(ids, pad_token_id=model.retriever.tokenizer.pad_token_id)
    blocks = doc(**{k: v.reshape(-1, v.shape[-1]) for k, v in inputs.items()}).projected_score.view(*ids.shape, -1)
    return torch.einsum("bd,bkd->bk", question.double(), blocks.double())


def test_training_scores_the_retrieved_blocks_with_the_doc_tower(tokenizer):
    model = with_doc_tower(tokenizer)
    batch = DataCollatorForOpenQA(tokenizer)(QUESTIONS)
    frozen = RealmForOpenQA(model.config, retriever=model.retriever, index=model.index)
    frozen.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("doc_embedder.")})
    model.train(), frozen.train()
    # The tower the index was embedded with: the fresh scores are the cached ones.
    with torch.no_grad():
        a, b = model(**batch), frozen(**batch)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.reader_output.retriever_loss, b.reader_output.retriever_loss, atol=1e-5, rtol=1e-5)

    # A doc tower that moved since the index was built: the retriever loss follows the tower, not the index.
    with torch.no_grad():
        model.doc_embedder.cls.LayerNorm.weight.mul_(-2.0)  # scores reversed and doubled
        out = model(**batch)
        relevance = expected_retriever_loss(model, batch, model.doc_embedder)
    correct = out.reader_output.retriever_correct
    expected = torch.logsumexp(relevance, -1) - torch.logsumexp(relevance.masked_fill(~correct, float("-inf")), -1)
    expected = torch.where(correct.any(-1), expected, torch.zeros_like(expected))
    assert correct.any()
    torch.testing.assert_close(out.reader_output.retriever_loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.reader_output.retriever_loss, b.reader_output.retriever_loss, atol=1e-3)

    # Gradient reaches the doc tower; the index's cached embeddings stay as they were.
    cached = model.index.embeddings.clone()
    model.zero_grad()
    model(**batch).loss.backward()
    assert model.doc_embedder.cls.dense.weight.grad.abs().sum() > 0
    assert torch.equal(model.index.embeddings, cached)

    # Eval mode scores with the index's embeddings, as without a doc tower.
    model.eval(), frozen.eval()
    with torch.no_grad():
        a, b = model(**batch), frozen(**batch)
    assert torch.equal(a.reader_output.block_idx, b.reader_output.block_idx)
    for x, y in zip(a.predicted_answer_ids, b.predicted_answer_ids, strict=True):
        assert torch.equal(x, y)


def test_the_refresh_callback_embeds_with_the_doc_tower(tokenizer):
    model = with_doc_tower(tokenizer)
    assert _doc_embedder(model) is model.doc_embedder
    _, plain = models(tokenizer)
    assert _doc_embedder(plain) is plain.embedder  # without a doc tower: the embedder, as before


def test_a_doc_tower_needs_an_index_with_block_tokens(tokenizer):
    from .test_openqa_retrieval import NumpyBlockIndex

    model = with_doc_tower(tokenizer)
    model.index = NumpyBlockIndex(model.index.embeddings.clone())
    model.train()
    with pytest.raises(ValueError, match=r"expected an index with `block_inputs` \(RealmBlockIndex\), got NumpyBlock"):
        model(**DataCollatorForOpenQA(tokenizer)(QUESTIONS))


def test_save_writes_the_doc_tower_and_loads_with_or_without_it(tokenizer, tmp_path):
    model = with_doc_tower(tokenizer)
    model.save_pretrained(tmp_path)
    saved_doc = RealmEmbedder.from_pretrained(tmp_path / "doc_embedder")
    assert all(torch.equal(v, model.doc_embedder.state_dict()[k]) for k, v in saved_doc.state_dict().items())

    plain, info = RealmForOpenQA.from_pretrained(tmp_path, retriever=model.retriever, output_loading_info=True)
    assert plain.trainable_doc_embedder is None and not info["missing_keys"]
    assert not [k for k in info["unexpected_keys"] if k.startswith("doc_embedder.")]
    state = plain.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    assert not [k for k in state if k.startswith("doc_embedder.")]

    doc = RealmEmbedder(model.config)
    resumed = RealmForOpenQA.from_pretrained(tmp_path, retriever=model.retriever, doc_embedder=doc)
    assert all(torch.equal(v, model.doc_embedder.state_dict()[k])
               for k, v in resumed.trainable_doc_embedder.state_dict().items())  # fmt: skip


def test_finetune_openqa_trains_the_doc_tower_and_saves_its_index(tmp_path, monkeypatch):
    """`--train_doc_embedder true --index_refresh_steps 1`: the index is re-embedded after every step, the saved index
    is the saved doc tower's embeddings of the corpus, and it differs from a frozen-doc-tower run's; bad combinations
    fail before anything is written."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import finetune_openqa

    argv = ["--num_entities", "40", "--max_steps", "3", "--per_device_train_batch_size", "4", "--ict_steps", "2",
            "--ict_batch_size", "8", "--searcher_beam_size", "6", "--reader_beam_size", "2", "--hidden_size", "32",
            "--intermediate_size", "37", "--retriever_proj_size", "16", "--use_cpu", "true", "--disable_tqdm", "true",
            "--realm_checkpoint", str(tmp_path / "none"), "--max_eval_examples", "4", "--warmup_steps", "0",
            "--retriever_learning_rate", "1e-2"]  # fmt: skip
    out = tmp_path / "doc"
    bad = [
        (["--index_refresh_steps", "1"], r"--index_refresh_steps: expected --train_doc_embedder true"),
        (["--train_doc_embedder", "true", "--train_retriever", "false"],
         r"--train_doc_embedder: expected a retriever that trains, got --train_retriever false"),
        (["--train_doc_embedder", "true", "--lora_r", "4"], r"--train_doc_embedder: expected full fine-tuning, got --lora_r 4"),
        (["--train_doc_embedder", "true", "--index_refresh_steps", "-1"], r"--index_refresh_steps: expected an int >= 0, got -1"),
    ]  # fmt: skip
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            finetune_openqa.main([*argv, "--output_dir", str(out), *extra])
        assert not out.exists()

    results = finetune_openqa.main([*argv, "--output_dir", str(out), "--train_doc_embedder", "true",
                                    "--index_refresh_steps", "1"])  # fmt: skip
    assert [r["step"] for r in results["index_refreshes"]] == [1, 2, 3] and results["index_refresh_failures"] == 0
    doc = RealmEmbedder.from_pretrained(out / "doc_embedder")
    index = RealmBlockIndex.from_pretrained(out / "index")
    saved = index.embeddings.clone()
    index.refresh(doc, show_progress=False)
    torch.testing.assert_close(index.embeddings, saved, atol=1e-5, rtol=1e-5)
    model = RealmForOpenQA.from_pretrained(out, retriever=RealmRetriever.from_pretrained(out))
    query = model.embedder.state_dict()
    assert any(not torch.equal(v, query[k]) for k, v in doc.state_dict().items() if k in query)

    frozen_out = tmp_path / "frozen"
    finetune_openqa.main([*argv, "--output_dir", str(frozen_out)])
    assert not (frozen_out / "doc_embedder").exists()
    frozen_index = RealmBlockIndex.from_pretrained(frozen_out / "index").embeddings
    assert not torch.allclose(frozen_index, saved, atol=1e-4)


def test_the_doc_tower_trains_at_the_retriever_learning_rate(tokenizer):
    from hf_realm import optimizer_grouped_parameters

    model = with_doc_tower(tokenizer)
    groups = optimizer_grouped_parameters(model, 1e-3, 1e-5)
    lr = {id(p): (g["lr"], g["retriever"]) for g in groups for p in g["params"]}
    assert all(lr[id(p)] == (1e-5, True) for p in model.doc_embedder.parameters())
    assert all(lr[id(p)] == (1e-5, True) for p in model.embedder.parameters())
    assert all(lr[id(p)] == (1e-3, False) for p in model.reader.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_doc_tower_training_on_cuda_gives_the_cpu_losses_and_gradient(tokenizer):
    """The doc tower's training path on CUDA (block tokens moved to the GPU, re-embedded there) against the same
    weights on the CPU: the same retrieved blocks, losses and doc-tower gradient within float32 noise."""
    cpu_model, moved = with_doc_tower(tokenizer), with_doc_tower(tokenizer)
    moved.to("cuda")
    batch = DataCollatorForOpenQA(tokenizer)(QUESTIONS)
    for model in (cpu_model, moved):
        with torch.no_grad():
            model.doc_embedder.cls.LayerNorm.weight.mul_(-2.0)  # the tower moved since the index was built
        model.train()
    want = cpu_model(**batch)
    got = moved(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()})
    assert got.reader_output.block_idx.cpu().tolist() == want.reader_output.block_idx.tolist()
    for name in ("retriever_loss", "reader_loss"):
        torch.testing.assert_close(
            getattr(got.reader_output, name).cpu(), getattr(want.reader_output, name), rtol=1e-4, atol=1e-5
        )
    want.loss.backward()
    got.loss.backward()
    grad = moved.doc_embedder.cls.dense.weight.grad
    assert grad.device.type == "cuda" and want.reader_output.retriever_correct.any()
    torch.testing.assert_close(grad.cpu(), cpu_model.doc_embedder.cls.dense.weight.grad, rtol=1e-3, atol=1e-5)
