#!/usr/bin/env python
"""Evaluate a fine-tuned REALM open-QA model: exact match (SQuAD normalisation, or regex for CuratedTREC patterns),
F1, the same reader closed book, and the retriever's recall@k.

    python examples/eval_openqa.py                                   # outputs/finetune_openqa on the world's test
    python examples/eval_openqa.py --model_dir outputs/squad --eval_file data/squad/test.jsonl
    python examples/eval_openqa.py --model_dir my_model --eval_file ../shared/data/drqa_openqa/CuratedTrec-test.txt \\
        --answers_are_regex true

The model dir is what `examples/finetune_openqa.py` writes (model, block records + tokenizer, `index/`). Writes
`<output_dir>/all_results.json` and `<output_dir>/predictions.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser

from hf_realm import RealmBlockIndex, RealmForOpenQA, RealmRetriever
from hf_realm.openqa import evaluate_open_qa
from hf_realm.utils import FAISS, check_dependencies, parse_args


logger = logging.getLogger("eval_openqa")


@dataclass
class EvalArguments:
    model_dir: str = field(default="outputs/finetune_openqa", metadata={"help": "finetune_openqa.py output dir."})
    eval_file: str | None = field(default=None, metadata={"help": "Questions (json/jsonl/csv/parquet)."})
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    eval_split: str = "test"
    answers_are_regex: bool = False
    num_entities: int = 1000
    world_seed: int = 0
    max_eval_examples: int | None = None
    max_question_length: int = 32
    batch_size: int = 32
    output_dir: str | None = field(default=None, metadata={"help": "Defaults to <model_dir>/eval."})
    device: str = "cuda" if __import__("torch").cuda.is_available() else "cpu"


def load_questions(args: EvalArguments):
    import datasets

    if args.eval_file is None and args.dataset_name is None:
        from hf_realm.world import KnowledgeWorld

        return KnowledgeWorld(num_entities=args.num_entities, seed=args.world_seed).qa()["test"]
    if args.eval_file is not None:
        ext = args.eval_file.rsplit(".", 1)[-1].replace("jsonl", "json").replace("txt", "json")
        ds = datasets.load_dataset(ext, data_files=args.eval_file, split="train")
    else:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.eval_split)
    if "answers" not in ds.column_names and "answer" in ds.column_names:
        ds = ds.rename_column("answer", "answers")
    return ds


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(EvalArguments)


def check_extras(args: EvalArguments) -> None:
    """Fail before any work when the saved index needs faiss and faiss is missing."""
    index_config = os.path.join(args.model_dir, "index", "index_config.json")
    backend = None
    if os.path.isfile(index_config):
        with open(index_config) as f:
            backend = json.load(f).get("backend")
    check_dependencies("examples/eval_openqa.py", [FAISS if backend in ("faiss", "faiss-gpu") else None])


def main(argv=None) -> dict:
    (args,) = parse_args(make_parser(), argv)
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"{args.model_dir} does not exist: run examples/finetune_openqa.py first")
    check_extras(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    retriever = RealmRetriever.from_pretrained(args.model_dir)
    index = RealmBlockIndex.from_pretrained(os.path.join(args.model_dir, "index"))
    model = RealmForOpenQA.from_pretrained(args.model_dir, retriever=retriever, index=index).to(args.device)
    questions = load_questions(args)
    if args.max_eval_examples:
        questions = questions.select(range(min(args.max_eval_examples, len(questions))))
    match = "regex" if args.answers_are_regex else "string"
    common = {"batch_size": args.batch_size, "match": match, "max_question_length": args.max_question_length}
    metrics, predictions = evaluate_open_qa(model, questions, retriever.tokenizer, show_progress=True, **common)
    closed, _ = evaluate_open_qa(model, questions, retriever.tokenizer, recall_ks=(), closed_book=True, **common)
    results = {f"eval_{k}": v for k, v in metrics.items()}
    results["eval_closed_book_exact_match"] = closed["exact_match"]
    out = args.output_dir or os.path.join(args.model_dir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "all_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "predictions.jsonl"), "w") as f:
        for record in predictions:
            f.write(json.dumps(record) + "\n")
    logger.info("results:\n" + json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
