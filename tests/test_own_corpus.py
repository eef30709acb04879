"""REALM pretraining on your own text: the library path (`build_pretraining_examples` and friends), the script's data
arguments (`examples/train_realm.py --corpus_file ...`), the checks that run before training, the signals logged
while it runs, and (slow) the quality bar on files written from the second generated world."""

from __future__ import annotations

import json
import logging
import warnings

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_realm import (
    DataCollatorForSalientSpanMasking,
    KnowledgeWorld,
    NoSalientSpanWarning,
    RealmBlockIndex,
    RealmForMaskedLM,
    RetrievalMonitorCallback,
    SalientSpanMasker,
    build_corpus,
    build_pretraining_examples,
    corpus_sentences,
    evaluate_masked_lm,
    load_text_dataset,
    train_wordpiece_tokenizer,
)
from hf_realm.pretraining import _answer_hits

from .conftest import tiny_realm_config
from .test_knn_generation import _load_script


DOCS = [
    {"title": "Ada Lovelace", "text": "Ada Lovelace was born in London in 1815. She wrote notes on the Engine."},
    {"title": "Alan Turing", "text": "Alan Turing was born in London in 1912. He worked at Bletchley Park."},
    {"title": "Grace Hopper", "text": "Grace Hopper was born in New York in 1906. She wrote the first compiler."},
]
TRAIN = [
    {"text": "Ada Lovelace was born in 1815.", "span": "1815"},
    {"text": "Alan Turing worked at Bletchley Park.", "span": "Bletchley Park"},
    {"text": "Grace Hopper wrote the first compiler in New York."},
]
TINY_SCRIPT = [
    "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--intermediate_size", "37",
    "--retriever_proj_size", "16", "--num_candidates", "3", "--max_position_embeddings", "64", "--ict_steps", "2", "--reader_warmup_steps", "2",
    "--ict_batch_size", "2", "--max_steps", "3", "--per_device_train_batch_size", "2", "--refresh_steps", "2",
    "--monitor_steps", "2", "--vocab_size", "300", "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def train_realm():
    return _load_script("examples/train_realm.py")


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer([d["text"] for d in DOCS] + [r["text"] for r in TRAIN], vocab_size=300)


def test_build_pretraining_examples_spans_sources_and_gold(tokenizer):
    corpus = build_corpus(DOCS, tokenizer, block_seq_len=32)
    rows = [dict(r, gold_block_id=i) for i, r in enumerate(TRAIN)]
    with warnings.catch_warnings(record=True) as caught:  # the third row has salient spans: no warning
        warnings.simplefilter("always")
        examples = build_pretraining_examples(corpus, rows, tokenizer=tokenizer, max_length=32)
    assert not [w for w in caught if issubclass(w.category, NoSalientSpanWarning)]
    assert examples["span_start"] == [25, 22, -1] and examples["span_end"] == [29, 36, -1]
    assert [examples["text"][i][s:e] for i, s, e in ((0, 25, 29), (1, 22, 36))] == ["1815", "Bletchley Park"]
    assert examples["source_block_id"] == [-1, -1, -1] and examples["gold_block_id"] == [0, 1, 2]
    # the corpus's own sentences: each keeps its block as the source, dropped from retrieval
    with pytest.warns(NoSalientSpanWarning, match="1 of 6 rows .* row 5: 'She wrote the first compiler.'"):
        own = build_pretraining_examples(corpus)
    expected = [(s, b) for b, d in enumerate(DOCS) for s in d["text"].split(". ")]
    assert own["text"] == [s if s.endswith(".") else s + "." for s, _ in expected]
    assert own["source_block_id"] == [b for _, b in expected]
    # the collator masks exactly the given span's wordpieces
    collator = DataCollatorForSalientSpanMasking(tokenizer, max_length=32, seed=0)
    batch = collator([examples[0], examples[1]])
    for row, span in zip(batch["labels"], ["1815", "bletchley park"], strict=True):
        assert tokenizer.decode(row[row != -100]) == span
    assert "source_block_id" in batch and "gold_block_id" in batch


def test_corpus_sentences_without_words_are_left_out(tokenizer):
    corpus = build_corpus([{"text": "Ada wrote the notes in 1843. , , ) . - - - - . It ran."}], tokenizer)
    assert corpus_sentences(corpus)["text"] == ["Ada wrote the notes in 1843."]
    collator = DataCollatorForSalientSpanMasking(tokenizer, max_length=32, seed=0)
    with pytest.raises(ValueError, match="nothing to mask"):  # what training met before they were left out
        collator([{"text": ", , ) ."}])


def test_no_salient_span_warns_once_with_a_count(tokenizer):
    corpus = build_corpus(DOCS, tokenizer, block_seq_len=32)
    rows = [{"text": "was born in the city"}, {"text": "Ada wrote notes"}, {"text": "she wrote the notes"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_pretraining_examples(corpus, rows)
    messages = [str(w.message) for w in caught if issubclass(w.category, NoSalientSpanWarning)]
    assert len(messages) == 1 and messages[0].startswith("2 of 3 rows") and "row 0" in messages[0]
    masker = SalientSpanMasker(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            masker.choose_span("was born in the city")
    assert sum(issubclass(w.category, NoSalientSpanWarning) for w in caught) == 1
    assert masker.num_random_fallbacks == 5


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing_file", FileNotFoundError, r"corpus file '.*nowhere\.jsonl' does not exist"),
        ("missing_column", ValueError, r"corpus file '.*corpus\.jsonl' has no column 'body'; its columns are"),
        ("empty_corpus", ValueError, r"corpus file '.*empty\.jsonl' has no rows"),
        ("blank_corpus", ValueError, r"corpus '.*blank\.jsonl' gives no block"),
        ("span_not_found", ValueError, r"train '.*train\.jsonl', row 1: span 'Paris' is not in its text"),
        ("no_maskable_span", ValueError, r"validation file '.*validation\.jsonl', row 0: nothing to mask"),
        ("no_word", ValueError, r"train '.*train\.jsonl', row 1: nothing to mask in ', , \) \.': no word"),
        ("unknown_type", ValueError, r"corpus file '.*corpus\.xml': unknown type '\.xml'"),
        ("ict_group_by", ValueError, r"--ict_group_by: expected a column of the corpus's blocks, got 'article'"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, train_realm, monkeypatch, case, error, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    validation = write_jsonl(
        tmp_path / "validation.jsonl", [{"text": "Ada Lovelace was born in 1815.", "span": "1815"}]
    )
    args = {"--corpus_file": corpus, "--train_file": train, "--validation_file": validation}
    if case == "missing_file":
        args["--corpus_file"] = str(tmp_path / "nowhere.jsonl")
    elif case == "missing_column":
        args["--corpus_text_column"] = "body"
    elif case == "empty_corpus":
        args["--corpus_file"] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "blank_corpus":
        args["--corpus_file"] = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    elif case == "span_not_found":
        write_jsonl(tmp_path / "train.jsonl", [TRAIN[0], {"text": "Alan Turing was born in London.", "span": "Paris"}])
    elif case == "no_word":  # wikitext after dropping its <unk> tokens: the collator would fail mid-training
        write_jsonl(tmp_path / "train.jsonl", [TRAIN[0], {"text": ", , ) ."}])
    elif case == "no_maskable_span":
        write_jsonl(tmp_path / "validation.jsonl", [{"text": "she was born in the city"}])
    elif case == "ict_group_by":
        args["--ict_group_by"] = "article"
    elif case == "unknown_type":
        (tmp_path / "corpus.xml").write_text("<docs/>")
        args["--corpus_file"] = str(tmp_path / "corpus.xml")

    def no_training(*a, **k):
        raise AssertionError("training started before the data was checked")

    monkeypatch.setattr(train_realm, "train_ict", no_training)
    argv = [x for kv in args.items() for x in kv] + TINY_SCRIPT + ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(error, match=message):
        train_realm.main(argv)
    assert not (tmp_path / "out").exists()


def test_load_text_dataset_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    datasets.Dataset.from_list(DOCS).to_csv(str(tmp_path / "a.csv"))
    datasets.Dataset.from_list(DOCS).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.txt").write_text("\n".join(d["text"] for d in DOCS) + "\n")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        data = load_text_dataset(str(tmp_path / name), columns=["text"], optional_columns=["title", "missing"])
        assert data.column_names == ["text", "title"] and data.to_list() == [
            {"text": d["text"], "title": d["title"]} for d in DOCS
        ]
    assert load_text_dataset(str(tmp_path / "a.txt"))["text"] == [d["text"] for d in DOCS]


def test_answer_hits_match_a_brute_force_substring_search():
    blocks = [[2, 10, 11, 12, 3], [2, 11, 3], [2, 12, 10, 11, 3, 0, 0]]

    class Index:
        def block_inputs(self, ids):
            rows = [blocks[i] for i in ids.tolist()]
            width = max(map(len, rows))
            ids_ = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            return {"input_ids": ids_, "attention_mask": (ids_ != 0).long()}

    retrieved = torch.tensor([[0, 1, 2], [2, 1, 0]])
    labels = torch.tensor([[-100, 10, 11, -100], [-100, -100, 12, 10]])
    hits = _answer_hits(Index(), retrieved, labels)

    def contains(block, answer):
        return any(block[i : i + len(answer)] == answer for i in range(len(block)))

    expected = [
        [contains(blocks[b], a) for b in row] for row, a in zip(retrieved.tolist(), [[10, 11], [12, 10]], strict=True)
    ]
    assert hits == expected == [[True, False, True], [True, False, False]]


def test_monitor_warns_when_utility_stays_non_positive(monkeypatch, caplog):
    import hf_realm.pretraining as pretraining

    utilities = iter([0.5, -0.1, 0.0, -0.2, 0.3])
    fake = {"masked_span_accuracy": 0.1, "closed_book_span_accuracy": 0.05, "recall@1": 0.5}
    monkeypatch.setattr(
        pretraining, "evaluate_masked_lm", lambda *a, **k: {**fake, "retrieval_utility": next(utilities)}
    )
    monitor = RetrievalMonitorCallback([], None, eval_steps=10, patience=2)
    with caplog.at_level(logging.INFO, logger="hf_realm.pretraining"):
        for step in (10, 20, 30, 40, 50):
            monitor.check(None, step)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warned) == 1
        and "stayed <= 0 for 2 checks" in warned[0].getMessage()
        and "step 30" in warned[0].getMessage()
    )
    assert [h["retrieval_utility"] for h in monitor.history] == [0.5, -0.1, 0.0, -0.2, 0.3]
    assert monitor.history[0] == {"step": 10, "retrieval_utility": 0.5, "masked_span_accuracy": 0.1,
                                  "closed_book_span_accuracy": 0.05, "recall@1": 0.5}  # fmt: skip


def test_monitor_warns_once_when_retrieval_gets_worse(monkeypatch, caplog):
    """The answer recall of REALM pretraining on SQuAD-open's corpus (H100, 2026-12-07): below 80% of its start at
    steps 600 and 800, so the warning comes at 800, once; gold-block recall decides over answer recall when present."""
    import hf_realm.pretraining as pretraining

    answer_recall = [0.3516, 0.293, 0.3164, 0.2734, 0.1641, 0.1719, 0.1]
    utility = [0.1936, 0.1262, 0.0936, 0.0728, 0.0386, 0.0387, 0.03]
    rows = iter(
        {
            "retrieval_utility": u,
            "masked_span_accuracy": 0.05,
            "closed_book_span_accuracy": 0.04,
            "answer_recall@5": r / 2,
            "answer_recall@8": r,
        }  # fmt: skip
        for u, r in zip(utility, answer_recall, strict=True)
    )
    monkeypatch.setattr(pretraining, "evaluate_masked_lm", lambda *a, **k: next(rows))
    monitor = RetrievalMonitorCallback([], None, eval_steps=200, patience=2)
    with caplog.at_level(logging.WARNING, logger="hf_realm.pretraining"):
        for step in range(0, 1400, 200):
            monitor.check(None, step)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "retrieval is getting worse" in warned[0]
    assert "answer_recall@8 fell from 0.352 at step 0 to 0.164 at step 800" in warned[0]
    assert "retrieval_utility 0.194 -> 0.039" in warned[0]

    # Gold-block recall holds steady while answer recall falls: no warning; then gold recall falls for 2 checks.
    gold = iter([0.9, 0.85, 0.88, 0.7, 0.71])
    monkeypatch.setattr(
        pretraining,
        "evaluate_masked_lm",
        lambda *a, **k: {
            "retrieval_utility": 0.1,
            "masked_span_accuracy": 0.1,
            "closed_book_span_accuracy": 0.1,
            "recall@8": next(gold),
            "answer_recall@8": 0.01,
        },  # fmt: skip
    )
    monitor = RetrievalMonitorCallback([], None, eval_steps=10, patience=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_realm.pretraining"):
        for step in range(0, 50, 10):
            monitor.check(None, step)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "recall@8 fell from 0.900 at step 0 to 0.710 at step 40" in warned[0]
    with pytest.raises(ValueError, match="0 < decline < 1"):
        RetrievalMonitorCallback([], None, eval_steps=10, decline=1.0)


def test_library_path_end_to_end_from_files(tmp_path, tokenizer):
    """Files on disk -> corpus, examples, index -> a few `Trainer` steps of `RealmForMaskedLM`: the own blocks of the
    corpus's sentences are never candidates, and the trained model is evaluated on held-out rows."""
    corpus_docs = load_text_dataset(write_jsonl(tmp_path / "corpus.jsonl", DOCS), optional_columns=["title"])
    corpus = build_corpus(corpus_docs, tokenizer, block_seq_len=32)
    with pytest.warns(NoSalientSpanWarning):  # the corpus's own sentences: one has no salient span
        train = build_pretraining_examples(corpus, tokenizer=tokenizer, max_length=32)
    held_out = build_pretraining_examples(corpus, load_text_dataset(write_jsonl(tmp_path / "t.jsonl", TRAIN[:2]), optional_columns=["span"]), require_span=True)  # fmt: skip
    torch.manual_seed(0)
    config = tiny_realm_config(vocab_size=len(tokenizer), num_candidates=3, max_position_embeddings=64)
    model = RealmForMaskedLM(config)
    model.index = RealmBlockIndex.build(corpus, model.embedder, backend="torch", embed_kwargs={"show_progress": False})
    collator = DataCollatorForSalientSpanMasking(tokenizer, max_length=32, seed=0)
    with pytest.warns(NoSalientSpanWarning):
        batch = collator([train[i] for i in range(len(train))])
    out = model(**{k: v for k, v in batch.items() if k != "gold_block_id"})
    own = batch["source_block_id"].view(-1, 1)
    assert not (out.retrieved_block_ids == own).any() and (out.retrieved_block_ids[:, 0] == -1).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("embedder.") for k in changed)
    metrics = evaluate_masked_lm(model, held_out, collator, recall_ks=(1, 2))
    assert metrics["num_examples"] == 2 and set(metrics) >= {"answer_recall@1", "answer_recall@2", "retrieval_utility"}


def test_script_main_from_files_of_the_second_world(tmp_path, train_realm):
    """`train_realm.py --corpus_file/--train_file/--validation_file` on files written from the registry world: it
    trains, evaluates every held-out row with gold-block recall, and what it saves reproduces its own numbers."""
    world = KnowledgeWorld(num_entities=30, seed=3, templates="registry")
    paths = world.write_pretraining_files(tmp_path / "data")
    with pytest.raises(FileExistsError):
        world.write_pretraining_files(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--corpus_file", paths["corpus"], "--corpus_title_column", "title", "--train_file", paths["train"],
            "--validation_file", paths["validation"], "--output_dir", str(out), *TINY_SCRIPT,
            "--max_position_embeddings", "128"]  # fmt: skip
    results = train_realm.main(argv)
    assert results["eval_num_examples"] == len(world.pretraining()["test"]) == 12
    assert (
        json.loads((out / "all_results.json").read_text())["eval_masked_span_accuracy"]
        == results["eval_masked_span_accuracy"]
    )
    assert [m["step"] for m in results["monitor"]] == [0, 2]
    # the saved model, tokenizer and index give back the numbers the run reported
    from transformers import AutoTokenizer

    model = RealmForMaskedLM.from_pretrained(str(out)).eval()
    assert model.index is not None and model.index.num_blocks == 30
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    rows = load_text_dataset(paths["validation"], optional_columns=["span", "gold_block_id"])
    held_out = build_pretraining_examples(world.corpus(), rows)
    again = evaluate_masked_lm(model, held_out, DataCollatorForSalientSpanMasking(tokenizer, max_length=64))
    for key in ("log_prob", "masked_span_accuracy", "recall@8", "answer_recall@1"):
        assert again[key] == pytest.approx(results[f"eval_fresh_index_{key}"], abs=1e-5), key


def test_script_ict_batches_grouped_by_document(tmp_path, train_realm, monkeypatch):
    """`--ict_group_by doc_id` reaches the ICT trainer, which then reads whole documents per batch."""
    seen = []
    real = train_realm.train_inverse_cloze_task

    def spy(model, corpus, tokenizer, training_args, **kw):
        seen.append((kw.get("group_by"), list(corpus["doc_id"])))
        return real(model, corpus, tokenizer, training_args, **kw)

    monkeypatch.setattr(train_realm, "train_inverse_cloze_task", spy)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    argv = ["--corpus_file", corpus, "--train_file", train, "--ict_group_by", "doc_id", *TINY_SCRIPT,
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    train_realm.main(argv)
    assert seen == [("doc_id", list(range(len(DOCS))))]


@pytest.mark.slow
def test_quality_on_files_of_the_second_world(tmp_path, train_realm):
    """The acceptance bar of the default recipe, on data it was not tuned on: files written from the registry world
    (other phrasings, hyphenated names, two-word cities), read through the own-corpus path."""
    paths = KnowledgeWorld(num_entities=1000, seed=0, templates="registry").write_pretraining_files(tmp_path / "data")
    argv = ["--corpus_file", paths["corpus"], "--corpus_title_column", "title", "--train_file", paths["train"],
            "--validation_file", paths["validation"], "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]  # fmt: skip
    results = train_realm.main(argv)
    assert results["eval_masked_span_accuracy"] >= 0.40
    assert results["eval_masked_span_accuracy"] >= 10 * results["eval_closed_book_span_accuracy"]
    assert results["eval_recall@8"] >= 0.95
