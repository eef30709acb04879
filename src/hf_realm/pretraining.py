"""The REALM pretraining recipe around the models: ICT examples, the two learning rates, held-out evaluation."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .checks import check_tokenizer_fits
from .masking import split_sentences
from .metrics import gold_block_hits, masked_span_accuracy, recall_at_k


logger = logging.getLogger(__name__)


@dataclass
class DataCollatorForInverseClozeTask:
    r"""
    Inverse Cloze Task batches (ORQA), the warm start of REALM's retriever: from each block one sentence becomes the
    query and the rest of the block (its title and the other sentences) the positive context; the other blocks of the
    batch are the negatives. The query sentence stays in its context with probability `1 - remove_probability` (ORQA
    keeps it 10% of the time, so the retriever also learns word overlap).

    Examples are corpus rows with `text` (and optionally `title`).

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): A BERT-style tokenizer.
        remove_probability (`float`, *optional*, defaults to 0.9): Chance of removing the query from its context.
        query_max_length (`int`, *optional*, defaults to 64): Query truncation (special tokens included).
        block_max_length (`int`, *optional*, defaults to 288): Context truncation (special tokens included).
        seed (`int`, *optional*): Seed of the collator's own random generator (sentence choice, removal).

    Example:

    ```python
    >>> from transformers import BertTokenizer
    >>> from hf_realm.pretraining import DataCollatorForInverseClozeTask
    >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ada", "was", "born", "in", "rome", "a", "poet", "."]
    >>> tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    >>> collator = DataCollatorForInverseClozeTask(tokenizer, remove_probability=1.0, seed=0)
    >>> batch = collator([{"title": "ada", "text": "ada was born in rome. ada was a poet."}])
    >>> tokenizer.decode(batch["query_input_ids"][0]), tokenizer.decode(batch["block_input_ids"][0])
    ('[CLS] ada was a poet. [SEP]', '[CLS] ada [SEP] ada was born in rome. [SEP]')
    ```
    """

    tokenizer: Any
    remove_probability: float = 0.9
    query_max_length: int = 64
    block_max_length: int = 288
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.remove_probability <= 1.0:
            raise ValueError(f"remove_probability must be in [0, 1], got {self.remove_probability}")
        self._rng = random.Random(self.seed)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        queries, titles, contexts = [], [], []
        for example in examples:
            if "text" not in example:
                raise ValueError(f"ICT examples need a `text` column, got {sorted(example)}")
            sentences = split_sentences(example["text"])
            if not sentences:
                raise ValueError(f"a block has no sentence to make a query from: {example['text']!r}")
            i = self._rng.randrange(len(sentences))
            queries.append(sentences[i])
            if self._rng.random() < self.remove_probability:
                sentences = sentences[:i] + sentences[i + 1 :]
            titles.append(example.get("title") or "")
            contexts.append(" ".join(sentences))
        query = self.tokenizer(
            queries, padding=True, truncation=True, max_length=self.query_max_length, return_tensors="pt"
        )
        has_title = any(titles)
        block = self.tokenizer(
            titles if has_title else contexts,
            contexts if has_title else None,
            padding=True,
            truncation="only_second" if has_title else True,
            max_length=self.block_max_length,
            return_tensors="pt",
        )
        batch = {f"query_{k}": v for k, v in query.items()}
        batch.update({f"block_{k}": v for k, v in block.items()})
        return batch


def grouped_order(groups: Sequence, num_examples: int, seed: int = 0) -> list[int]:
    """Row order that keeps each group's rows together, so a batch cut from it holds whole groups.

    Each pass over the rows shuffles the groups and the rows inside each group (a fresh shuffle per pass, from
    `seed`), and passes are repeated until the order holds `num_examples` rows. Cut into consecutive batches, it
    gives ICT hard in-batch negatives: the other blocks of the same document.

    Args:
        groups (`Sequence`): One hashable group key per row (e.g. each block's `doc_id` or `title`).
        num_examples (`int`): Rows the order must hold at least (steps x batch size x processes).
        seed (`int`, *optional*, defaults to 0): Seed of the shuffles.

    Returns:
        `list[int]`: Row indices; every pass is a permutation of `range(len(groups))`.

    Example:

    ```python
    >>> from hf_realm import grouped_order
    >>> order = grouped_order(["a", "b", "a", "c", "b", "a"], num_examples=6, seed=0)
    >>> sorted(order)
    [0, 1, 2, 3, 4, 5]
    >>> [["a", "b", "a", "c", "b", "a"][i] for i in order]
    ['a', 'a', 'a', 'c', 'b', 'b']
    ```
    """
    if len(groups) == 0:
        raise ValueError("grouped_order: no rows to order")
    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    rng = random.Random(seed)
    keys = list(members)
    order: list[int] = []
    while len(order) < num_examples:
        rng.shuffle(keys)
        for key in keys:
            rows = members[key][:]
            rng.shuffle(rows)
            order.extend(rows)
    return order


def train_inverse_cloze_task(
    model, corpus, tokenizer, training_args, *, query_max_length: int = 64, group_by: str | None = None, callbacks=None
):
    """Warm-start a retriever with the Inverse Cloze Task in `Trainer`.

    Args:
        model ([`RealmForInverseClozeTask`]): The retriever to train (its `embedder` is what REALM starts from).
        corpus (`datasets.Dataset`): Blocks with `text` (and `title`).
        tokenizer: BERT-style tokenizer.
        training_args ([`~transformers.TrainingArguments`]): Steps, batch size (the in-batch negatives), learning
            rate. ICT at lr 1e-3 sits on a plateau (loss ~ log batch) for a few hundred steps, then drops.
        query_max_length (`int`, *optional*, defaults to 64): Query truncation (special tokens included).
        group_by (`str`, *optional*): A corpus column (e.g. `doc_id` or `title`). Given, batches are cut from
            [`grouped_order`] instead of a random order, so a block's in-batch negatives are mostly the other blocks
            of its own document: hard negatives, for a retriever that must tell a document's passages apart. Needs
            `max_steps`.

    Returns:
        The `Trainer`'s `TrainOutput`.
    """
    from transformers import Trainer

    check_tokenizer_fits(tokenizer, model)
    columns = [c for c in ("text", "title") if c in corpus.column_names]
    trainer_class = Trainer
    dataset = corpus.select_columns(columns)
    if group_by is not None:
        if group_by not in corpus.column_names:
            raise ValueError(f"group_by: expected a corpus column, got {group_by!r} (columns: {corpus.column_names})")
        if training_args.max_steps is None or training_args.max_steps <= 0:
            raise ValueError(f"group_by needs training_args.max_steps > 0, got {training_args.max_steps}")
        rows = training_args.max_steps * training_args.train_batch_size * training_args.world_size
        rows *= training_args.gradient_accumulation_steps
        dataset = dataset.select(grouped_order(corpus[group_by], rows, seed=training_args.seed))
        trainer_class = _in_order_trainer()
    collator = DataCollatorForInverseClozeTask(
        tokenizer,
        query_max_length=query_max_length,
        block_max_length=model.config.max_position_embeddings,
        seed=training_args.seed,
    )
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    return trainer.train()


def _in_order_trainer():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        """A `Trainer` that reads its training set in the given order (batches were laid out by the caller)."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

    return InOrderTrainer


class _OwnBlockReader(torch.nn.Module):
    """Trainer-facing wrapper: the reader's MLM loss with each sentence's own block as its only document."""

    accepts_loss_kwargs = False  # a mean already: no rescaling by `num_items_in_batch`

    def __init__(self, model):
        super().__init__()
        # only the reader is a submodule: what Trainer optimises and DDP synchronises (the embedders get no gradient)
        self.encoder = model.encoder
        self._model = (model,)

    def forward(self, input_ids, attention_mask, labels, source_block_id, **unused):
        from transformers.utils import ModelOutput

        return ModelOutput(loss=self._model[0].reader_mlm_loss(input_ids, attention_mask, labels, source_block_id))


def train_reader_warm_start(model, corpus, tokenizer, training_args, *, max_length: int = 64, callbacks=None):
    r"""Warm-start REALM's reader (the knowledge-augmented encoder) by reading sentences out of their own block.

    A reader trained from scratch inside REALM first has to discover that the answer to a masked span sits in the
    retrieved block at all: it learns to copy only after a plateau whose length varies a lot from seed to seed (on
    the generated world, 250 to 700+ of the first 1,200 steps), and the retriever, whose gradient is noise while the
    reader cannot read, waits for it. This phase teaches the copying first, on the corpus alone: every corpus
    sentence, with a salient span masked, is read together with the block it came from (the span is in it, word for
    word), and the reader alone is trained on the MLM loss (no retrieval, no null document). REALM training then
    starts with a reader that reads. Nothing but the corpus is used, so it works on any corpus; REALM's own training
    still drops a sentence's own block from its candidates.

    Args:
        model ([`RealmForMaskedLM`]): With its `index` (the blocks' tokens are read from it). Only `model.encoder`
            is trained.
        corpus (`datasets.Dataset`): The knowledge corpus of `model.index` ([`build_corpus`]), or its first blocks
            (e.g. without filler blocks appended after them): their `block_id`s are read from the index.
        tokenizer: The corpus's tokenizer.
        training_args ([`~transformers.TrainingArguments`]): Steps, batch size, learning rate.
        max_length (`int`, *optional*, defaults to 64): Query truncation (special tokens included).

    Returns:
        The `Trainer`'s `TrainOutput`.

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import TrainingArguments
    >>> from hf_realm import (KnowledgeWorld, RealmBlockIndex, RealmConfig, RealmForMaskedLM, build_corpus,
    ...                       train_reader_warm_start)
    >>> world = KnowledgeWorld(num_entities=20, seed=0)
    >>> tokenizer = world.tokenizer(model_max_length=64)
    >>> corpus = build_corpus(world.corpus(), tokenizer, block_seq_len=64)
    >>> config = RealmConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16, max_position_embeddings=64)
    >>> model = RealmForMaskedLM(config)
    >>> model.index = RealmBlockIndex.build(corpus, model.embedder, embed_kwargs={"show_progress": False})
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, report_to=[],
    ...                          remove_unused_columns=False, use_cpu=True, save_strategy="no")
    >>> result = train_reader_warm_start(model, corpus, tokenizer, args, max_length=32)  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> result.global_step
    2
    ```
    """
    from transformers import Trainer

    from .data_collator import DataCollatorForSalientSpanMasking
    from .pretraining_data import build_pretraining_examples

    if getattr(model, "index", None) is None:
        raise ValueError("train_reader_warm_start reads blocks from the model's index: set `model.index` first")
    if len(corpus) > model.index.num_blocks:
        raise ValueError(
            f"the corpus has {len(corpus)} blocks, more than the model's index ({model.index.num_blocks})"
        )
    check_tokenizer_fits(tokenizer, model)
    if training_args.save_strategy != "no":
        # the wrapper Trainer sees is no PreTrainedModel (its tied weights would stop a plain safetensors save): the
        # trained reader is `model.encoder`, saved with the model
        logger.warning("train_reader_warm_start keeps no checkpoints: training with save_strategy='no'")
        training_args = dataclasses.replace(training_args, save_strategy="no")
    examples = build_pretraining_examples(corpus, None, tokenizer=tokenizer, max_length=max_length)
    collator = DataCollatorForSalientSpanMasking(
        tokenizer, strategy="salient", max_length=max_length, seed=training_args.seed
    )
    trainer = Trainer(
        model=_OwnBlockReader(model),
        args=training_args,
        train_dataset=examples,
        data_collator=collator,
        callbacks=callbacks,
    )
    return trainer.train()


def optimizer_grouped_parameters(
    model: torch.nn.Module, learning_rate: float, retriever_learning_rate: float | None, weight_decay: float = 0.0
) -> list[dict]:
    """AdamW parameter groups with a separate learning rate for the retriever (the embedders).

    REALM's early gradients come from a reader that cannot read yet; at the reader's learning rate they wreck a warm
    ICT retriever (recall 0.73 -> 0.09 at 1e-3 on the generated world; kept at 1e-4). Biases and LayerNorm weights get
    no decay. Each group carries `"retriever": True/False`, which [`realm_lr_scheduler`] reads.
    """
    retriever_learning_rate = learning_rate if retriever_learning_rate is None else retriever_learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # a tower's parameters, at the top or inside a wrapper (peft's `base_model.model.`)
        is_retriever = any(f".{tower}." in f".{name}" for tower in ("embedder", "query_embedder", "doc_embedder"))
        no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((is_retriever, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": retriever_learning_rate if is_retriever else learning_rate,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "retriever": is_retriever,
        }
        for (is_retriever, no_decay), params in groups.items()
    ]


def realm_lr_scheduler(optimizer, num_warmup_steps: int = 0, retriever_delay_steps: int = 0):
    r"""
    REALM's learning-rate schedule: constant after a linear warmup, with the retriever held still at first.

    - Reader groups warm up linearly over `num_warmup_steps`, then stay at their learning rate. A reader trained from
      scratch learns to copy from the retrieved block in a sudden transition after a few hundred steps; a schedule
      that decays over a short run spends its learning rate before the transition, and the reader never reads.
    - Retriever groups (`"retriever": True` from [`optimizer_grouped_parameters`]) stay at 0 for
      `retriever_delay_steps`, then warm up the same way. Until the reader reads, `p(y|z, x)` says nothing about which
      block is right, so the retriever's gradient is noise that Adam turns into full-size steps, and a warm ICT
      retriever loses recall.

    Args:
        optimizer (`torch.optim.Optimizer`): With the groups of [`optimizer_grouped_parameters`].
        num_warmup_steps (`int`, *optional*, defaults to 0): Linear warmup steps.
        retriever_delay_steps (`int`, *optional*, defaults to 0): Steps before the retriever starts to move.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.pretraining import realm_lr_scheduler
    >>> reader, retriever = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    >>> optimizer = torch.optim.AdamW([{"params": [reader], "lr": 1e-3, "retriever": False},
    ...                                {"params": [retriever], "lr": 1e-4, "retriever": True}])
    >>> scheduler = realm_lr_scheduler(optimizer, num_warmup_steps=2, retriever_delay_steps=3)
    >>> lrs = []
    >>> for _ in range(6):
    ...     lrs.append([round(g["lr"], 6) for g in optimizer.param_groups])
    ...     optimizer.step(); scheduler.step()
    >>> lrs
    [[0.0005, 0.0], [0.001, 0.0], [0.001, 0.0], [0.001, 5e-05], [0.001, 0.0001], [0.001, 0.0001]]
    ```
    """
    if num_warmup_steps < 0 or retriever_delay_steps < 0:
        raise ValueError(
            f"num_warmup_steps and retriever_delay_steps must be >= 0, got {num_warmup_steps}, {retriever_delay_steps}"
        )

    def ramp(start: int):
        return lambda step: 0.0 if step < start else min(1.0, (step - start + 1) / max(1, num_warmup_steps))

    lambdas = [ramp(retriever_delay_steps if g.get("retriever") else 0) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@torch.no_grad()
def evaluate_masked_lm(
    model,
    dataset,
    data_collator,
    batch_size: int = 64,
    recall_ks: Sequence[int] | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    r"""
    Held-out evaluation of a [`RealmForMaskedLM`]:

    - `masked_span_accuracy` / `masked_token_accuracy` with retrieval (the marginal prediction) and
      `closed_book_span_accuracy` / `closed_book_token_accuracy` with the null document alone;
    - `retrieval_utility`: mean over masked tokens of `log p(y|x) - log p(y|null, x)` (REALM's "retrieval utility");
    - `log_prob` and `closed_book_log_prob`: the mean log-probabilities themselves;
    - `recall@k`: whether the gold block is among the index's top k for the query, when examples carry
      `gold_block_id`;
    - `answer_recall@k`: whether one of the top k blocks holds the masked wordpieces (in a row), which needs no
      gold block: the signal on your own data (inflated where the answer is a common word).

    Examples carrying `source_block_id` (sentences taken from the corpus) have their own block dropped from the
    candidates and from the top k, as in training.

    Args:
        model ([`RealmForMaskedLM`]): With its index.
        dataset: Examples for `data_collator` (e.g. the generated world's held-out pretraining sentences).
        data_collator: Builds `input_ids`, `attention_mask`, `labels` (and passes `gold_block_id` through).
        batch_size (`int`, *optional*, defaults to 64): Evaluation batch size.
        recall_ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 8)`): Recall cut-offs.
    """
    from tqdm.auto import tqdm

    check_tokenizer_fits(getattr(data_collator, "tokenizer", None), model, "the collator's tokenizer")
    recall_ks = sorted(set(recall_ks or (1, 5, 8)))
    max_k = min(max(recall_ks), model.index.num_blocks if hasattr(model.index, "num_blocks") else max(recall_ks))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions, closed_book, labels_all = [], [], []
    log_probs, null_log_probs, hits, answer_hits = [], [], [], []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), disable=not show_progress, desc="Evaluating"):
            rows = dataset[start : start + batch_size]
            examples = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
            batch = data_collator(examples)
            gold = batch.pop("gold_block_id", None)
            batch = {
                k: v.to(device)
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "token_type_ids", "labels", "source_block_id")
            }
            out = model(**batch)
            labels = batch["labels"]
            rows_, cols = out.masked_positions[:, 0], out.masked_positions[:, 1]
            pred = torch.full_like(labels, -100)
            pred[rows_, cols] = out.logits.argmax(-1)
            null_pred = torch.full_like(labels, -100)
            null_pred[rows_, cols] = out.null_logits.argmax(-1)
            width = labels.shape[1]
            predictions.append(_pad(pred, width))
            closed_book.append(_pad(null_pred, width))
            labels_all.append(_pad(labels, width))
            log_probs.append(out.gold_log_probs.cpu())
            null_log_probs.append(out.null_gold_log_probs.cpu())
            query = model.query_embedder(
                batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True
            ).projected_score
            retrieved = _top_blocks(model.index, query, max_k, batch.get("source_block_id"))
            if gold is not None:
                hits.extend(gold_block_hits(retrieved.numpy(), gold.tolist()))
            answer_hits.extend(_answer_hits(model.index, retrieved, labels.cpu()))
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in predictions)
    predictions = np.concatenate([_pad(p, width).cpu().numpy() for p in predictions])
    closed_book = np.concatenate([_pad(p, width).cpu().numpy() for p in closed_book])
    labels_all = np.concatenate([_pad(p, width).cpu().numpy() for p in labels_all])
    log_probs, null_log_probs = torch.cat(log_probs), torch.cat(null_log_probs)
    with_retrieval = masked_span_accuracy(predictions, labels_all)
    without = masked_span_accuracy(closed_book, labels_all)
    metrics = {
        "masked_span_accuracy": with_retrieval["masked_span_accuracy"],
        "masked_token_accuracy": with_retrieval["masked_token_accuracy"],
        "closed_book_span_accuracy": without["masked_span_accuracy"],
        "closed_book_token_accuracy": without["masked_token_accuracy"],
        "log_prob": log_probs.mean().item(),
        "closed_book_log_prob": null_log_probs.mean().item(),
        "retrieval_utility": (log_probs - null_log_probs).mean().item(),
        "num_examples": len(dataset),
    }
    ks = [k for k in recall_ks if k <= max_k]
    if hits:
        metrics.update(recall_at_k(hits, ks))
    metrics.update({f"answer_{k}": v for k, v in recall_at_k(answer_hits, ks).items()})
    return metrics


def _top_blocks(index, query: torch.Tensor, k: int, source_block_id: torch.Tensor | None) -> torch.Tensor:
    """The index's top ``k`` block ids per query (CPU), each query's own source block left out."""
    extra = 0 if source_block_id is None else 1
    _, ids = index.search(query.float(), min(k + extra, getattr(index, "num_blocks", k + extra)))
    ids = torch.as_tensor(ids).cpu().long()
    if source_block_id is None:
        return ids[:, :k]
    keep = ids != source_block_id.cpu().view(-1, 1)
    return torch.stack([row[m][:k] for row, m in zip(ids, keep, strict=True)])


def _answer_hits(index, retrieved: torch.Tensor, labels: torch.Tensor) -> list[list[bool]]:
    """Per query and retrieved block: whether the block's tokens hold the query's masked tokens in a row."""
    blocks = index.block_inputs(retrieved.reshape(-1))
    ids, mask = torch.as_tensor(blocks["input_ids"]), torch.as_tensor(blocks["attention_mask"]).bool()
    out = []
    for i, row in enumerate(labels):
        answer = row[row != -100].tolist()
        hits = []
        for j in range(retrieved.shape[1]):
            block = ids[i * retrieved.shape[1] + j][mask[i * retrieved.shape[1] + j]].tolist()
            hits.append(any(block[s : s + len(answer)] == answer for s in range(len(block) - len(answer) + 1)))
        out.append(hits)
    return out


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-100) if t.shape[1] < width else t


__all__ = [
    "DataCollatorForInverseClozeTask",
    "RetrievalMonitorCallback",
    "train_inverse_cloze_task",
    "evaluate_masked_lm",
    "optimizer_grouped_parameters",
    "realm_lr_scheduler",
    "split_sentences",
]


class RetrievalMonitorCallback(TrainerCallback):
    r"""
    Says whether REALM pretraining is working while it runs: every `eval_steps` optimizer steps (by default right
    after each index refresh) it evaluates the model on a few held-out examples ([`evaluate_masked_lm`]) and logs
    `retrieval_utility` (the log-likelihood the retrieved blocks add over the null document alone), gold-block
    `recall@k` (when the examples carry `gold_block_id`), `answer_recall@k` and `masked_span_accuracy`, prefixed
    `monitor_`. When the utility stays <= 0 for `patience` checks in a row it warns that the reader is not using
    what the retriever finds. When recall at the largest cut-off (gold-block `recall@k` if the examples have gold
    blocks, else `answer_recall@k`) stays more than `decline` (a share) below its value at the first check for
    `patience` checks in a row, it warns that retrieval is getting worse: REALM's gradient is moving the retriever away
    from the blocks that hold the answers, as on a corpus whose other blocks rarely restate a masked fact.

    Args:
        eval_dataset: Held-out examples for `data_collator` (a sample of `max_examples` is used).
        data_collator: The masking collator (a seeded one gives the same spans at each check).
        eval_steps (`int`): Check every this many steps (0: never; use the refresh period).
        max_examples (`int`, *optional*, defaults to 256): Examples per check.
        patience (`int`, *optional*, defaults to 2): Checks with utility <= 0 (or recall below the decline
            threshold) in a row before warning.
        decline (`float`, *optional*, defaults to 0.2): Relative fall of recall from the first check that counts as
            retrieval getting worse (0.2: below 80% of the starting recall).
        recall_ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 8)`): Recall cut-offs.

    Example:

    ```python
    >>> from hf_realm.pretraining import RetrievalMonitorCallback
    >>> monitor = RetrievalMonitorCallback(eval_dataset=[], data_collator=None, eval_steps=100)
    >>> monitor.history
    []
    ```
    """

    def __init__(
        self,
        eval_dataset,
        data_collator,
        eval_steps: int,
        max_examples: int = 256,
        patience: int = 2,
        recall_ks: Sequence[int] = (1, 5, 8),
        batch_size: int = 64,
        decline: float = 0.2,
    ):
        if eval_steps < 0 or patience < 1 or max_examples < 1 or not 0 < decline < 1:
            raise ValueError(
                f"need eval_steps >= 0, patience >= 1, max_examples >= 1 and 0 < decline < 1, got {eval_steps}, "
                f"{patience}, {max_examples}, {decline}"
            )
        if hasattr(eval_dataset, "select") and len(eval_dataset) > max_examples:
            eval_dataset = eval_dataset.select(range(max_examples))
        self.eval_dataset, self.data_collator = eval_dataset, data_collator
        self.eval_steps, self.patience, self.recall_ks, self.batch_size = eval_steps, patience, recall_ks, batch_size
        self.decline = decline
        self.history: list[dict] = []
        self._bad_checks = 0
        self._declining_checks = 0
        self._warned_decline = False

    def check(self, model, step: int) -> dict[str, float]:
        """Evaluate now; log, record in `history` and warn as described above. Returns the metrics."""
        metrics = evaluate_masked_lm(
            model, self.eval_dataset, self.data_collator, batch_size=self.batch_size, recall_ks=self.recall_ks
        )
        keys = ["retrieval_utility", "masked_span_accuracy", "closed_book_span_accuracy"]
        keys += [k for k in metrics if k.startswith(("recall@", "answer_recall@"))]
        record = {"step": step, **{k: round(float(metrics[k]), 4) for k in keys}}
        self.history.append(record)
        logger.info("retrieval at step %d: %s", step, ", ".join(f"{k} {v}" for k, v in record.items() if k != "step"))
        self._bad_checks = self._bad_checks + 1 if metrics["retrieval_utility"] <= 0 else 0
        if self._bad_checks == self.patience:
            logger.warning(
                f"retrieval utility has stayed <= 0 for {self.patience} checks (now {metrics['retrieval_utility']:.3f} "
                f"nats at step {step}): the reader predicts no better with the retrieved blocks than without. Look at "
                "recall@k / answer_recall@k (is the retriever finding the blocks?), then at the reader (learning rate, "
                "steps, a warm start)."
            )
        self._check_decline(record)
        return metrics

    def _check_decline(self, record: dict) -> None:
        """Warn once when recall at the largest cut-off has stayed below `(1 - decline)` of its first value."""
        recalls = [k for k in record if k.startswith("recall@")] or [
            k for k in record if k.startswith("answer_recall@")
        ]
        if not recalls or self._warned_decline:
            return
        key = max(recalls, key=lambda k: int(k.split("@")[1]))
        start = self.history[0].get(key)
        if not start:  # nothing found at the start: no fall to measure
            return
        falling = record[key] < (1 - self.decline) * start
        self._declining_checks = self._declining_checks + 1 if falling else 0
        if self._declining_checks == self.patience:
            self._warned_decline = True
            logger.warning(
                f"retrieval is getting worse: {key} fell from {start:.3f} at step {self.history[0]['step']} to "
                f"{record[key]:.3f} at step {record['step']} (below {1 - self.decline:.0%} of its start for "
                f"{self.patience} checks; retrieval_utility {self.history[0]['retrieval_utility']:.3f} -> "
                f"{record['retrieval_utility']:.3f}). REALM's gradient is moving the retriever away from the blocks "
                "that hold the masked spans: check that other blocks of the corpus restate the facts being masked "
                "(the own block is excluded), or lower the retriever's learning rate."
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.is_world_process_zero and not self.history:
            self.check(model, state.global_step)  # the starting point: what the warm-started retriever finds

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.eval_steps or state.global_step % self.eval_steps or not state.is_world_process_zero:
            return
        self.check(model, state.global_step)
        logs = {f"monitor_{k}": v for k, v in self.history[-1].items() if k != "step"}
        state.log_history.append({**logs, "step": state.global_step})
