"""The open-domain QA recipe around `RealmForOpenQA`: batches of (question, answers) and evaluation (EM, recall@k)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .checks import check_tokenizer_fits
from .metrics import answer_hits, answer_metrics, gold_block_hits, recall_at_k


logger = logging.get_logger(__name__)


@dataclass
class DataCollatorForOpenQA:
    r"""
    Batches of open-QA examples for [`RealmForOpenQA`]: tokenized questions (padded) and, per question, the token ids
    of its answers (`answer_ids`, a list of lists: the reader looks for these spans in the retrieved blocks).

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): The model's tokenizer.
        max_question_length (`int`, *optional*, defaults to 64):
            Questions are truncated to this many tokens (special tokens included): the reader reads question and
            block together in `reader_seq_len` tokens.
        with_answers (`bool`, *optional*, defaults to `True`): Include `answer_ids` (training); `False` for inference.
        question_column (`str`, *optional*, defaults to `"question"`) and answers_column (`str`, *optional*,
            defaults to `"answers"`): Column names.

    Example:

    ```python
    >>> from hf_realm import RealmTokenizer
    >>> from hf_realm.openqa import DataCollatorForOpenQA
    >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "wrote", "hamlet", "?", "shakespeare"]
    >>> tokenizer = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    >>> batch = DataCollatorForOpenQA(tokenizer)([{"question": "who wrote hamlet?", "answers": ["Shakespeare"]}])
    >>> batch["input_ids"].tolist(), batch["answer_ids"]
    ([[2, 5, 6, 7, 8, 3]], [[[9]]])
    ```
    """

    tokenizer: Any
    max_question_length: int = 64
    with_answers: bool = True
    question_column: str = "question"
    answers_column: str = "answers"

    def __call__(self, examples: Sequence[dict]) -> dict:
        questions = [e[self.question_column] for e in examples]
        batch = dict(
            self.tokenizer(
                questions, padding=True, truncation=True, max_length=self.max_question_length, return_tensors="pt"
            )
        )
        if self.with_answers:
            answer_ids = []
            for i, example in enumerate(examples):
                answers = example.get(self.answers_column)
                if isinstance(answers, str):
                    answers = [answers]
                if not answers:
                    raise ValueError(f"example {i} ({questions[i]!r}) has an empty answer list")
                ids = [a for a in self.tokenizer(list(answers), add_special_tokens=False).input_ids if a]
                if not ids:
                    raise ValueError(f"example {i}: no answer of {answers!r} has any token")
                answer_ids.append(ids)
            batch["answer_ids"] = answer_ids
        return batch


def _block_texts(model, block_ids: np.ndarray) -> list[list[str]]:
    records = model.retriever.block_records
    return [[_text(records[i]) for i in row] for row in block_ids]


def _text(record) -> str:
    return record.decode() if isinstance(record, bytes) else str(record)


@torch.no_grad()
def evaluate_open_qa(
    model,
    dataset,
    tokenizer,
    *,
    batch_size: int = 16,
    match: str = "string",
    recall_ks: Sequence[int] = (1, 5, 20, 100),
    max_question_length: int = 64,
    question_column: str = "question",
    answers_column: str = "answers",
    closed_book: bool = False,
    show_progress: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    r"""
    Evaluate a [`RealmForOpenQA`] on (question, answers) data: exact match after SQuAD normalisation (or DrQA regex
    match for CuratedTREC-style answer patterns), F1, and the retriever's top-k recall (a retrieved block holds an
    answer: `answer_recall@k`; the gold block is retrieved, when the data has `gold_block_id`: `recall@k`).

    Args:
        model ([`RealmForOpenQA`]): With its retriever (and index).
        dataset: Rows with `question` and `answers` (a list of strings or regular expressions).
        tokenizer: The model's tokenizer.
        match (`str`, *optional*, defaults to `"string"`): `"string"` or `"regex"`.
        recall_ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 20, 100)`): Recall cut-offs (capped at the
            number of blocks).
        closed_book (`bool`, *optional*, defaults to `False`):
            Read the null document instead of the retrieved blocks (the reader sees the question alone): the
            closed-book baseline of the same reader.

    Returns:
        `(metrics, predictions)`: the metrics dict and one `{"question", "prediction", "answers", "retrieved"}` per
        example.
    """
    from tqdm.auto import tqdm

    from .retrieval_realm import RealmRetriever

    if match not in ("string", "regex"):
        raise ValueError(f"match must be 'string' or 'regex', got {match!r}")
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    if model.retriever is None:
        raise ValueError("the model has no retriever (block texts + tokenizer) to read blocks with")
    check_tokenizer_fits(tokenizer, model, "the question tokenizer")
    check_tokenizer_fits(model.retriever.tokenizer, model, "the retriever's tokenizer")
    num_blocks = model.index.num_blocks if model.index is not None else model.block_emb.shape[0]
    recall_ks = sorted({k for k in recall_ks if k <= num_blocks})
    max_k = max(recall_ks) if recall_ks else 1
    retriever = model.retriever
    if closed_book:
        # The null document: no evidence, only [MASK] placeholders so the reader has span slots to score. An
        # extractive reader can then only answer with what it finds there (nothing), so closed-book EM is ~0.
        null = " ".join([retriever.tokenizer.mask_token] * model.config.max_span_width).encode()
        model.retriever = RealmRetriever(np.array([null] * num_blocks, dtype=object), retriever.tokenizer)
    collator = DataCollatorForOpenQA(
        tokenizer, max_question_length, with_answers=False, question_column=question_column
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions, answers_all, retrieved_all, gold_all = [], [], [], []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), disable=not show_progress, desc="Open QA"):
            rows = dataset[start : start + batch_size]
            examples = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
            batch = {k: v.to(device) for k, v in collator(examples).items()}
            out = model(**batch)
            answer_ids = out.predicted_answer_ids
            if isinstance(answer_ids, torch.Tensor):
                answer_ids = [answer_ids]
            spans = getattr(out, "predicted_answer_spans", None) or [None] * len(answer_ids)
            for ids, span in zip(answer_ids, spans, strict=True):
                # the answer as its block has it; the decoded ids where that cannot be read (or with no blocks)
                text = None
                if span is not None and not closed_book:
                    text = model.retriever.span_text(*span, expected_ids=ids.tolist())
                predictions.append(text if text is not None else tokenizer.decode(ids, skip_special_tokens=True))
            query = model.embedder(**batch, return_dict=True).projected_score
            ids, _ = model.search_blocks(query, k=max_k)
            retrieved_all.extend(ids.cpu().numpy().tolist())
            answers_all.extend(list(e[answers_column]) for e in examples)
            if "gold_block_id" in examples[0]:
                gold_all.extend(e["gold_block_id"] for e in examples)
    finally:
        model.retriever = retriever
        model.train(was_training)

    metrics = answer_metrics(predictions, answers_all, match)
    if recall_ks:
        texts = _block_texts(model, np.asarray(retrieved_all))
        hits = answer_hits(texts, answers_all, "regex" if match == "regex" else "string")
        metrics.update({f"answer_{k}": v for k, v in recall_at_k(hits, recall_ks).items()})
        if gold_all:
            metrics.update(recall_at_k(gold_block_hits(retrieved_all, gold_all), recall_ks))
    metrics["num_examples"] = len(predictions)
    records = [
        {"question": e_q, "prediction": p, "answers": a, "retrieved": r[:5]}
        for e_q, p, a, r in zip(dataset[question_column], predictions, answers_all, retrieved_all, strict=True)
    ]
    return metrics, records


class OpenQAEvalCallback(TrainerCallback):
    r"""
    Evaluates open-QA exact match and recall on held-out questions before training (step 0: the retriever as it starts
    fine-tuning), every `eval_steps` optimizer steps and at the end of training, on the main process, so a run shows
    where its retriever started and whether it has converged. Each result is logged (`dev_*` keys) and kept in
    `history`.

    Args:
        dataset: Rows with `question` and `answers` (and optionally `gold_block_id`), as [`evaluate_open_qa`] reads.
        tokenizer: The model's tokenizer.
        eval_steps (`int`): Evaluate every this many steps (0: only at the start and the end).
        at_start (`bool`, *optional*, defaults to `True`): Evaluate before the first step.
        kwargs: Passed to [`evaluate_open_qa`] (`batch_size`, `match`, `recall_ks`, `max_question_length`).

    Example:

    ```python
    >>> import datasets
    >>> from hf_realm.openqa import OpenQAEvalCallback
    >>> dev = datasets.Dataset.from_list([{"question": "who wrote hamlet ?", "answers": ["shakespeare"]}])
    >>> callback = OpenQAEvalCallback(dev, tokenizer=None, eval_steps=100, batch_size=32)
    >>> callback.eval_steps, callback.history
    (100, [])
    ```
    """

    def __init__(self, dataset, tokenizer, eval_steps: int, at_start: bool = True, **kwargs):
        if eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {eval_steps}")
        self.dataset, self.tokenizer, self.eval_steps, self.kwargs = dataset, tokenizer, eval_steps, kwargs
        self.at_start = at_start
        self.history: list[dict] = []

    def _evaluate(self, args, state, model):
        if not state.is_world_process_zero or (self.history and self.history[-1]["step"] == state.global_step):
            return
        from transformers.modeling_utils import unwrap_model
        from transformers.trainer_utils import unwrap_peft_model

        base = unwrap_peft_model(unwrap_model(model))
        metrics, _ = evaluate_open_qa(base, self.dataset, self.tokenizer, **self.kwargs)
        record = {"step": state.global_step, "epoch": state.epoch, **metrics}
        self.history.append(record)
        logger.info(f"held-out open QA at step {state.global_step}: " + json.dumps(record))
        state.log_history.append({f"dev_{k}": v for k, v in record.items() if k not in ("step", "epoch")})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start:
            self._evaluate(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._evaluate(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._evaluate(args, state, model)


__all__ = ["DataCollatorForOpenQA", "OpenQAEvalCallback", "evaluate_open_qa"]
