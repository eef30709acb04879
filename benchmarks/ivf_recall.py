#!/usr/bin/env python
"""Recall of the IVF search (`"torch-ivf"`) on a saved kNN datastore, against the exact search, for several
``nprobe``: the share of each query's exact top ``k`` entries that IVF returns, and the search time of both.

The queries are ``--num_queries`` of the store's own keys (seeded sample), each with a little noise added
(``--noise`` times the keys' standard deviation), so that a query is not trivially its own nearest entry, as a
decoder state at translation time is near, not on, the states stored from the training pairs.

    python examples/knn_translate.py --output_dir outputs/knn_translate   # any datastore; here the built-in task's
    python benchmarks/ivf_recall.py --datastore outputs/knn_translate/datastore --nprobe 1,4,16,64

Prints a table and writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def main(argv=None) -> dict:
    import numpy as np
    import torch

    from hf_realm import KNNDatastore
    from hf_realm.search import IVFSearchConfig, TorchSearchConfig, ivf_recall

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datastore", required=True)
    p.add_argument("--nlist", type=int, default=None, help="Default: 4 sqrt(entries).")
    p.add_argument("--nprobe", default="1,4,16,64")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--num_queries", type=int, default=1000)
    p.add_argument("--scan", default="query", choices=["query", "union"], help="IVF scan (see IVFSearchConfig)")
    p.add_argument("--batch_size", type=int, default=128, help="queries searched at once (the union scan's batch)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="outputs/ivf_recall.json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = KNNDatastore.from_pretrained(args.datastore, load_index=False)
    if store.keys is None:
        raise ValueError(f"{args.datastore} holds PQ codes, not keys: IVF searches keys")
    keys = torch.from_numpy(np.asarray(store.keys, dtype=np.float32))
    rng = np.random.default_rng(args.seed)
    rows = torch.from_numpy(rng.choice(len(store), size=min(args.num_queries, len(store)), replace=False))
    g = torch.Generator().manual_seed(args.seed)
    queries = keys[rows] + args.noise * keys.std() * torch.randn(len(rows), keys.shape[1], generator=g)
    queries = queries.to(device)

    def timed(backend) -> float:
        backend.search(queries, args.k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            backend.search(queries, args.k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / 3 * 1000

    exact = TorchSearchConfig(device=device).build(store.keys, metric="l2")
    exact_ms = timed(exact)
    table = []
    print(f"{len(store):,} entries x {store.key_dim}, {len(rows)} queries, k={args.k}, {device}")
    print(f"{'nlist':>6s} {'nprobe':>6s} {'recall@k':>9s} {'IVF ms':>8s} {'exact ms':>9s}")
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        start = time.perf_counter()
        ivf = IVFSearchConfig(nlist=args.nlist, nprobe=nprobe, device=device, seed=args.seed, scan=args.scan).build(
            store.keys, metric="l2"
        )
        build_s = time.perf_counter() - start
        recall = ivf_recall(ivf, exact, queries, args.k, batch_size=args.batch_size)
        row = {"nlist": ivf.nlist, "nprobe": ivf.nprobe, "scan": args.scan, "recall": recall}
        row.update({"ivf_ms": timed(ivf), "exact_ms": exact_ms, "build_seconds": build_s})
        table.append(row)
        print(f"{row['nlist']:6d} {row['nprobe']:6d} {row['recall']:9.4f} {row['ivf_ms']:8.2f} {exact_ms:9.2f}")
    result = {
        "datastore": args.datastore,
        "entries": len(store),
        "key_dim": store.key_dim,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "rows": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
