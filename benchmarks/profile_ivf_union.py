"""Where the time of one IVF union-scan search goes (`IVFSearchConfig(scan="union")`), stage by stage.

Random fp16 keys (``--num_keys`` x ``--dim``), L2, ``--queries`` random queries (the batch x beam of one decoding
step), ``nprobe`` lists of ``4 sqrt(n)``. Each stage of ``IVFBackend._search_union`` is timed alone (median of
``--repeats`` runs after a warm-up, synchronised): probing the centroids, the union of the probed lists, the stored
positions of its keys, gathering the keys and their biases, the fused exact search over them (k and the re-ranked
``rerank * k``), the same search reading the lists where they are stored (``read_in_place=True``; on a GPU), the ids,
the float64 re-scoring and the final sort; then the whole search, and the whole search with other settings
(``--variants``; the default set includes ``read_in_place=1``). ``--profile`` adds the torch profiler's kernel table.

    python benchmarks/profile_ivf_union.py --num_keys 10000000 --output out/profile_ivf_union.json   # on a GPU
    python benchmarks/profile_ivf_union.py --num_keys 100000 --device cpu --repeats 3                # a CPU smoke run

Prints a table and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_realm.search import IVFSearchConfig
from hf_realm.search import exact as exact_search
from hf_realm.search.rescore import exact_scores, sort_best_first


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_keys", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=128, help="queries a search (batch x beam)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--max_gather_bytes", type=int, default=1 << 30)
    p.add_argument(
        "--variants",
        default="read_in_place=1,nprobe=4,rerank=0,nprobe=16",
        help="whole-search timings with one field changed (read_in_place=1: the lists read where they are stored)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="also print the torch profiler's table")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default="outputs/profile_ivf_union.json")
    return p


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        out = fn()
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1000)
        return float(np.median(times)), out

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    keys = torch.randn(args.num_keys, args.dim, generator=gen, device=device, dtype=dtype).cpu()
    config = IVFSearchConfig(nprobe=args.nprobe, scan="union", max_gather_bytes=args.max_gather_bytes, device=device)
    t0 = time.perf_counter()
    ivf = config.build(keys, metric="l2")
    sync()
    build_s = time.perf_counter() - t0
    q = torch.randn(args.queries, args.dim, generator=gen, device=device)
    rows = []

    def stage(name, fn):
        ms, out = timed(fn)
        rows.append({"stage": name, "ms": ms})
        return out

    stage("whole search", lambda: ivf.search(q, args.k))
    lists = stage("probe (centroid scores, top nprobe)", lambda: ivf.probe(q))
    union = stage("union of the probed lists", lambda: torch.unique(lists))
    sizes = ivf.list_sizes[union]
    total = int(sizes.sum())

    def positions():
        first = torch.repeat_interleave(ivf.list_offsets[union], sizes, output_size=total)
        before = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes, output_size=total)
        return first + torch.arange(total, device=device) - before

    pos = stage("stored positions of the union's keys", positions)
    gathered = stage("gather the keys", lambda: ivf.keys[pos])
    bias = stage("gather the key biases", lambda: ivf.key_bias[pos])
    take = ivf._rerank_count(args.k)
    stage(f"exact search over the union, k={args.k}", lambda: exact_search.exact_topk(q.to(gathered.dtype), gathered, args.k,
                                                                           key_bias=bias))  # fmt: skip
    _, local = stage(f"exact search over the union, k={take} (re-ranked)",
                     lambda: exact_search.exact_topk(q.to(gathered.dtype), gathered, take, key_bias=bias))  # fmt: skip
    ranges = (ivf.list_offsets[union], sizes)
    stage(f"exact search over the lists read in place, k={take} (row_ranges: no gather)",
          lambda: exact_search.exact_topk(q.to(ivf.keys.dtype), ivf.keys, take, key_bias=ivf.key_bias,
                                          row_ranges=ranges))  # fmt: skip
    ids = stage("ids of the candidates", lambda: ivf.ids[pos[local]])
    scores = stage("float64 re-scoring", lambda: exact_scores(q, ids, ivf.source_rows, "l2"))
    stage("sort best first", lambda: sort_best_first(scores, ids, "l2"))
    variants = []
    for spec in (v for v in args.variants.split(",") if v):
        field, _, value = spec.partition("=")
        other = dataclasses.replace(config, **{field: int(value)}).build(keys, metric="l2")
        ms, _ = timed(lambda other=other: other.search(q, args.k))
        variants.append({"change": spec, "whole_search_ms": ms})
        del other
    key_bytes = total * args.dim * ivf.keys.element_size()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "num_keys": args.num_keys,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "nlist": ivf.nlist,
        "nprobe": ivf.nprobe,
        "union_lists": int(union.numel()),
        "union_keys": total,
        "union_key_bytes": key_bytes,
        "build_seconds": build_s,
        "stages": rows,
        "variants": variants,
        "command": "python benchmarks/profile_ivf_union.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(10):
                ivf.search(q, args.k)
            sync()
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"IVF union scan on {result['device']}: {args.num_keys:,} x {args.dim} keys, {ivf.nlist:,} lists, "
          f"nprobe {ivf.nprobe}, {args.queries} queries -> {total:,} keys in {union.numel():,} lists "
          f"({key_bytes / 2**20:.0f} MiB); built in {build_s:.1f}s")  # fmt: skip
    print("| stage | ms |")
    print("|---|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['ms']:.3f} |")
    for v in variants:
        print(f"| whole search, {v['change']} | {v['whole_search_ms']:.3f} |")
    print(f"JSON: {args.output}")
    return result


if __name__ == "__main__":
    main()
