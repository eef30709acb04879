"""Loading what the examples save: the Auto classes and `from_pretrained` on every directory they write give the
trained model (with its index and retriever) or an error naming what to load, never a randomly initialised model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering

from hf_realm import (
    RealmBlockIndex,
    RealmConfig,
    RealmEmbedder,
    RealmForMaskedLM,
    RealmForOpenQA,
    RealmKnowledgeAugEncoder,
    RealmReader,
    RealmRetriever,
    build_corpus,
)
from hf_realm.openqa import DataCollatorForOpenQA

from .conftest import BLOCKS, WORDS, tiny_realm_config, toy_tokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED = {"show_progress": False}


def tiny_config(**overrides):
    fields = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        retriever_proj_size=16,
        num_candidates=3,
        span_hidden_size=8,
        max_span_width=3,
        reader_beam_size=2,
        searcher_beam_size=4,
        reader_seq_len=24,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return RealmConfig(**fields)


def toy_index(tokenizer, embedder):
    corpus = build_corpus(datasets.Dataset.from_dict({"text": BLOCKS}), tokenizer, block_seq_len=32)
    return RealmBlockIndex.build(corpus, embedder, backend="torch", embed_kwargs=EMBED)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save_like_train_realm(path, share_embedders):
    """What examples/train_realm.py writes: `trainer.save_model(out)` (the model, its parts, `index/`), the tokenizer,
    and the ICT phase's (empty) output dir."""
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    model = RealmForMaskedLM(tiny_config(share_embedders=share_embedders)).eval()
    model.index = toy_index(tokenizer, model.embedder)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    os.makedirs(os.path.join(path, "ict"))
    return model, tokenizer


def save_like_finetune_openqa(path):
    """What examples/finetune_openqa.py writes: the model, the retriever (block records + tokenizer), `index/`."""
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    retriever = RealmRetriever(np.array([b.encode() for b in BLOCKS], dtype=object), tokenizer)
    model = RealmForOpenQA(tiny_config(num_block_records=0), retriever=retriever).eval()
    index = toy_index(tokenizer, model.embedder)
    model.index = index
    model.save_pretrained(path)
    model.retriever.save_pretrained(path)
    index.save_pretrained(os.path.join(path, "index"))
    return model, tokenizer


def masked_batch():
    input_ids = torch.tensor([[2, 5, 4, 17, 3], [2, 6, 4, 25, 3]])
    labels = torch.full_like(input_ids, -100)
    labels[:, 2] = torch.tensor([16, 20])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.fixture(scope="module")
def realm_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("outputs")
    return {
        "shared": (str(base / "shared"), *save_like_train_realm(str(base / "shared"), True)),
        "separate": (str(base / "separate"), *save_like_train_realm(str(base / "separate"), False)),
    }


@pytest.fixture(scope="module")
def openqa_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("outputs") / "finetune_openqa")
    return (path, *save_like_finetune_openqa(path))


@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("loader", [AutoModelForMaskedLM.from_pretrained, RealmForMaskedLM.from_pretrained])
def test_masked_lm_root_gives_the_trained_model_with_its_index(realm_dirs, kind, loader, caplog):
    path, model, _ = realm_dirs[kind]
    with caplog.at_level(logging.INFO, logger="hf_realm"):
        loaded = loader(path).eval()
    assert type(loaded) is RealmForMaskedLM and same_weights(loaded, model)
    assert isinstance(loaded.index, RealmBlockIndex)
    assert torch.equal(loaded.index.embeddings, model.index.embeddings)
    assert f"restored the corpus index ({len(BLOCKS)} blocks) from {os.path.join(path, 'index')}" in caplog.text
    with torch.no_grad():
        expected, got = model(**masked_batch()), loaded(**masked_batch())
    assert torch.equal(expected.retrieved_block_ids, got.retrieved_block_ids)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_explicit_index_wins_and_index_none_keeps_it_unset(realm_dirs):
    path, model, _ = realm_dirs["shared"]
    assert RealmForMaskedLM.from_pretrained(path, index=None).index is None
    assert RealmForMaskedLM.from_pretrained(path, index=model.index).index is model.index


def test_auto_model_on_the_root_loads_the_shared_embedder(realm_dirs):
    path, model, _ = realm_dirs["shared"]
    embedder = AutoModel.from_pretrained(path)
    assert type(embedder) is RealmEmbedder and same_weights(embedder, model.embedder)


def test_auto_model_on_the_root_with_two_embedders_names_the_sub_directories(realm_dirs):
    path, _, _ = realm_dirs["separate"]
    with pytest.raises(ValueError) as err:
        AutoModel.from_pretrained(path)
    message = str(err.value)
    assert "separate embedder and query_embedder" in message
    for sub in ("embedder", "query_embedder"):
        assert os.path.join(path, sub) in message
    assert f"RealmForMaskedLM.from_pretrained({path!r}) (or AutoModelForMaskedLM)" in message


@pytest.mark.parametrize("loader", [AutoModelForQuestionAnswering.from_pretrained, RealmReader.from_pretrained])
def test_other_classes_on_the_masked_lm_root_are_refused(realm_dirs, loader):
    path, _, _ = realm_dirs["separate"]
    with pytest.raises(ValueError, match="holds a RealmForMaskedLM .* would leave every weight randomly initialised"):
        loader(path)


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_every_sub_directory_loads_its_part(realm_dirs, kind):
    path, model, tokenizer = realm_dirs[kind]
    assert same_weights(AutoModel.from_pretrained(os.path.join(path, "embedder")), model.embedder)
    encoder = AutoModelForMaskedLM.from_pretrained(os.path.join(path, "encoder"))
    assert type(encoder) is RealmKnowledgeAugEncoder and same_weights(encoder, model.encoder)
    if kind == "separate":
        assert same_weights(AutoModel.from_pretrained(os.path.join(path, "query_embedder")), model.query_embedder)
    with pytest.raises(ValueError, match="holds a RealmEmbedder .* expected a RealmKnowledgeAugEncoder"):
        AutoModelForMaskedLM.from_pretrained(os.path.join(path, "embedder"))
    index = RealmBlockIndex.from_pretrained(os.path.join(path, "index"))
    assert torch.equal(index.embeddings, model.index.embeddings)
    assert os.listdir(os.path.join(path, "ict")) == []  # nothing to load there


@pytest.mark.parametrize("loader", [AutoModelForQuestionAnswering.from_pretrained, RealmForOpenQA.from_pretrained])
def test_openqa_root_gives_the_model_with_index_and_retriever(openqa_dir, loader, caplog):
    path, model, tokenizer = openqa_dir
    with caplog.at_level(logging.INFO, logger="hf_realm"):
        loaded = loader(path).eval()
    assert type(loaded) is RealmForOpenQA and same_weights(loaded, model)
    assert torch.equal(loaded.index.embeddings, model.index.embeddings)
    assert list(loaded.retriever.block_records) == list(model.retriever.block_records)
    assert "restored the corpus index" in caplog.text and "restored the retriever" in caplog.text
    batch = DataCollatorForOpenQA(tokenizer)([{"question": "who wrote hamlet ?", "answers": ["shakespeare"]}])
    with torch.no_grad():
        expected, got = model(**batch), loaded(**batch)
    assert torch.equal(expected.reader_output.block_idx, got.reader_output.block_idx)
    assert [a.tolist() for a in expected.predicted_answer_ids] == [a.tolist() for a in got.predicted_answer_ids]
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_parts_of_the_openqa_root(openqa_dir):
    path, model, _ = openqa_dir
    embedder = AutoModel.from_pretrained(path)  # the trained query embedder, not a fresh one
    assert type(embedder) is RealmEmbedder and same_weights(embedder, model.embedder)
    assert same_weights(RealmReader.from_pretrained(path), model.reader)
    with pytest.raises(ValueError, match=r"holds a RealmForOpenQA .*AutoModelForQuestionAnswering"):
        AutoModelForMaskedLM.from_pretrained(path)
    with pytest.raises(ValueError, match="holds a RealmForOpenQA"):
        RealmForMaskedLM.from_pretrained(path)


def test_a_4x_pickled_retriever_is_not_restored_silently(caplog, monkeypatch):
    """4.x wrote block records as a pickle: loading the model warns and leaves the retriever to the caller."""
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    path = os.path.join(ROOT, "tests", "fixtures", "tf4", "openqa")
    with caplog.at_level(logging.WARNING, logger="hf_realm"):
        model = RealmForOpenQA.from_pretrained(path)
    assert model.retriever is None and model.index is None
    assert "was not restored" in caplog.text and "allow_pickle=True" in caplog.text


@pytest.mark.slow
def test_directories_written_by_the_examples(tmp_path):
    """Run train_realm.py and finetune_openqa.py on tiny settings, then load every directory they wrote."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    tiny = ["--num_entities", "40", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    train = str(tmp_path / "train_realm")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_realm.py"), *tiny, "--hidden_size", "32",
         "--intermediate_size", "37", "--retriever_proj_size", "16", "--num_candidates", "3", "--ict_steps", "2", "--reader_warmup_steps", "2",
         "--ict_batch_size", "8", "--max_eval_examples", "8", "--share_embedders", "false", "--output_dir", train],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    finetune = str(tmp_path / "finetune_openqa")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune_openqa.py"), *tiny, "--realm_checkpoint", train,
         "--searcher_beam_size", "6", "--reader_beam_size", "2", "--max_eval_examples", "8", "--output_dir", finetune],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    masked_lm = AutoModelForMaskedLM.from_pretrained(train)
    assert type(masked_lm) is RealmForMaskedLM and len(masked_lm.index) == 40
    with pytest.raises(ValueError, match="query_embedder"):
        AutoModel.from_pretrained(train)
    for sub, part in (("embedder", "embedder"), ("query_embedder", "query_embedder"), ("encoder", "encoder")):
        auto = AutoModelForMaskedLM if sub == "encoder" else AutoModel
        assert same_weights(auto.from_pretrained(os.path.join(train, sub)), getattr(masked_lm, part))
    qa = AutoModelForQuestionAnswering.from_pretrained(finetune)
    assert type(qa) is RealmForOpenQA and len(qa.index) == 40 and len(qa.retriever.block_records) == 40
    assert same_weights(AutoModel.from_pretrained(finetune), qa.embedder)
    results = json.loads((tmp_path / "finetune_openqa" / "all_results.json").read_text())
    from hf_realm.openqa import evaluate_open_qa
    from hf_realm.world import KnowledgeWorld

    questions = KnowledgeWorld(num_entities=40, seed=0).qa()["test"].select(range(8))
    metrics, _ = evaluate_open_qa(qa.eval(), questions, qa.retriever.tokenizer, batch_size=32)
    assert metrics["exact_match"] == pytest.approx(results["eval_exact_match"])  # the trained model, as evaluated


def test_an_openqa_lora_adapter_is_refused_by_other_classes(tmp_path):
    """`finetune_openqa.py --lora_r N` saves `adapter/` (LoRA weights of a RealmForOpenQA, its base named as the
    pretraining embedder) with a marker: `AutoModel` on it would build a RealmEmbedder and apply weights that match
    none of its modules; it raises instead, naming the class the adapter belongs to."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from hf_realm import RealmEmbedder, RealmForOpenQA
    from hf_realm.loading import ADAPTER_MARKER_NAME

    config = tiny_realm_config()
    RealmEmbedder(config).save_pretrained(tmp_path / "embedder")
    peft_model = get_peft_model(RealmForOpenQA(config), LoraConfig(r=2, target_modules=["query", "value"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "embedder")
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    before = sorted(p.name for p in adapter.iterdir())
    (adapter / ADAPTER_MARKER_NAME).write_text(json.dumps({"model_class": "RealmForOpenQA", "hint": "load X"}))
    with pytest.raises(ValueError, match=r"LoRA adapter trained on RealmForOpenQA, not RealmEmbedder.*load X"):
        AutoModel.from_pretrained(adapter)
    with pytest.raises(ValueError, match=r"trained on RealmForOpenQA, not RealmEmbedder"):
        RealmEmbedder.from_pretrained(adapter)
    assert sorted(p.name for p in adapter.iterdir()) == sorted([*before, ADAPTER_MARKER_NAME])


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_openqa_saves_the_model_before_evaluating_it(tmp_path, monkeypatch, lora):
    """finetune_openqa.py saves the trained model (merged, with LoRA), its retriever and its index before the test
    evaluation, and evaluates exactly what it saved: an evaluation that fails or is killed keeps the trained model."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import finetune_openqa

    evaluated = {}

    def failing_evaluation(model, *args, **kwargs):
        evaluated.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise RuntimeError("evaluation interrupted")

    monkeypatch.setattr(finetune_openqa, "evaluate_open_qa", failing_evaluation)
    out = tmp_path / "finetune"
    argv = ["--num_entities", "40", "--max_steps", "2", "--per_device_train_batch_size", "4", "--ict_steps", "2",
            "--ict_batch_size", "8", "--searcher_beam_size", "6", "--reader_beam_size", "2", "--hidden_size", "32",
            "--intermediate_size", "37", "--retriever_proj_size", "16", "--output_dir", str(out), "--use_cpu", "true",
            "--disable_tqdm", "true", "--realm_checkpoint", str(tmp_path / "none")]  # fmt: skip
    if lora:
        argv += ["--lora_r", "2"]
    with pytest.raises(RuntimeError, match="evaluation interrupted"):
        finetune_openqa.main(argv)
    assert not (out / "all_results.json").exists()
    saved = AutoModelForQuestionAnswering.from_pretrained(out)
    assert type(saved) is RealmForOpenQA and len(saved.index) == 40 and len(saved.retriever.block_records) == 40
    state = saved.state_dict()
    assert evaluated.keys() == state.keys() and all(torch.equal(evaluated[k], state[k]) for k in state)
    assert (out / "adapter" / "adapter_config.json").exists() == lora


def test_finetune_openqa_retriever_max_steps_freezes_the_query_tower_after_them(tmp_path, monkeypatch):
    """`--retriever_max_steps 1`: the saved query embedder is the one after step 1 (later steps train only the
    reader); with `--train_retriever false` the option fails before any work."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import finetune_openqa

    seen = {}

    class Spy(finetune_openqa.FreezeRetrieverCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen[0] = {k: v.detach().clone() for k, v in model.embedder.state_dict().items()}
            super().on_train_begin(args, state, control, model=model, **kwargs)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = {k: v.detach().clone() for k, v in model.embedder.state_dict().items()}

    monkeypatch.setattr(finetune_openqa, "FreezeRetrieverCallback", Spy)
    out = tmp_path / "finetune"
    argv = ["--num_entities", "40", "--max_steps", "3", "--per_device_train_batch_size", "4", "--ict_steps", "2",
            "--ict_batch_size", "8", "--searcher_beam_size", "6", "--reader_beam_size", "2", "--hidden_size", "32",
            "--intermediate_size", "37", "--retriever_proj_size", "16", "--output_dir", str(out), "--use_cpu", "true",
            "--disable_tqdm", "true", "--realm_checkpoint", str(tmp_path / "none"), "--max_eval_examples", "4",
            "--warmup_steps", "0"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--retriever_max_steps: expected a retriever that trains, got --train_r"):
        finetune_openqa.main([*argv, "--retriever_max_steps", "1", "--train_retriever", "false"])
    assert not out.exists()
    results = finetune_openqa.main([*argv, "--retriever_max_steps", "1"])
    assert results["retriever_frozen_at_step"] == 1 and sorted(seen) == [0, 1, 2, 3]
    assert any(not torch.equal(v, seen[1][k]) for k, v in seen[0].items())  # step 1 trained the retriever
    saved = AutoModelForQuestionAnswering.from_pretrained(out).embedder.state_dict()
    assert all(torch.equal(saved[k], seen[1][k]) and torch.equal(seen[3][k], seen[1][k]) for k in saved)


def test_finetune_openqa_ict_group_by_reaches_ict_or_fails_before_it(tmp_path, monkeypatch):
    """`--ict_group_by doc_id` is passed to the ICT trainer; a column the corpus lacks fails before any training."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import finetune_openqa

    seen = []

    def spy(model, corpus, tokenizer, training_args, **kwargs):
        seen.append((kwargs.get("group_by"), len(set(corpus["doc_id"]))))
        raise RuntimeError("stop after ICT is called")

    monkeypatch.setattr(finetune_openqa, "train_inverse_cloze_task", spy)
    out = tmp_path / "finetune"
    argv = ["--num_entities", "40", "--max_steps", "1", "--ict_steps", "2", "--ict_batch_size", "8",
            "--hidden_size", "32", "--intermediate_size", "37", "--retriever_proj_size", "16", "--output_dir", str(out),
            "--use_cpu", "true", "--disable_tqdm", "true", "--realm_checkpoint", str(tmp_path / "none")]  # fmt: skip
    with pytest.raises(ValueError, match=r"--ict_group_by: expected a column of the corpus's blocks, got 'article'"):
        finetune_openqa.main([*argv, "--ict_group_by", "article"])
    assert seen == [] and not out.exists()
    with pytest.raises(RuntimeError, match="stop after ICT is called"):
        finetune_openqa.main([*argv, "--ict_group_by", "doc_id"])
    assert seen == [("doc_id", 40)]
