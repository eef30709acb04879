import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_realm.metrics import (
    answer_hits,
    compute_masked_span_metrics,
    exact_match,
    f1_score,
    gold_block_hits,
    has_answer,
    load_metric,
    make_open_qa_compute_metrics,
    masked_span_accuracy,
    metric_path,
    normalize_answer,
    recall_at_k,
    regex_match,
    simple_tokenize,
)

from .conftest import subprocess_env


DRQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "drqa_openqa"  # ../shared/data beside the checkout


# ---------------------------------------------------------------------------------------------------------------------
# SQuAD normalisation, EM, F1


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("A.B.C.", "abc"),
        ("an apple, the pear and a plum", "apple pear and plum"),
        ("Theater", "theater"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so "the-end" is one word without an article
        ("It's   1,000\tmiles", "its 1000 miles"),
        ("ÄHM", "ähm"),  # lower-casing is Unicode; accents are kept
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize_answer_squad_official(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Denver Broncos.", ["Denver Broncos"])
    assert exact_match("Denver  Broncos", "denver broncos")
    assert not exact_match("Broncos", ["Denver Broncos"])
    assert exact_match("Broncos", ["Denver Broncos", "the broncos"])
    assert not exact_match("Theater", ["the ater"])
    # F1: "denver broncos team" vs "denver broncos": precision 2/3, recall 1 -> 0.8
    assert f1_score("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8, abs=1e-12)
    # max over answers: 0.8 vs 2*(1/3*1)/(4/3) = 0.5
    assert f1_score("Denver Broncos team", ["Denver", "Broncos"]) == pytest.approx(0.5, abs=1e-12)
    assert f1_score("a the an", ["Broncos"]) == 0.0
    with pytest.raises(ValueError, match="answer list is empty"):
        exact_match("x", [])


# ---------------------------------------------------------------------------------------------------------------------
# DrQA regex match on CuratedTREC patterns

MCKINLEY = (
    r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,194-meter|20,?237\s*f(oo|ee)?t|20,?073\s*f(oo|ee)?t|6,?168\s*m|"
    r"6,118\s*m|6\,194 m|20\,322 feet"
)
JERUSALEM = r"\b2,?[4567][0-9][0-9]\b"


@pytest.mark.parametrize(
    "prediction, pattern, expected",
    [
        ("20,320 feet", MCKINLEY, True),
        ("20320 feet", MCKINLEY, True),
        ("20,320-FOOT", MCKINLEY, True),  # case-insensitive
        ("6,194-meter", MCKINLEY, True),
        ("6,194 m high", MCKINLEY, True),  # anchored at the start only
        ("6194 meters", MCKINLEY, False),
        ("Mount McKinley is 20,320 feet", MCKINLEY, False),  # not at the start
        ("2,550", JERUSALEM, True),
        ("2550 feet", JERUSALEM, True),
        ("about 2,550 feet", JERUSALEM, False),
        ("25500", JERUSALEM, False),
        ("2,850", JERUSALEM, False),
        ("china", "China", True),
    ],
)
def test_regex_match_drqa_semantics(prediction, pattern, expected):
    assert regex_match(prediction, pattern) is expected


def test_regex_match_on_curatedtrec_file_and_bad_pattern(caplog):
    test_file, train_file = DRQA / "CuratedTrec-test.txt", DRQA / "CuratedTrec-train.txt"
    if not test_file.exists():
        pytest.skip("shared CuratedTREC data not present")
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    assert rows[0]["question"] == "How tall is Mount McKinley?" and rows[0]["answer"] == [MCKINLEY]
    assert rows[4]["answer"] == [JERUSALEM]
    assert regex_match("20,320 feet", rows[0]["answer"]) and not regex_match("20,000 feet", rows[0]["answer"])
    # train line 701 ends in a lone backslash: DrQA counts it as no match (and logs)
    bad = json.loads(train_file.read_text().splitlines()[700])
    assert bad["question"] == "What is measured in curies?"
    with caplog.at_level(logging.WARNING, logger="hf_realm.metrics"):
        assert regex_match("radiation", bad["answer"]) is False
    assert "failed to compile" in caplog.text


def test_regex_match_normalize_option():
    assert not regex_match("The China", "China")
    assert regex_match("The China", "China", normalize=True)


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval: has_answer and recall@k


def test_simple_tokenize_matches_drqa():
    assert simple_tokenize("The Denver-Broncos, 1998.") == ["the", "denver", "-", "broncos", ",", "1998", "."]
    assert simple_tokenize("Pele\u0301  U.S.") == ["pele\u0301", "u", ".", "s", "."]


def test_has_answer_string_and_regex():
    text = "Peyton Manning led the Denver Broncos to victory in the U.S. in 2016."
    assert has_answer(text, ["denver broncos"])
    assert has_answer(text, ["Seattle", "U.S."])
    assert not has_answer(text, ["Denver Bronco"])  # whole tokens only
    assert not has_answer("The Broncoses", ["Broncos"])
    # NFD on both sides: precomposed and decomposed accents agree; a missing accent does not match
    assert has_answer("Pel\u00e9 scored", ["Pele\u0301"])
    assert not has_answer("Pel\u00e9 scored", ["Pele"])
    # regex: searched anywhere in the block, case-insensitive
    assert has_answer("It rises 20,320 FEET above the plain", [MCKINLEY], match="regex")
    assert not has_answer("It rises 19,000 feet", [MCKINLEY], match="regex")
    with pytest.raises(ValueError, match="match must be"):
        has_answer(text, ["x"], match="fuzzy")


def test_recall_at_k_hand_computed(caplog):
    hits = [[False, True, False], [True], [False, False, False]]
    with caplog.at_level(logging.WARNING, logger="hf_realm.metrics"):
        out = recall_at_k(hits, ks=(1, 2, 3, 5))
    assert out == {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3}
    assert "left out" in caplog.text
    assert recall_at_k([[False] * 100, [True] + [False] * 99]) == {
        "recall@1": 0.5,
        "recall@5": 0.5,
        "recall@20": 0.5,
        "recall@100": 0.5,
    }
    with pytest.raises(ValueError):
        recall_at_k([], ks=(1,))
    with pytest.raises(ValueError):
        recall_at_k(hits, ks=(0,))


def test_gold_and_answer_hits():
    assert gold_block_hits(np.array([[4, 2, -1], [-1, 3, 5]]), [2, -1]) == [
        [False, True, False],
        [False, False, False],
    ]
    hits = answer_hits([["a Denver Broncos win", "x"], ["y", "z"]], [["broncos"], ["q"]])
    assert hits == [[True, False], [False, False]]
    assert recall_at_k(hits, ks=(1, 2)) == {"recall@1": 0.5, "recall@2": 0.5}
    with pytest.raises(ValueError, match="2 retrieved lists != 1"):
        gold_block_hits([[1], [2]], [1])


# ---------------------------------------------------------------------------------------------------------------------
# Masked LM


def test_masked_span_accuracy_hand_computed():
    labels = np.array([[-100, 5, 6, -100], [-100, 7, -100, -100], [-100, -100, -100, -100], [9, -100, -100, -100]])
    preds = np.array([[0, 5, 1, 0], [0, 7, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0]])
    # masked tokens: 5 right, 6 wrong, 7 right, 9 right -> 3/4; spans: row0 wrong, row1 right, row3 right -> 2/3
    assert masked_span_accuracy(preds, labels) == {"masked_token_accuracy": 0.75, "masked_span_accuracy": 2 / 3}
    from transformers import EvalPrediction

    logits = np.zeros(preds.shape + (10,))
    np.put_along_axis(logits, preds[..., None], 1.0, axis=-1)
    assert compute_masked_span_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {
        "masked_token_accuracy": 0.75,
        "masked_span_accuracy": 2 / 3,
    }
    with pytest.raises(ValueError, match="no masked position"):
        masked_span_accuracy(preds, np.full_like(labels, -100))


# ---------------------------------------------------------------------------------------------------------------------
# Trainer compute_metrics


def test_open_qa_compute_metrics():
    from transformers import EvalPrediction

    vocab = ["The Denver Broncos", "Paris", "1889", "20,320 feet"]
    answers = [["Denver Broncos"], ["Lyon", "Paris"], ["1890"]]
    compute = make_open_qa_compute_metrics(
        answers,
        lambda p: [vocab[i] for i in p.predictions],
        retrieved_ids=lambda p: p.label_ids,
        gold_block_ids=[3, 4, 5],
        retrieved_texts=lambda p: [["the broncos", "x"], ["in Paris"], ["1889 or 1890"]],
        ks=(1, 2),
    )
    out = compute(EvalPrediction(predictions=np.array([0, 1, 2]), label_ids=np.array([[3, 9], [9, 4], [1, 2]])))
    assert out == {
        "exact_match": 2 / 3,
        "f1": 2 / 3,
        "recall@1": 1 / 3,
        "recall@2": 2 / 3,
        "answer_recall@1": 2 / 3,
        "answer_recall@2": 2 / 3,
    }
    regex = make_open_qa_compute_metrics([[MCKINLEY], [JERUSALEM]], lambda p: [vocab[3], "about 2,550"], match="regex")
    assert regex(EvalPrediction(predictions=np.zeros(2), label_ids=np.zeros(2))) == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="3 predictions != 2"):
        make_open_qa_compute_metrics([["a"], ["b"]], lambda p: ["a", "b", "c"])(None)


# ---------------------------------------------------------------------------------------------------------------------
# Packaged evaluate modules


def test_evaluate_modules_match_plain_functions():
    em = load_metric("exact_match")
    predictions = ["The Broncos", "Paris", "the Denver Broncos team"]
    references = [["Denver Broncos", "broncos"], ["Lyon"], ["Denver Broncos"]]
    out = em.compute(predictions=predictions, references=references)
    assert out["exact_match"] == pytest.approx(1 / 3, abs=1e-12)
    # F1: 1 (broncos) + 0 + 0.8 (3 predicted tokens, 2 right)
    assert out["f1"] == pytest.approx(1.8 / 3, abs=1e-12)
    single = em.compute(predictions=["the Broncos", "Paris"], references=["Denver Broncos", "paris"])
    assert single == {"exact_match": 0.5, "f1": pytest.approx((2 / 3 + 1) / 2, abs=1e-12)}
    regex = em.compute(predictions=["20320 feet", "about 2,550"], references=[[MCKINLEY], [JERUSALEM]], match="regex")
    assert regex == {"exact_match": 0.5}

    recall = load_metric("retrieval_recall")
    assert recall.compute(predictions=[[4, 2, 7], [1, 3, 5]], references=[2, 9], ks=[1, 2]) == {
        "recall@1": 0.0,
        "recall@2": 0.5,
    }
    texts = recall.compute(
        predictions=[["a Denver Broncos", "x"], ["y", "z"]], references=[["broncos"], ["q"]], ks=[1]
    )
    assert texts == {"recall@1": 0.5}


def test_metric_path_and_offline_load(tmp_path):
    for name in ("exact_match", "retrieval_recall"):
        path = Path(metric_path(name))
        assert (path / f"{path.name}.py").is_file()
    with pytest.raises(ValueError, match="unknown packaged metric"):
        metric_path("bleu")
    code = (
        "from hf_realm.metrics import load_metric\n"
        "print(load_metric('exact_match').compute(predictions=['an Apple'], references=[['apple']])['exact_match'])\n"
        "print(load_metric('realm_retrieval_recall').compute(predictions=[[1, 2]], references=[2], ks=[1, 2]))\n"
    )
    env = subprocess_env(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["1.0", "{'recall@1': 0.0, 'recall@2': 1.0}"]
