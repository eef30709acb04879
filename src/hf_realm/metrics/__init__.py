"""Open-domain QA and REALM pretraining metrics: plain functions, packaged `evaluate` modules, `compute_metrics`.

- Answers: SQuAD's official :func:`normalize_answer`, :func:`exact_match` and :func:`f1_score`; DrQA's
  :func:`regex_match` for CuratedTREC, whose answers are regular expressions.
- Retrieval: DrQA's :func:`has_answer` (does a block contain an answer, token-wise after NFD normalisation, or by
  regex search) and :func:`recall_at_k` (k in 1, 5, 20, 100 by default).
- Pretraining: :func:`masked_span_accuracy` over the masked positions of REALM's one-span-per-example batches.

The same metrics ship as `evaluate` modules inside the package (``evaluate.load`` of Hub metrics cannot work
offline): :func:`load_metric` resolves ``"exact_match"`` or ``"retrieval_recall"`` to the packaged scripts.
:func:`make_open_qa_compute_metrics` and :func:`compute_masked_span_metrics` plug into `Trainer`.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import regex


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RECALL_KS",
    "METRICS_DIR",
    "PACKAGED_METRICS",
    "compute_masked_span_metrics",
    "exact_match",
    "f1_score",
    "gold_block_hits",
    "has_answer",
    "answer_hits",
    "load_metric",
    "make_open_qa_compute_metrics",
    "masked_span_accuracy",
    "metric_path",
    "normalize_answer",
    "recall_at_k",
    "regex_match",
    "simple_tokenize",
]

METRICS_DIR = Path(__file__).resolve().parent
PACKAGED_METRICS = {
    "exact_match": "realm_exact_match",
    "realm_exact_match": "realm_exact_match",
    "retrieval_recall": "realm_retrieval_recall",
    "realm_retrieval_recall": "realm_retrieval_recall",
}
DEFAULT_RECALL_KS = (1, 5, 20, 100)


# ---------------------------------------------------------------------------------------------------------------------
# Answer matching


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalisation: lower-case, drop punctuation, drop the articles a/an/the, squash spaces.

    Example:

    ```python
    >>> from hf_realm.metrics import normalize_answer
    >>> normalize_answer("The  Denver Broncos!")
    'denver broncos'
    ```
    """

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("the answer list is empty: every question needs at least one gold answer")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether ``prediction`` equals any of ``answers`` after :func:`normalize_answer` (SQuAD / ORQA EM)."""
    norm = normalize_answer(prediction)
    return any(norm == normalize_answer(a) for a in _as_list(answers))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1, max over ``answers``."""
    return max(_f1(prediction, a) for a in _as_list(answers))


_bad_patterns: set[str] = set()


def _compile(pattern: str):
    """Compile as DrQA does (IGNORECASE | UNICODE | MULTILINE); ``None`` (with a warning once) when invalid."""
    try:
        return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except re.error:
        if pattern not in _bad_patterns:
            _bad_patterns.add(pattern)
            logger.warning("regular expression failed to compile: %s", pattern)
        return None


def regex_match(prediction: str, patterns: str | Sequence[str], normalize: bool = False) -> bool:
    """DrQA's ``regex_match_score`` (CuratedTREC): whether any pattern matches ``prediction`` case-insensitively.

    As in DrQA (and ORQA), the match is anchored at the start of the prediction but not at its end
    (``re.match``): ``"China"`` matches the prediction ``"China's mainland"`` but not ``"the PRC, China"``. A pattern
    that does not compile counts as no match. With ``normalize=True`` the prediction is first put through
    :func:`normalize_answer` (DrQA does not: its patterns contain punctuation such as ``"6,194-meter"``).

    Example:

    ```python
    >>> from hf_realm.metrics import regex_match
    >>> regex_match("20,320 feet", r"20\\s?,?\\s?(32|40)0\\s?-?\\s?f(ee|oo)t|6,194-meter")
    True
    ```
    """
    if normalize:
        prediction = normalize_answer(prediction)
    for pattern in _as_list(patterns):
        compiled = _compile(pattern)
        if compiled is not None and compiled.match(prediction) is not None:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval

_SIMPLE_TOKEN_RE = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE)


def answer_metrics(
    predictions: Sequence[str], answers: Sequence[str | Sequence[str]], match: str = "string"
) -> dict[str, float]:
    """Mean exact match (and F1 for ``match="string"``; ``match="regex"``: DrQA pattern match) over paired lists."""
    pairs = list(zip(predictions, answers, strict=True))
    if match == "regex":
        return {"exact_match": float(np.mean([regex_match(p, a) for p, a in pairs]))}
    return {
        "exact_match": float(np.mean([exact_match(p, a) for p, a in pairs])),
        "f1": float(np.mean([f1_score(p, a) for p, a in pairs])),
    }


def simple_tokenize(text: str) -> list[str]:
    """DrQA's ``SimpleTokenizer``, uncased: runs of letters/digits/marks, and every other non-space character alone.

    Example:

    ```python
    >>> from hf_realm.metrics import simple_tokenize
    >>> simple_tokenize("The Denver-Broncos, 1998.")
    ['the', 'denver', '-', 'broncos', ',', '1998', '.']
    ```
    """
    return [m.group().lower() for m in _SIMPLE_TOKEN_RE.finditer(text)]


def has_answer(text: str, answers: str | Sequence[str], match: str = "string") -> bool:
    """DrQA's retrieval check: does ``text`` (a retrieved block) contain an answer?

    Args:
        text (`str`): The block text (title included if you want titles to count).
        answers (`str` or `Sequence[str]`): Gold answers (``match="string"``) or regular expressions
            (``match="regex"``).
        match (`str`, *optional*, defaults to `"string"`):
            ``"string"``: after Unicode NFD, the uncased :func:`simple_tokenize` tokens of some answer occur as a
            contiguous run in the block's tokens (so ``"Broncos"`` is not found inside ``"Broncoses"``).
            ``"regex"``: some pattern is found anywhere in the NFD-normalised block (``re.search``, case-insensitive).
            DrQA uses only the first pattern; CuratedTREC has one per question, so this is the same there.

    Example:

    ```python
    >>> from hf_realm.metrics import has_answer
    >>> has_answer("Peyton Manning led the Denver Broncos to victory.", ["denver broncos"])
    True
    >>> has_answer("The Broncoses", ["Broncos"])
    False
    ```
    """
    if match not in ("string", "regex"):
        raise ValueError(f"match must be 'string' or 'regex', got {match!r}")
    text = unicodedata.normalize("NFD", text)
    if match == "regex":
        for pattern in _as_list(answers):
            compiled = _compile(unicodedata.normalize("NFD", pattern))
            if compiled is not None and compiled.search(text) is not None:
                return True
        return False
    tokens = simple_tokenize(text)
    for answer in _as_list(answers):
        answer_tokens = simple_tokenize(unicodedata.normalize("NFD", answer))
        if not answer_tokens:
            continue
        n = len(answer_tokens)
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n] == answer_tokens:
                return True
    return False


def answer_hits(
    retrieved_texts: Sequence[Sequence[str]], answers: Sequence[str | Sequence[str]], match: str = "string"
) -> list[list[bool]]:
    """``hits[i][j]``: whether the ``j``-th block retrieved for question ``i`` contains one of its answers."""
    if len(retrieved_texts) != len(answers):
        raise ValueError(f"{len(retrieved_texts)} retrieved lists != {len(answers)} answer lists")
    return [[has_answer(t, a, match) for t in texts] for texts, a in zip(retrieved_texts, answers, strict=True)]


def gold_block_hits(retrieved_ids: Sequence[Sequence[int]] | np.ndarray, gold_ids: Sequence[int]) -> list[list[bool]]:
    """``hits[i][j]``: whether the ``j``-th block retrieved for query ``i`` is its gold block. Negative retrieved ids
    (padding, the null document) never hit."""
    retrieved_ids = [list(map(int, r)) for r in retrieved_ids]
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieved lists != {len(gold_ids)} gold ids")
    return [[r == int(g) and r >= 0 for r in row] for row, g in zip(retrieved_ids, gold_ids, strict=True)]


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Iterable[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """Top-k retrieval recall: the fraction of queries with a hit among their first ``k`` retrieved blocks.

    Args:
        hits (`Sequence[Sequence[bool]]`): Per query, per retrieved block in rank order, whether it is relevant
            (from :func:`answer_hits` or :func:`gold_block_hits`).
        ks (`Iterable[int]`, *optional*, defaults to `(1, 5, 20, 100)`):
            Cut-offs. A ``k`` larger than every query's retrieved list is left out of the result (with a warning)
            rather than reported as if that many had been retrieved; a query with fewer than ``k`` blocks counts the
            blocks it has.

    Returns:
        `dict[str, float]`: ``{"recall@1": ..., "recall@5": ...}``.

    Example:

    ```python
    >>> from hf_realm.metrics import recall_at_k
    >>> recall_at_k([[False, True], [True, False], [False, False]], ks=(1, 2))
    {'recall@1': 0.3333333333333333, 'recall@2': 0.6666666666666666}
    ```
    """
    hits = [list(map(bool, h)) for h in hits]
    if not hits:
        raise ValueError("no queries to compute recall over")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    longest = max(len(h) for h in hits)
    skipped = [k for k in ks if k > longest]
    if skipped:
        logger.warning("recall@k for k=%s left out: at most %d blocks were retrieved per query", skipped, longest)
    first_hit = np.array([h.index(True) if True in h else np.inf for h in hits])
    return {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks if k <= longest}


# ---------------------------------------------------------------------------------------------------------------------
# Masked LM


def masked_span_accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy over masked positions (``labels != -100``).

    Returns ``masked_token_accuracy`` (over masked wordpieces) and ``masked_span_accuracy`` (over examples that
    have a masked position: all of its masked wordpieces right; with one span per example this is span accuracy).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.metrics import masked_span_accuracy
    >>> labels = np.array([[-100, 5, 6], [-100, 7, -100]])
    >>> masked_span_accuracy(np.array([[0, 5, 1], [0, 7, 0]]), labels)
    {'masked_token_accuracy': 0.6666666666666666, 'masked_span_accuracy': 0.5}
    ```
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} != labels shape {labels.shape}")
    masked = labels != -100
    if not masked.any():
        raise ValueError("no masked position (every label is -100)")
    correct = (predictions == labels) & masked
    rows = masked.reshape(masked.shape[0], -1).any(axis=1)
    wrong_in_row = (masked & ~correct).reshape(masked.shape[0], -1).any(axis=1)
    return {
        "masked_token_accuracy": float(correct.sum() / masked.sum()),
        "masked_span_accuracy": float((rows & ~wrong_in_row).sum() / rows.sum()),
    }


def compute_masked_span_metrics(eval_pred) -> dict[str, float]:
    """`Trainer` ``compute_metrics`` for masked LM: ``eval_pred.predictions`` are predicted token ids (use
    ``preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1)``; if a tuple, its first element) and
    ``eval_pred.label_ids`` the collator's labels."""
    predictions = eval_pred.predictions
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    if predictions.ndim == np.asarray(eval_pred.label_ids).ndim + 1:
        predictions = predictions.argmax(-1)
    return masked_span_accuracy(predictions, eval_pred.label_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Open QA in Trainer


def make_open_qa_compute_metrics(
    answers: Sequence[Sequence[str]],
    decode_predictions: Callable[[Any], Sequence[str]],
    *,
    match: str = "string",
    retrieved_ids: Callable[[Any], Sequence[Sequence[int]]] | None = None,
    gold_block_ids: Sequence[int] | None = None,
    retrieved_texts: Callable[[Any], Sequence[Sequence[str]]] | None = None,
    ks: Iterable[int] = DEFAULT_RECALL_KS,
) -> Callable[[Any], dict[str, float]]:
    """Build a `Trainer` ``compute_metrics`` for open-domain QA.

    `Trainer` evaluates the eval dataset in order, so the gold answers are given here, in dataset order, and the
    model's outputs are turned into answer strings by ``decode_predictions``.

    Args:
        answers (`Sequence[Sequence[str]]`): Gold answers (or CuratedTREC patterns) per eval example, in order.
        decode_predictions (`Callable[[EvalPrediction], Sequence[str]]`): Predicted answer strings, one per example.
        match (`str`, *optional*, defaults to `"string"`): ``"string"`` (SQuAD EM and F1) or ``"regex"`` (DrQA regex
            match, reported as ``exact_match``).
        retrieved_ids (`Callable[[EvalPrediction], array]`, *optional*): Ranked retrieved block ids per example;
            with ``gold_block_ids``, adds gold-block ``recall@k``.
        gold_block_ids (`Sequence[int]`, *optional*): Gold block per example.
        retrieved_texts (`Callable[[EvalPrediction], Sequence[Sequence[str]]]`, *optional*): Ranked retrieved
            block texts per example; adds answer ``recall@k`` (:func:`has_answer`), as ``answer_recall@k``.
        ks (`Iterable[int]`, *optional*, defaults to `(1, 5, 20, 100)`): Recall cut-offs.

    Example:

    ```python
    >>> import numpy as np
    >>> from transformers import EvalPrediction
    >>> from hf_realm.metrics import make_open_qa_compute_metrics
    >>> vocab = ["Paris", "the Louvre", "1889"]
    >>> compute_metrics = make_open_qa_compute_metrics(
    ...     [["Paris"], ["Louvre"]], lambda p: [vocab[i] for i in p.predictions],
    ...     retrieved_ids=lambda p: p.label_ids, gold_block_ids=[3, 4], ks=(1, 2))
    >>> compute_metrics(EvalPrediction(predictions=np.array([0, 1]), label_ids=np.array([[3, 9], [9, 4]])))
    {'exact_match': 1.0, 'f1': 1.0, 'recall@1': 0.5, 'recall@2': 1.0}
    ```
    """
    if match not in ("string", "regex"):
        raise ValueError(f"match must be 'string' or 'regex', got {match!r}")
    answers = [_as_list(a) for a in answers]
    if retrieved_ids is not None and (gold_block_ids is None or len(gold_block_ids) != len(answers)):
        raise ValueError("retrieved_ids needs gold_block_ids, one per eval example")
    ks = tuple(ks)

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = list(decode_predictions(eval_pred))
        if len(predictions) != len(answers):
            raise ValueError(f"{len(predictions)} predictions != {len(answers)} gold answer lists")
        result = answer_metrics(predictions, answers, match)
        if retrieved_ids is not None:
            result.update(recall_at_k(gold_block_hits(retrieved_ids(eval_pred), gold_block_ids), ks))
        if retrieved_texts is not None:
            recall = recall_at_k(answer_hits(retrieved_texts(eval_pred), answers, match), ks)
            result.update({f"answer_{k}": v for k, v in recall.items()})
        return result

    return compute_metrics


# ---------------------------------------------------------------------------------------------------------------------
# Packaged evaluate modules


def metric_path(name: str) -> str:
    """Directory of a packaged `evaluate` module: ``"exact_match"`` / ``"realm_exact_match"`` or
    ``"retrieval_recall"`` / ``"realm_retrieval_recall"``."""
    if name not in PACKAGED_METRICS:
        raise ValueError(f"unknown packaged metric {name!r}; available: {sorted(PACKAGED_METRICS)}")
    path = METRICS_DIR / PACKAGED_METRICS[name]
    script = path / f"{path.name}.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"packaged metric script {script} is missing: the package data must include 'metrics/*/*.py'"
        )
    return str(path)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a metric shipped in this package; works offline (``HF_HUB_OFFLINE=1``).

    Example:

    ```python
    >>> from hf_realm.metrics import load_metric
    >>> em = load_metric("exact_match")
    >>> em.compute(predictions=["the Denver Broncos"], references=[["Denver Broncos", "Broncos"]])["exact_match"]
    1.0
    ```
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
