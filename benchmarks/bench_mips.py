"""Exact MIPS / kNN search speed: naive ``topk(q @ E.T)``, chunked torch, the fused Triton kernel and faiss-cpu.

Workloads (defaults are the issue's):

- REALM: N = 13,353,718 keys x 128 (Wikipedia's block count), fp16, query batches 1 / 64 / 1024, k = 8 and 5000.
- kNN-MT: 10M keys x 512 fp16, 128 queries, k = 8 / 16 / 32 / 64, L2 through ``key_bias = -||k||^2 / 2``.

For every (workload, batch, k, method) it reports ms per query batch (median of CUDA-event timings), the speed-up over
the naive baseline measured in the same run, the fraction of HBM bandwidth (bytes of E / time / the device-to-device copy
bandwidth measured in this run, counting read + write bytes), and recall@k against the chunked torch search with fp32
scores (all queries) and against a float64 search (the first ``--fp64_queries`` queries). faiss-cpu ``IndexFlatIP`` runs
on the host's cores under a time cap (``--faiss_time_cap``); configurations predicted to overrun the cap are listed as
skipped, never extrapolated.

Run on the GPU machine (about 5 minutes on an H100, Triton tuning included)::

    python benchmarks/bench_mips.py --output_dir $OUT

A tiny CPU smoke run: ``python benchmarks/bench_mips.py --num_keys 20000 --knn_num_keys 5000 --knn_dim 64``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hf_realm import search as search_mod  # noqa: E402
from hf_realm.search import TRITON_MAX_K, exact_topk, triton_available  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_keys", type=int, default=13_353_718)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 5000])
    p.add_argument("--knn_num_keys", type=int, default=10_000_000, help="0 skips the kNN-MT workload")
    p.add_argument("--knn_dim", type=int, default=512)
    p.add_argument("--knn_queries", type=int, default=128)
    p.add_argument("--knn_ks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--reps", type=int, default=10, help="timed repetitions for fast methods (<50 ms)")
    p.add_argument("--slow_reps", type=int, default=3, help="timed repetitions for slow methods")
    p.add_argument("--fp64_queries", type=int, default=8)
    p.add_argument("--faiss_num_keys", type=int, default=None, help="keys for faiss-cpu (default: all)")
    p.add_argument("--faiss_time_cap", type=float, default=100.0, help="seconds of faiss-cpu searching in total")
    p.add_argument("--no_faiss", action="store_true")
    p.add_argument("--no_naive", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=os.environ.get("OUT", "bench_out"))
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps, warmup=1):
    """Median wall time of ``fn()`` in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def adaptive_time_ms(fn, device, reps, slow_reps):
    first = time_ms(fn, device, 1, warmup=1)
    n = reps if first < 50 else slow_reps
    return time_ms(fn, device, n, warmup=0) if n > 1 else first


def copy_bandwidth(device, nbytes=2 << 30):
    """Device copy bandwidth, bytes read + written per second."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10, warmup=2)
    return 2 * nbytes / (ms / 1e3)


def naive_topk(q, keys, k, bias=None):
    scores = q @ keys.T
    if bias is not None:
        scores = scores.float() + bias
    return scores.topk(k, dim=1)


def reference_topk(q, keys, k, bias=None, dtype=torch.float64, chunk=1 << 20):
    """Top-k with scores computed in ``dtype`` (fp32: exact fp16 products, fp32 sums, as cuBLAS with an fp32 output;
    fp64: the exact scores), chunk by chunk. Independent of `exact_topk`."""
    q = q.to(dtype)
    best_s, best_i = None, None
    for start in range(0, keys.shape[0], chunk):
        s = q @ keys[start : start + chunk].to(dtype).T
        if bias is not None:
            s += bias[start : start + chunk].to(dtype)
        ts, ti = s.topk(min(k, s.shape[1]), dim=1)
        ti += start
        if best_s is None:
            best_s, best_i = ts, ti
        else:
            ms, order = torch.cat([best_s, ts], 1).topk(k, dim=1)
            best_i, best_s = torch.cat([best_i, ti], 1).gather(1, order), ms
    return best_s.float(), best_i


def recall(ids, ref_ids):
    ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(ids, ref_ids, strict=True)]))


def run_workload(name, keys, queries_all, batches, ks, bias, args, device, copy_bw, rows, faiss_state):
    n, d = keys.shape
    bytes_e = keys.numel() * keys.element_size() + (bias.numel() * 4 if bias is not None else 0)
    roofline_ms = bytes_e / copy_bw * 1e3
    print(
        f"\n== {name}: {n:,} x {d} {keys.dtype}, E = {bytes_e / 1e9:.2f} GB, read-once roofline {roofline_ms:.2f} ms"
    )
    for k in ks:
        for b in batches:
            q = queries_all[:b].to(keys.dtype)  # every method and reference sees the same rounded queries
            if k > n:
                continue
            ref_s, ref_i = reference_topk(q, keys, k, bias, torch.float32)
            ref_i_np = ref_i.cpu().numpy()
            nf = min(args.fp64_queries, b)
            ids64 = reference_topk(q[:nf], keys, k, bias, torch.float64)[1].cpu().numpy()
            methods = {}
            if not args.no_naive:
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62
                if b * n * (2 + (4 if bias is not None else 0)) * 1.3 < free:
                    methods["naive topk(q@E.T)"] = lambda q=q, k=k: naive_topk(q, keys, k, bias)
            methods["chunked torch"] = lambda q=q, k=k: exact_topk(q, keys, k, key_bias=bias, backend="torch")
            use_triton = triton_available() and k <= TRITON_MAX_K
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                use_triton = False
            tune_s = None
            if use_triton:
                t0 = time.perf_counter()
                try:
                    exact_topk(q, keys, k, key_bias=bias, backend="triton")  # tunes + compiles on first use
                    sync(device)
                    tune_s = time.perf_counter() - t0
                    methods["triton fused"] = lambda q=q, k=k: exact_topk(q, keys, k, key_bias=bias, backend="triton")
                except Exception as err:  # report, keep benchmarking the rest
                    msg = f"{type(err).__name__}: {str(err)[:500]}"
                    print(f"  b={b:5d} k={k:5d} triton fused FAILED: {msg}", flush=True)
                    rows.append(
                        {
                            "workload": name,
                            "num_keys": n,
                            "dim": d,
                            "batch": b,
                            "k": k,
                            "method": "triton fused",
                            "ms": None,
                            "error": msg,
                        }
                    )
            naive_ms = None
            for method, fn in methods.items():
                ms = adaptive_time_ms(fn, device, args.reps, args.slow_reps)
                s, i = fn()
                row = {
                    "workload": name,
                    "num_keys": n,
                    "dim": d,
                    "dtype": str(keys.dtype).replace("torch.", ""),
                    "batch": b,
                    "k": k,
                    "method": method,
                    "ms": ms,
                    "hbm_fraction": roofline_ms / ms,
                    "recall_vs_fp32": recall(i.cpu().numpy(), ref_i_np),
                    "recall_vs_fp64": recall(i[:nf].cpu().numpy(), ids64),
                    "max_score_err_vs_fp32": float((s.float().sort(1, descending=True).values - ref_s).abs().max()),
                }
                if method.startswith("naive"):
                    naive_ms = ms
                if method == "triton fused":
                    row["first_call_s"] = tune_s
                row["speedup_vs_naive"] = naive_ms / ms if naive_ms else None
                rows.append(row)
                print(
                    f"  b={b:5d} k={k:5d} {method:20s} {ms:9.3f} ms  HBM {row['hbm_fraction']:.2f}  "
                    f"recall {row['recall_vs_fp32']:.4f} / fp64 {row['recall_vs_fp64']:.4f}",
                    flush=True,
                )
            if faiss_state is not None:
                run_faiss(name, faiss_state, queries_all[:b], k, ref_i_np, rows, args)
            del ref_s, ref_i
            if device.type == "cuda":
                torch.cuda.empty_cache()


def faiss_setup(keys, bias, args):
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n = min(args.faiss_num_keys or keys.shape[0], keys.shape[0])
    if bias is not None:
        return None  # faiss-cpu is run on the MIPS workload only
    t = time.perf_counter()
    host = keys[:n].float().cpu().numpy()
    index = faiss.IndexFlatIP(host.shape[1])
    index.add(host)
    del host
    print(
        f"  faiss-cpu IndexFlatIP over {n:,} keys built in {time.perf_counter() - t:.1f} s, {os.cpu_count()} threads"
    )
    return {"index": index, "n": n, "total": keys.shape[0], "spent": 0.0, "per_query_ms": {}}


def run_faiss(name, state, q, k, ref_i_np, rows, args):
    b = q.shape[0]
    index, n = state["index"], state["n"]
    remaining = args.faiss_time_cap - state["spent"]
    per_q = state["per_query_ms"].get(k)
    predicted_s = per_q * b / 1e3 if per_q is not None else 0.0
    row = {"workload": name, "num_keys": n, "dim": index.d, "dtype": "float32", "batch": b, "k": k}
    row["method"] = f"faiss-cpu FlatIP ({os.cpu_count()} thr)"
    if predicted_s > remaining:
        row.update({"ms": None, "skipped": f"predicted {predicted_s:.0f} s > {remaining:.0f} s left of the cap"})
        rows.append(row)
        print(f"  b={b:5d} k={k:5d} {row['method']:20s} skipped ({row['skipped']})", flush=True)
        return
    qn = np.ascontiguousarray(q.float().cpu().numpy())
    t = time.perf_counter()
    _, ids = index.search(qn, k)
    ms = (time.perf_counter() - t) * 1e3
    state["spent"] += ms / 1e3
    state["per_query_ms"][k] = ms / b  # batches run in increasing size: the latest is the best predictor
    row["ms"] = ms
    row["recall_vs_fp32"] = recall(ids, ref_i_np) if n == state["total"] else None
    rows.append(row)
    shown = f"{row['recall_vs_fp32']:.4f}" if row["recall_vs_fp32"] is not None else "n/a (subset)"
    print(f"  b={b:5d} k={k:5d} {row['method']:20s} {ms:9.1f} ms  recall {shown}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if triton_available() else None,
        "cpu_count": os.cpu_count(),
        "args": vars(args),
    }
    print(json.dumps({k: v for k, v in info.items() if k != "args"}))
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else copy_bandwidth(device, 256 << 20)
    info["copy_bandwidth_TBps"] = copy_bw / 1e12
    print(f"device copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    rows = []

    # REALM MIPS workload
    keys = torch.randn(args.num_keys, args.dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    queries = torch.randn(max(args.batches), args.dim, generator=gen, device=device)
    faiss_state = None
    if not args.no_faiss:
        try:
            faiss_state = faiss_setup(keys, None, args)
        except ImportError:
            print("faiss not installed: skipping faiss-cpu")
    run_workload("REALM MIPS", keys, queries, args.batches, args.ks, None, args, device, copy_bw, rows, faiss_state)
    del keys, queries, faiss_state
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # kNN-MT L2 workload
    if args.knn_num_keys:
        keys = torch.randn(args.knn_num_keys, args.knn_dim, generator=gen, device=device).to(dtype)
        bias = -keys.float().pow(2).sum(1) / 2
        queries = torch.randn(args.knn_queries, args.knn_dim, generator=gen, device=device)
        run_workload(
            "kNN-MT L2", keys, queries, [args.knn_queries], args.knn_ks, bias, args, device, copy_bw, rows, None
        )
        del keys, bias

    info["tuning"] = search_mod.tuning_log()
    out = os.path.join(args.output_dir, "bench_mips.json")
    with open(out, "w") as f:
        json.dump({"info": info, "results": rows}, f, indent=1, default=str)

    print(f"\nwrote {out}")
    print(
        f"\n{info['device']}, {info['date']}, torch {info['torch']}, triton {info['triton']}, copy {copy_bw / 1e12:.2f} TB/s"
    )
    header = f"| {'workload':10s} | {'N x d':>15s} | {'batch':>5s} | {'k':>5s} | {'method':26s} | {'ms':>9s} | {'vs naive':>8s} | {'HBM':>5s} | {'recall':>6s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else ("FAILED" if r.get("error") else "skipped")
        sp = f"{r['speedup_vs_naive']:.1f}x" if r.get("speedup_vs_naive") else ""
        hbm = f"{r['hbm_fraction']:.2f}" if r.get("hbm_fraction") is not None else ""
        rec = f"{r['recall_vs_fp32']:.4f}" if r.get("recall_vs_fp32") is not None else ""
        nd = f"{r['num_keys'] / 1e6:.2f}M x {r['dim']}"
        print(
            f"| {r['workload'][:10]:10s} | {nd:>15s} | {r['batch']:5d} | {r['k']:5d} | {r['method'][:26]:26s} | "
            f"{ms:>9s} | {sp:>8s} | {hbm:>5s} | {rec:>6s} |"
        )
    return rows


if __name__ == "__main__":
    main()
