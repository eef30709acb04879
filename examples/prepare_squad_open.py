#!/usr/bin/env python
"""SQuAD-open from SQuAD v1.1 dev: the corpus is every paragraph, questions are split by article.

    python examples/prepare_squad_open.py --squad_path ../shared/data/squad_v1.1/dev-v1.1.json --output_dir data/squad

Writes `corpus.jsonl` (block_id, doc_id = article, title, text), `train.jsonl` and `test.jsonl` (question, answers,
gold_block_id = the question's paragraph). No article has questions in both splits, so a test question's paragraph
was never read in training.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_realm.utils import parse_args


@dataclass
class Arguments:
    squad_path: str = field(default="../shared/data/squad_v1.1/dev-v1.1.json")
    output_dir: str = field(default="data/squad_open")
    test_fraction: float = field(default=0.2, metadata={"help": "Share of the articles whose questions are test."})
    seed: int = 0


def split_articles(num_articles: int, test_fraction: float, seed: int) -> set[int]:
    order = list(range(num_articles))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, round(test_fraction * num_articles))])


def main(argv=None) -> dict:
    (args,) = parse_args(HfArgumentParser(Arguments), argv)
    with open(args.squad_path) as f:
        articles = json.load(f)["data"]
    test_articles = split_articles(len(articles), args.test_fraction, args.seed)
    corpus, splits = [], {"train": [], "test": []}
    for doc_id, article in enumerate(articles):
        title = article["title"].replace("_", " ")
        for paragraph in article["paragraphs"]:
            block_id = len(corpus)
            corpus.append({"block_id": block_id, "doc_id": doc_id, "title": title, "text": paragraph["context"]})
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                split = "test" if doc_id in test_articles else "train"
                splits[split].append({"question": qa["question"], "answers": answers, "gold_block_id": block_id})
    os.makedirs(args.output_dir, exist_ok=True)
    for name, rows in (("corpus", corpus), ("train", splits["train"]), ("test", splits["test"])):
        with open(os.path.join(args.output_dir, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    counts = {
        "blocks": len(corpus),
        "articles": len(articles),
        "test_articles": len(test_articles),
        "train_questions": len(splits["train"]),
        "test_questions": len(splits["test"]),
    }
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
