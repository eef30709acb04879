"""The hand-written GPU pieces of `hf_realm.knn_compression` against faiss on the CPU, in the same run.

faiss-gpu has no wheels for CUDA 13, so on a GPU `kmeans` runs Lloyd's iterations in torch and `pq_compress` encodes
the keys in torch; on the CPU both use faiss. This times, on the same data:

- k-means (the step under `cluster_prune` and PQ training): torch Lloyd iterations on ``--device`` vs faiss `Kmeans`
  on the CPU (the baseline), from the same initial centroids, same iterations;
- PQ encoding (nearest centroid per sub-space for every key): torch on ``--device`` vs faiss
  `ProductQuantizer.compute_codes` on the CPU (the baseline), same codebooks.

    python benchmarks/bench_kmeans.py --output_dir out            # on the GPU machine: the figures that matter
    python benchmarks/bench_kmeans.py --num_points 20000 --num_keys 50000 --device cpu   # CPU smoke run

The ratio column is faiss CPU seconds / torch seconds (above 1: the torch path is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from hf_realm.knn_compression import _lloyd_step, _pq_encode_faiss
from hf_realm.search.faiss_utils import import_faiss


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = {"num_points": 200_000, "dim": 64, "clusters": 256, "iters": 20,  # k-means: points x dim, clusters
             "num_keys": 1_000_000, "key_dim": 512, "pq_m": 64, "repeats": 3}  # PQ encoding: keys x dim, m  # fmt: skip
    for name, default in sizes.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--device", default=None)
    p.add_argument("--output_dir", default="outputs/bench_kmeans")
    args = p.parse_args(argv)
    faiss = import_faiss()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rng = np.random.default_rng(0)
    rows = []

    # k-means: same points, same initial centroids, same number of iterations
    x_np = rng.standard_normal((args.num_points, args.dim), dtype=np.float32)
    init_np = x_np[rng.choice(args.num_points, args.clusters, replace=False)]
    x, init = torch.from_numpy(x_np).to(device), torch.from_numpy(init_np).to(device)
    w = torch.ones(args.num_points, device=device)

    def torch_kmeans():
        c = init
        for _ in range(args.iters):
            c, _ = _lloyd_step(x, w, c, 1 << 26)
        return c

    def faiss_kmeans():
        km = faiss.Kmeans(args.dim, args.clusters, niter=args.iters, seed=0, verbose=False,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)  # fmt: skip
        km.train(x_np, init_centroids=init_np)
        return km.centroids

    flops = 2 * args.num_points * args.clusters * args.dim * args.iters
    t_torch, t_faiss = (
        _timed(torch_kmeans, device, args.repeats),
        _timed(faiss_kmeans, torch.device("cpu"), args.repeats),
    )
    rows.append({"task": f"k-means {args.num_points:,} x {args.dim}, {args.clusters} clusters, {args.iters} iters",
                 "torch_s": t_torch, "faiss_cpu_s": t_faiss, "torch_tflops": flops / t_torch / 1e12})  # fmt: skip

    # PQ encoding: same codebooks (trained once by faiss on a sample)
    keys_np = rng.standard_normal((args.num_keys, args.key_dim), dtype=np.float32)
    pq = faiss.ProductQuantizer(args.key_dim, args.pq_m, 8)
    pq.cp.niter, pq.cp.min_points_per_centroid = 4, 1
    pq.train(keys_np[: 256 * 64])
    dsub = args.key_dim // args.pq_m
    codebooks = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(args.pq_m, 256, dsub)).to(device)
    cb_norm = codebooks.pow(2).sum(-1)
    keys = torch.from_numpy(keys_np).to(device)
    step = max(1, (1 << 27) // (args.pq_m * 256))

    def torch_encode():
        out = []
        for s in range(0, args.num_keys, step):
            sub = keys[s : s + step].view(-1, args.pq_m, dsub).transpose(0, 1)
            out.append((cb_norm[:, None, :] - 2 * torch.bmm(sub, codebooks.transpose(1, 2))).argmin(-1).T)
        return torch.cat(out)

    t_torch, t_faiss = (
        _timed(torch_encode, device, args.repeats),
        _timed(lambda: _pq_encode_faiss(pq, keys_np, args.pq_m, 8), torch.device("cpu"), args.repeats),
    )
    agree = float((torch_encode().cpu().numpy() == _pq_encode_faiss(pq, keys_np, args.pq_m, 8)).mean())
    rows.append({"task": f"PQ encode {args.num_keys:,} x {args.key_dim}, m={args.pq_m}, 8 bits",
                 "torch_s": t_torch, "faiss_cpu_s": t_faiss, "codes_agree": agree})  # fmt: skip

    result = {"device": str(device), "device_name": device_name, "cpu_threads": torch.get_num_threads(),
              "faiss": faiss.__version__, "torch": torch.__version__, "args": vars(args), "rows": rows}  # fmt: skip
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"bench_kmeans_{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device: {device_name} ({device}); faiss {faiss.__version__} on {torch.get_num_threads()} CPU threads")
    print("\n| task | torch (s) | faiss CPU (s) | faiss / torch |\n|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['task']} | {r['torch_s']:.3f} | {r['faiss_cpu_s']:.3f} | {r['faiss_cpu_s'] / r['torch_s']:.2f}x |"
        )
    print(f"\nwritten to {path}")
    return result


if __name__ == "__main__":
    main()
