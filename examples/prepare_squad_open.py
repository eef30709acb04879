#!/usr/bin/env python
"""SQuAD-open from SQuAD v1.1 dev: the corpus is every paragraph, questions are split by article.

    python examples/prepare_squad_open.py --squad_path ../shared/data/squad_v1.1/dev-v1.1.json --output_dir data/squad

Writes `corpus.jsonl` (block_id, doc_id = article, title, text), `train.jsonl` and `test.jsonl` (question, answers,
gold_block_id = the question's paragraph). No article has questions in both splits, so a test question's paragraph
was never read in training. With `--dev_fraction`, the questions of a share of the other articles go to `dev.jsonl`.

`--distractors` adds the paragraphs of wikitext-2 files (comma-separated paths, e.g. its valid.txt and test.txt) after
the SQuAD paragraphs, as blocks that hold no answer: a corpus where retrieval has to tell Wikipedia articles apart.
Paragraphs longer than `--max_distractor_words` are cut at sentence ends; wikitext's tokenization is undone (`@-@`,
`@,@`, `@.@`) and its `<unk>` tokens are dropped.

    python examples/prepare_squad_open.py --output_dir data/squad_wiki \
        --distractors ../shared/data/wikitext-2/valid.txt,../shared/data/wikitext-2/test.txt
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
    dev_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the other articles whose questions form dev.jsonl (to watch convergence)."},
    )
    seed: int = 0
    distractors: str | None = field(
        default=None, metadata={"help": "Comma-separated wikitext-2 files whose paragraphs join the corpus."}
    )
    max_distractor_words: int = field(default=200, metadata={"help": "Longer distractor paragraphs are cut."})


def _untokenize(line: str) -> str:
    return line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", " ")


def wikitext_paragraphs(path: str, max_words: int):
    """(title, paragraph) pairs of a wikitext file: ` = Title = ` lines open an article, ` = = Section = = ` lines are
    skipped, every other non-empty line is a paragraph, cut into pieces of at most `max_words` words at sentence ends
    (a single longer sentence stays whole)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--distractors: no file {path!r}")
    title = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("= ") and line.endswith(" ="):
                if not line.startswith("= ="):
                    title = " ".join(_untokenize(line.strip("= ")).split())
                continue
            text = _untokenize(line)
            sentences, current = [], []
            for word in text.split():
                current.append(word)
                if word in (".", "!", "?"):
                    sentences.append(current)
                    current = []
            if current:
                sentences.append(current)
            piece: list[str] = []
            for sentence in sentences:
                if piece and len(piece) + len(sentence) > max_words:
                    yield title, " ".join(piece)
                    piece = []
                piece += sentence
            if piece:
                yield title, " ".join(piece)


def split_articles(num_articles: int, test_fraction: float, seed: int) -> set[int]:
    order = list(range(num_articles))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, round(test_fraction * num_articles))])


def main(argv=None) -> dict:
    (args,) = parse_args(HfArgumentParser(Arguments), argv)
    with open(args.squad_path) as f:
        articles = json.load(f)["data"]
    test_articles = split_articles(len(articles), args.test_fraction, args.seed)
    rest = [i for i in range(len(articles)) if i not in test_articles]
    dev_articles = set()
    if args.dev_fraction > 0:
        dev_articles = {rest[i] for i in split_articles(len(rest), args.dev_fraction, args.seed + 1)}
    corpus, splits = [], {"train": [], "test": [], "dev": []}
    for doc_id, article in enumerate(articles):
        title = article["title"].replace("_", " ")
        for paragraph in article["paragraphs"]:
            block_id = len(corpus)
            corpus.append({"block_id": block_id, "doc_id": doc_id, "title": title, "text": paragraph["context"]})
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                split = "test" if doc_id in test_articles else "dev" if doc_id in dev_articles else "train"
                splits[split].append({"question": qa["question"], "answers": answers, "gold_block_id": block_id})
    num_distractors, titles = 0, {}
    for path in (args.distractors or "").split(","):
        if not path:
            continue
        for title, text in wikitext_paragraphs(path, args.max_distractor_words):
            doc_id = titles.setdefault((path, title), len(articles) + len(titles))  # one document per article
            corpus.append({"block_id": len(corpus), "doc_id": doc_id, "title": title, "text": text})
            num_distractors += 1
    os.makedirs(args.output_dir, exist_ok=True)
    outputs = [("corpus", corpus), ("train", splits["train"]), ("test", splits["test"])]
    outputs += [("dev", splits["dev"])] if dev_articles else []
    for name, rows in outputs:
        with open(os.path.join(args.output_dir, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    counts = {
        "blocks": len(corpus),
        "distractor_blocks": num_distractors,
        "articles": len(articles),
        "test_articles": len(test_articles),
        "train_questions": len(splits["train"]),
        "test_questions": len(splits["test"]),
        "dev_articles": len(dev_articles),
        "dev_questions": len(splits["dev"]),
    }
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
