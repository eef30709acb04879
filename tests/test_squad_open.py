"""SQuAD-open preparation (distractors, a dev split by article), the held-out evaluation callback of fine-tuning, and
the paired bootstrap of `benchmarks/squad_open.py`."""

import importlib.util
import json
import os
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerState

from hf_realm import FreezeRetrieverCallback, OpenQAEvalCallback, optimizer_grouped_parameters
from hf_realm.openqa import DataCollatorForOpenQA, evaluate_open_qa

from .conftest import tiny_training_args
from .test_openqa import QUESTIONS, models


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


prepare = load("examples/prepare_squad_open.py", "prepare_squad_open")
squad_open = load("benchmarks/squad_open.py", "squad_open_benchmark")

WIKITEXT = "\n".join(  # wikitext-2's layout: a space at both ends of every line
    f" {line} "
    for line in [
        "",
        "= Homarus gammarus =",
        "",
        "Homarus gammarus is a species of <unk> lobster . It may grow to 0 @.@ 6 m and 6 @,@ 000 g . It is blue @-@ black .",
        "",
        "= = Description = =",
        "",
        "One sentence without an end",
        "= Valley =",
        "",
        "A b c . D e f g h i j . K .",
    ]
)


def squad_file(tmp_path, num_articles=10):
    data = []
    for a in range(num_articles):
        paragraphs = [
            {
                "context": f"article {a} paragraph {p} says the answer is x{a}y{p} .",
                "qas": [
                    {"question": f"what is {a} {p} {q} ?", "answers": [{"text": f"x{a}y{p}"}] * 2} for q in (0, 1)
                ],
            }
            for p in range(2)
        ]
        data.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": data}))
    return path


def read(path):
    return [json.loads(line) for line in open(path)]


def test_wikitext_paragraphs(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKITEXT)
    got = list(prepare.wikitext_paragraphs(str(path), max_words=6))
    assert got == [
        (
            "Homarus gammarus",
            "Homarus gammarus is a species of lobster .",
        ),  # <unk> dropped; a sentence longer than 6 words stays whole
        ("Homarus gammarus", "It may grow to 0.6 m and 6,000 g ."),
        ("Homarus gammarus", "It is blue-black ."),
        ("Homarus gammarus", "One sentence without an end"),  # a section heading does not change the title
        ("Valley", "A b c ."),
        ("Valley", "D e f g h i j ."),
        ("Valley", "K ."),
    ]
    assert [len(t.split()) for _, t in prepare.wikitext_paragraphs(str(path), max_words=100)] == [22, 5, 14]
    with pytest.raises(FileNotFoundError, match="no file"):
        list(prepare.wikitext_paragraphs(str(tmp_path / "missing.txt"), 10))


def test_prepare_with_distractors_and_dev(tmp_path):
    squad = squad_file(tmp_path)
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKITEXT)
    plain = prepare.main(["--squad_path", str(squad), "--output_dir", str(tmp_path / "plain")])
    full = prepare.main(
        ["--squad_path", str(squad), "--output_dir", str(tmp_path / "full"), "--dev_fraction", "0.25",
         "--distractors", f"{wiki},{wiki}", "--max_distractor_words", "100"]
    )  # fmt: skip
    assert plain["blocks"] == 20 and full["blocks"] == 20 + 6 and full["distractor_blocks"] == 6
    # the test split does not move when a dev split and distractors are added
    assert read(tmp_path / "plain" / "test.jsonl") == read(tmp_path / "full" / "test.jsonl")
    assert (full["test_articles"], full["dev_articles"], full["dev_questions"]) == (2, 2, 8)
    corpus = read(tmp_path / "full" / "corpus.jsonl")
    assert [c["block_id"] for c in corpus] == list(range(26))
    assert [c["doc_id"] for c in corpus[20:]] == [10, 10, 11, 10, 10, 11]  # one document per article (of a file)
    articles = {}
    for split in ("train", "dev", "test"):
        for q in read(tmp_path / "full" / f"{split}.jsonl"):
            block = corpus[q["gold_block_id"]]
            assert q["answers"] == [q["answers"][0]] and q["answers"][0] in block["text"]
            articles.setdefault(block["doc_id"], set()).add(split)
    assert all(len(splits) == 1 for splits in articles.values())
    assert not (tmp_path / "plain" / "dev.jsonl").exists()


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    first = (rng.random(2000) < 0.4).astype(float)
    second = np.where(rng.random(2000) < 0.8, first, (rng.random(2000) < 0.6).astype(float))
    got = squad_open.paired_bootstrap(first, second, samples=4000)
    diff = (second - first) * 100
    assert got["difference"] == pytest.approx(diff.mean(), abs=1e-12)
    se = diff.std(ddof=1) / np.sqrt(len(diff))  # the normal approximation the percentile interval must be close to
    assert got["ci95"][0] == pytest.approx(diff.mean() - 1.96 * se, abs=0.15 * se * 1.96)
    assert got["ci95"][1] == pytest.approx(diff.mean() + 1.96 * se, abs=0.15 * se * 1.96)
    with pytest.raises(ValueError, match="same questions"):
        squad_open.paired_bootstrap(first, second[:-1], samples=10)


def test_em_by_gold_rank(tmp_path):
    rows = [  # (gold block, blocks read, prediction, answers)
        (3, [3, 1, 2], "Paris", ["paris"]),
        (3, [3, 1, 2], "Lyon", ["Paris"]),
        (4, [0, 4, 1], "the Seine", ["Seine"]),
        (5, [0, 1, 2], "x", ["y"]),
        (6, [0, 1, 2], "Rome", ["Rome", "Roma"]),
        (7, [9, 8, 7], "z", ["w"]),
    ]
    questions = [{"question": f"q{i}", "answers": r[3], "gold_block_id": r[0]} for i, r in enumerate(rows)]
    predictions = [{"question": f"q{i}", "prediction": r[2], "answers": r[3], "retrieved": r[1]} for i, r in
                   enumerate(rows)]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions + [questions[0]]))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    got = squad_open.em_by_gold_rank(str(tmp_path / "p.jsonl"), str(tmp_path / "q.jsonl"))
    assert list(got) == ["first", "2-3", "absent"]
    assert got["first"] == {"questions": 2, "exact_match": 0.5}
    assert got["2-3"]["questions"] == 2 and got["2-3"]["exact_match"] == pytest.approx(0.5)  # "the Seine" matches
    assert got["absent"] == {"questions": 2, "exact_match": 0.5}
    predictions[1]["question"] = "q9"  # out of step with the questions file: refused, not miscounted
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    with pytest.raises(ValueError, match="q9"):
        squad_open.em_by_gold_rank(str(tmp_path / "p.jsonl"), str(tmp_path / "q.jsonl"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "q0", "prediction": "a", "answers": ["a"]}) + "\n")
    assert squad_open.em_by_gold_rank(str(tmp_path / "p.jsonl"), str(tmp_path / "q.jsonl")) is None


def test_eval_callback_records_what_evaluate_open_qa_gives(tokenizer, tmp_path):
    _, model = models(tokenizer)
    model.train()
    dev = datasets.Dataset.from_list(QUESTIONS)
    callback = OpenQAEvalCallback(dev, tokenizer, eval_steps=2, batch_size=3)
    trainer = Trainer(
        model=model,
        args=tiny_training_args(tmp_path / "run", max_steps=3, disable_tqdm=True),
        train_dataset=dev,
        data_collator=DataCollatorForOpenQA(tokenizer),
        callbacks=[callback],
    )
    with torch.no_grad():
        start, _ = evaluate_open_qa(model, dev, tokenizer, batch_size=3)
    trainer.train()
    assert [h["step"] for h in callback.history] == [0, 2, 3]  # before training, every 2 steps, and at the end
    assert {k: callback.history[0][k] for k in start} == start
    with torch.no_grad():
        want, _ = evaluate_open_qa(model, dev, tokenizer, batch_size=3)
    assert {k: callback.history[-1][k] for k in want} == want
    assert any("dev_exact_match" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="eval_steps"):
        OpenQAEvalCallback(dev, tokenizer, eval_steps=-1)


def test_freeze_retriever_callback_stops_the_query_tower_and_nothing_else(tokenizer, tmp_path):
    """With `FreezeRetrieverCallback(2)` the first two steps equal an unfrozen run's bit for bit; after them the query
    embedder stays exactly as it was while the reader goes on training (and the unfrozen run's embedder moves)."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def __init__(self, model):
            self.model, self.steps = model, {}

        def on_step_end(self, args, state, control, **kwargs):
            self.steps[state.global_step] = {
                tower: {k: v.detach().clone() for k, v in getattr(self.model, tower).state_dict().items()}
                for tower in ("embedder", "reader")
            }

    def run(name, freeze):
        model = models(tokenizer)[1].train()
        snapshots = Snapshots(model)
        optimizer = torch.optim.AdamW(optimizer_grouped_parameters(model, 1e-2, 1e-2))
        callbacks = [snapshots] + ([FreezeRetrieverCallback(after_steps=2)] if freeze else [])
        trainer = Trainer(
            model=model,
            args=tiny_training_args(tmp_path / name, max_steps=4, disable_tqdm=True),
            train_dataset=datasets.Dataset.from_list(QUESTIONS),
            data_collator=DataCollatorForOpenQA(tokenizer),
            optimizers=(optimizer, None),
            callbacks=callbacks,
        )
        trainer.train()
        return snapshots.steps, callbacks[-1]

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    frozen, callback = run("frozen", freeze=True)
    free, _ = run("free", freeze=False)
    assert callback.frozen_at_step == 2
    for step in (1, 2):
        assert all(same(frozen[step][t], free[step][t]) for t in ("embedder", "reader")), step
    assert not same(free[1]["embedder"], free[2]["embedder"])  # the retriever trains before the freeze
    for step in (3, 4):
        assert same(frozen[step]["embedder"], frozen[2]["embedder"]), step
        assert not same(frozen[step]["reader"], frozen[step - 1]["reader"]), step
        assert not same(free[step]["embedder"], free[step - 1]["embedder"]), step  # it would have moved


def test_freeze_retriever_callback_refuses_what_it_cannot_freeze(tokenizer):
    model = models(tokenizer)[1]
    state = TrainerState()
    with pytest.raises(ValueError, match=r"expected an optimizer with parameter groups marked 'retriever': True"):
        FreezeRetrieverCallback(1).on_train_begin(None, state, None, optimizer=torch.optim.AdamW(model.parameters()))
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match=r"after_steps: expected an int >= 0, got"):
            FreezeRetrieverCallback(bad)


def test_stage_commands_give_orqa_and_realm_the_same_warm_start_and_fine_tuning(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n" * 320)
    args = squad_open.parse_args(
        ["--out", str(tmp_path), "--epochs", "2", "--batch_size", "16", "--bf16",
         "--pretrain_args", "--share_embedders false", "--finetune_args", "--max_span_width 12"]
    )  # fmt: skip
    commands = squad_open.stage_commands(args, str(data), str(tmp_path / "work"))

    def options(command):
        flags = [i for i, x in enumerate(command) if x.startswith("--")]
        return {command[i]: command[i + 1] for i in flags if i + 1 < len(command)}

    a, pretrain, b, c = (options(commands[n]) for n in ("a", "b_pretrain", "b", "c"))
    warm_start = ("--ict_steps", "--ict_batch_size", "--ict_learning_rate", "--retriever_proj_size", "--seed")
    for flag in warm_start + ("--bert_name_or_path",):
        assert a[flag] == pretrain[flag], flag
    assert a["--max_steps"] == b["--max_steps"] == c["--max_steps"] == "40"  # 2 epochs of 320 questions, 16 a step
    fine_tuning = ("--searcher_beam_size", "--reader_beam_size", "--reader_seq_len", "--learning_rate", "--bf16")
    assert all(a[f] == b[f] for f in fine_tuning)
    assert b["--realm_checkpoint"] == c["--realm_checkpoint"] == pretrain["--output_dir"]
    assert "--bert_name_or_path" not in b and "--bert_name_or_path" not in c  # else the checkpoint would be ignored
    assert c["--lora_r"] == "16" and "--lora_r" not in b
    assert pretrain["--share_embedders"] == "false" and "--share_embedders" not in a
    assert a["--max_span_width"] == b["--max_span_width"] == c["--max_span_width"] == "12"
    assert "--retriever_max_steps" not in a
    args = squad_open.parse_args(["--out", str(tmp_path), "--epochs", "2", "--retriever_epochs", "0.5"])
    commands = squad_open.stage_commands(args, str(data), str(tmp_path / "work"))
    assert all(options(commands[n])["--retriever_max_steps"] == "10" for n in ("a", "b", "c"))  # 0.5 x 320 / 16
