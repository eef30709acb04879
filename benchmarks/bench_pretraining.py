"""REALM pretraining step throughput for a BERT-base-size model: steps/s of `RealmForMaskedLM` (query embedding,
MIPS over the corpus index, re-embedding the k-1 retrieved 288-token blocks with gradients, the knowledge-augmented
encoder over k joint sequences, marginal loss, backward, AdamW), bf16 autocast, on a synthetic corpus.

The same run times an index refresh (`embed_corpus` over the whole corpus with the doc embedder) and reports both
against the measured forward-only ceiling of the doc embedder.

    python benchmarks/bench_pretraining.py --output_dir $OUT            # H100: ~3 min
    python benchmarks/bench_pretraining.py --tiny                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(_HERE, "..", "src")]  # the benchmarks' helpers, and this checkout's hf_realm

from bench_refresh import make_config, synthetic_tokens  # noqa: E402

from hf_realm import RealmBlockIndex, RealmConfig, RealmForMaskedLM, embed_corpus  # noqa: E402  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_blocks", type=int, default=200_000)
    p.add_argument("--block_len", type=int, default=288)
    p.add_argument("--query_len", type=int, default=64)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--num_candidates", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--refresh_batch_size", type=int, default=512)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--output_dir", default=os.environ.get("OUT", "bench_out"))
    return p.parse_args(argv)


def corpus_dataset(tokens):
    import datasets
    import pyarrow as pa

    ids = pa.ListArray.from_arrays(pa.array(tokens.offsets.astype(np.int32)), pa.array(tokens.values.astype(np.int32)))
    return datasets.Dataset(pa.table({"input_ids": ids, "token_type_start": pa.array(tokens.token_type_start)}))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.num_blocks, args.block_len, args.query_len, args.batch_sizes, args.steps = 2000, 64, 16, [4], 3
    base = make_config(args.tiny)
    config = RealmConfig(**{**base.to_dict(), "num_candidates": args.num_candidates, "pad_token_id": 0})
    torch.manual_seed(0)
    model = RealmForMaskedLM(config).to(device)
    tokens = synthetic_tokens(args.num_blocks, args.block_len, 1.0, config.vocab_size, 0)
    corpus = corpus_dataset(tokens)

    # refresh: the whole corpus through the doc embedder (bf16 on GPU), then the index swap
    embed_corpus(model.embedder, tokens, batch_size=args.refresh_batch_size, show_progress=False, output_device=None)
    sync(device)
    start = time.perf_counter()
    embeddings = embed_corpus(
        model.embedder, tokens, batch_size=args.refresh_batch_size, show_progress=False, output_device=None
    )
    sync(device)
    refresh_seconds = time.perf_counter() - start
    index = RealmBlockIndex(corpus, embeddings.float().cpu(), backend="torch")
    index._tokens = tokens
    model.index = index

    rows = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    for batch_size in args.batch_sizes:
        input_ids = torch.randint(5, config.vocab_size, (batch_size, args.query_len), generator=g)
        input_ids[:, 0], input_ids[:, -1] = 2, 3
        labels = torch.full_like(input_ids, -100)
        labels[:, 5:9] = input_ids[:, 5:9]  # a 4-token salient span
        input_ids[:, 5:9] = 4
        batch = {"input_ids": input_ids.to(device), "labels": labels.to(device)}
        try:
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    sync(device)
                    start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync(device)
            seconds = (time.perf_counter() - start) / args.steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append(
                {
                    "batch_size": batch_size,
                    "steps_per_s": 1 / seconds,
                    "ms_per_step": 1000 * seconds,
                    "queries_per_s": batch_size / seconds,
                    "peak_gib": peak,
                }
            )
        except torch.OutOfMemoryError as err:
            rows.append({"batch_size": batch_size, "error": f"OOM: {err}"[:200]})
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "model": "BERT-base size (12 layers, 768, 12 heads) x 2 (shared embedder + encoder)"
        if not args.tiny
        else "tiny",
        "num_blocks": args.num_blocks,
        "block_len": args.block_len,
        "query_len": args.query_len,
        "num_candidates": args.num_candidates,
        "refresh_seconds": refresh_seconds,
        "refresh_blocks_per_s": args.num_blocks / refresh_seconds,
        "refresh_13_35M_minutes_extrapolated": 13_353_718 / (args.num_blocks / refresh_seconds) / 60,
        "steps": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "bench_pretraining.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nREALM pretraining on {result['device']} ({result['date']}), {result['model']}")
    print(
        f"refresh: {args.num_blocks} blocks x {args.block_len} tokens in {refresh_seconds:.1f}s = "
        f"{result['refresh_blocks_per_s']:.0f} blocks/s (13.35M blocks: "
        f"{result['refresh_13_35M_minutes_extrapolated']:.1f} min)"
    )
    print(f"{'batch':>6} {'steps/s':>8} {'ms/step':>8} {'queries/s':>10} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch_size']:>6} {r['error']}")
        else:
            print(
                f"{r['batch_size']:>6} {r['steps_per_s']:>8.2f} {r['ms_per_step']:>8.0f} {r['queries_per_s']:>10.1f} "
                f"{r['peak_gib']:>9.1f}"
            )
    return result


if __name__ == "__main__":
    main()
