"""Index refresh throughput: blocks/s of `embed_corpus` for a BERT-base-size `RealmEmbedder` against the raw forward.

The corpus is synthetic: ``--num_blocks`` blocks of ``--seq_len`` (288) tokens, ``[CLS] title [SEP] body [SEP]`` with
random ids (``--full_fraction`` of them full length, the rest uniformly shorter, to exercise length bucketing). The
embedder has random weights (BERT-base: 12 layers, hidden 768, 12 heads, 3072, projection 128; SDPA attention).

Measured in one run:

- **ceiling**: the model's forward alone on a batch already resident on the GPU, no padding mask, under
  `torch.inference_mode` (bf16 autocast over fp32 weights, and bf16 weights);
- **embed_corpus**: the whole refresh path (token arrays -> length-bucketed batches -> pinned async copies -> forward
  -> projection -> results written at their block ids -> copied to the host), for each batch size.

Run on the GPU machine (about 3 minutes on an H100)::

    python benchmarks/bench_refresh.py --output_dir $OUT

Tiny CPU smoke run: ``python benchmarks/bench_refresh.py --tiny``.
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


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hf_realm import CorpusTokens, RealmConfig, RealmEmbedder, embed_corpus  # noqa: E402  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_blocks", type=int, default=100_000)
    p.add_argument("--seq_len", type=int, default=288)
    p.add_argument("--full_fraction", type=float, default=1.0, help="fraction of blocks at full length")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--ceiling_batches", type=int, default=30, help="timed forwards for the ceiling")
    p.add_argument("--output_dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--compile", action="store_true", help="also try torch.compile on the ceiling")
    p.add_argument("--tiny", action="store_true", help="a tiny model and corpus (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=os.environ.get("OUT", "bench_out"))
    return p.parse_args(argv)


def make_config(tiny: bool) -> RealmConfig:
    if tiny:
        return RealmConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            retriever_proj_size=16,
            max_position_embeddings=512,
        )
    return RealmConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        retriever_proj_size=128,
        max_position_embeddings=512,
    )


def synthetic_tokens(num_blocks, seq_len, full_fraction, vocab_size, seed) -> CorpusTokens:
    """Token arrays of a synthetic block corpus (what `CorpusTokens.from_dataset` gives for a built corpus)."""
    rng = np.random.default_rng(seed)
    lengths = np.full(num_blocks, seq_len, dtype=np.int64)
    short = rng.random(num_blocks) >= full_fraction
    lengths[short] = rng.integers(16, seq_len, short.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(5, vocab_size, offsets[-1]).astype(np.uint16 if vocab_size < 1 << 16 else np.int32)
    title_len = 8
    values[offsets[:-1]] = 2  # [CLS]
    values[offsets[:-1] + title_len + 1] = 3  # [SEP] after the title
    values[offsets[1:] - 1] = 3  # final [SEP]
    return CorpusTokens(values=values, offsets=offsets, token_type_start=np.full(num_blocks, title_len + 2, np.int32))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(model, device, batch_size, seq_len, vocab_size, batches, autocast):
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), device=device)
    tt = torch.zeros_like(ids)
    tt[:, 10:] = 1
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(3):
            model(input_ids=ids, token_type_ids=tt)
        sync(device)
        t = time.perf_counter()
        for _ in range(batches):
            out = model(input_ids=ids, token_type_ids=tt).projected_score
        sync(device)
        elapsed = time.perf_counter() - t
    assert out.shape == (batch_size, model.config.retriever_proj_size)
    return batches * batch_size / elapsed


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.num_blocks, args.batch_sizes, args.ceiling_batches = min(args.num_blocks, 600), [64, 128], 3
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    config = make_config(args.tiny)
    model = RealmEmbedder(config).to(device).eval()
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "args": vars(args),
    }
    print(json.dumps({k: v for k, v in info.items() if k != "args"}), flush=True)
    t = time.perf_counter()
    tokens = synthetic_tokens(args.num_blocks, args.seq_len, args.full_fraction, config.vocab_size, args.seed)
    print(f"synthetic corpus: {args.num_blocks:,} blocks, {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    amp = device.type == "cuda"

    for bs in args.batch_sizes:
        bps = ceiling(model, device, bs, args.seq_len, config.vocab_size, args.ceiling_batches, autocast=amp)
        rows.append(
            {
                "what": "ceiling: forward, bf16 autocast" if amp else "ceiling: forward",
                "batch": bs,
                "blocks_per_s": bps,
            }
        )
        print(f"  {rows[-1]['what']:40s} bs={bs:5d} {bps:9.0f} blocks/s", flush=True)

    output_dtype = getattr(torch, args.output_dtype)
    reference = None
    for bs in args.batch_sizes:
        sync(device)
        t = time.perf_counter()
        emb = embed_corpus(model, tokens, batch_size=bs, output_dtype=output_dtype, show_progress=False)
        sync(device)
        elapsed = time.perf_counter() - t
        if reference is None:
            reference = emb.float()
        diff = float((emb.float() - reference).abs().max())
        rows.append(
            {
                "what": "embed_corpus (autocast)" if amp else "embed_corpus",
                "batch": bs,
                "blocks_per_s": args.num_blocks / elapsed,
                "seconds": elapsed,
                "max_abs_diff_vs_first_batch_size": diff,
            }
        )
        print(
            f"  {rows[-1]['what']:40s} bs={bs:5d} {rows[-1]['blocks_per_s']:9.0f} blocks/s  ({elapsed:.1f} s)",
            flush=True,
        )

    if amp:
        bf16 = model.to(torch.bfloat16)
        for bs in args.batch_sizes:
            bps = ceiling(bf16, device, bs, args.seq_len, config.vocab_size, args.ceiling_batches, autocast=False)
            rows.append({"what": "ceiling: forward, bf16 weights", "batch": bs, "blocks_per_s": bps})
            print(f"  {rows[-1]['what']:40s} bs={bs:5d} {bps:9.0f} blocks/s", flush=True)
        for bs in args.batch_sizes:
            sync(device)
            t = time.perf_counter()
            embed_corpus(bf16, tokens, batch_size=bs, dtype=None, output_dtype=output_dtype, show_progress=False)
            sync(device)
            elapsed = time.perf_counter() - t
            rows.append(
                {"what": "embed_corpus (bf16 weights)", "batch": bs, "blocks_per_s": args.num_blocks / elapsed}
            )
            print(f"  {rows[-1]['what']:40s} bs={bs:5d} {rows[-1]['blocks_per_s']:9.0f} blocks/s", flush=True)
        if args.compile:
            compiled = torch.compile(bf16)
            for bs in args.batch_sizes:
                bps = ceiling(
                    compiled, device, bs, args.seq_len, config.vocab_size, args.ceiling_batches, autocast=False
                )
                rows.append({"what": "ceiling: compiled, bf16 weights", "batch": bs, "blocks_per_s": bps})
                print(f"  {rows[-1]['what']:40s} bs={bs:5d} {bps:9.0f} blocks/s", flush=True)

    best_ceiling = max(r["blocks_per_s"] for r in rows if r["what"].startswith("ceiling"))
    for r in rows:
        r["fraction_of_best_ceiling"] = r["blocks_per_s"] / best_ceiling
        r["hours_for_13.35M_blocks"] = 13_353_718 / r["blocks_per_s"] / 3600
    out = os.path.join(args.output_dir, "bench_refresh.json")
    with open(out, "w") as f:
        json.dump({"info": info, "results": rows}, f, indent=1)
    print(f"\nwrote {out}")
    print(
        f"\n{info['device']}, {info['date']}, torch {info['torch']}, {info['params_M']:.0f}M params, "
        f"{args.num_blocks:,} blocks x {args.seq_len} tokens ({args.full_fraction:.0%} full length)"
    )
    print(f"| {'what':34s} | {'batch':>5s} | {'blocks/s':>9s} | {'of ceiling':>10s} | {'13.35M blocks':>13s} |")
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 11}|{'-' * 12}|{'-' * 15}|")
    for r in rows:
        print(
            f"| {r['what']:34s} | {r['batch']:5d} | {r['blocks_per_s']:9.0f} | {r['fraction_of_best_ceiling']:10.2f} | "
            f"{r['hours_for_13.35M_blocks'] * 60:10.1f} min |"
        )
    return rows


if __name__ == "__main__":
    main()
