"""kNN-MT decoding speed: generate() tokens/s with the kNN processor over tokens/s without, same model, same run.

Marian-size model (6+6 layers, d_model 512, 8 heads, FFN 2048, vocabulary 58,101; random weights), batch 32, beam 4,
exactly 64 new tokens (min = max), datastores of random float16 keys (1M and 10M x 512 by default) searched exactly on
the GPU (`KNNDatastore` torch index -> `hf_realm.search.exact_topk`). Also times one search of `batch x beam` queries
alone and gives its memory roofline (reading the keys once at the measured HBM bandwidth) and the fraction of it the
search reaches.

Several search configs are timed on the same store, each against a base run timed next to it (`--configs`, separated
by `;`, each `name[:field=value,...]` of a search backend config): e.g. `torch` (exact, the default),
`torch:rescore=0` (the fast pass's top k without the exactness proof, so without a host synchronisation per step),
`torch-ivf:nprobe=8` (inverted lists; its recall against exact search is measured on the same queries).

`--key_dim 128` gives the store the layout of a PCA-compressed one (`hf_realm.knn_compression.pca_compress`): keys of
128 dimensions and a 512 x 128 projection applied to every query. The keys are random, so such a row measures speed
only; what the compression keeps of the BLEU gain is measured on real data by `knn_mt_experiment.py`.

    python benchmarks/bench_knn.py                       # 1M and 10M entries (10M needs ~11 GB of GPU memory)
    python benchmarks/bench_knn.py --sizes 10000000 --configs "torch;torch:rescore=0;torch-ivf:nprobe=8,scan=union"
    python benchmarks/bench_knn.py --sizes 10000000,100000000 --key_dim 128 --configs "torch:rescore=0"
    python benchmarks/bench_knn.py --sizes 100000 --batch_size 4 --new_tokens 8 --device cpu   # a CPU smoke run

`--cuda_graph 1` runs the processor with `cuda_graph=True` (the step's search and mixing replayed as one CUDA graph;
configs whose search syncs with the host fall back with a warning); `--cuda_graph 2` times every config both ways.

Each row also gives the host time (Python and kernel launches) of one processor call during the timed kNN runs, and of
one search alone: the base step is host-bound, so what the host spends in the kNN step adds to it.

Prints a table last and writes `--output` (JSON). Targets (issue 6): >= 0.8x of base speed at 1M, >= 0.5x at 10M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, MarianConfig, MarianMTModel

from hf_realm import KNNDatastore, KNNLogitsProcessor


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000", help="datastore sizes (comma separated)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--source_length", type=int, default=32)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab_size", type=int, default=58101)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--compare_torch_search", type=int, default=1, help="also time exact_topk's torch path (GPU)")
    p.add_argument(
        "--index", default="torch", choices=["torch", "torch-ivf", "sharded"],
        help="torch: exact; torch-ivf: inverted lists (--nlist, --nprobe), recall against exact reported; sharded: "
        "the keys split over the processes of `accelerate launch` (exact inner search, one all-gather a search)",
    )  # fmt: skip
    p.add_argument("--nlist", type=int, default=None, help="torch-ivf lists (default 4 sqrt(n))")
    p.add_argument("--nprobe", type=int, default=32, help="torch-ivf lists read per query")
    p.add_argument(
        "--configs", default=None,
        help="search configs timed on the same store, `;`-separated `name[:field=value,...]` (overrides --index)",
    )  # fmt: skip
    p.add_argument(
        "--key_dim", type=int, default=None, help="PCA layout: keys of this dim + a d_model x key_dim projection"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the keys, values and projection")
    p.add_argument("--cuda_graph", type=int, default=0, choices=[0, 1, 2],
                   help="KNNLogitsProcessor(cuda_graph=...): 0 off, 1 on, 2 each config timed both ways")  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument("--output", default="outputs/bench_knn.json")
    return p


def marian(args, device, dtype) -> MarianMTModel:
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model, max_position_embeddings=512, pad_token_id=args.vocab_size - 1,
        decoder_start_token_id=args.vocab_size - 1, eos_token_id=0, forced_eos_token_id=None,
    )  # fmt: skip
    return MarianMTModel(config).to(device, dtype).eval()


def random_store(
    n: int, dim: int, vocab: int, device: torch.device, key_dim: int | None = None, seed: int = 0
) -> KNNDatastore:
    """Random N(0, 1) float16 keys generated on the device in chunks (fast), values uniform over the vocabulary.

    With ``key_dim`` the store has a PCA-compressed store's layout: ``key_dim``-dimensional keys and a ``dim x
    key_dim`` projection with orthonormal columns (no bias), applied to the queries."""
    width = key_dim or dim
    keys = np.empty((n, width), dtype=np.float16)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, 1 << 20):
        m = min(1 << 20, n - start)
        keys[start : start + m] = (
            torch.randn((m, width), generator=gen, device=device, dtype=torch.float16).cpu().numpy()
        )
    values = np.random.default_rng(seed).integers(0, vocab - 1, n).astype(np.int32)
    projection = None
    if key_dim is not None:
        q, _ = torch.linalg.qr(torch.randn(dim, key_dim, generator=torch.Generator().manual_seed(seed)))
        projection = {"matrix": q.float().numpy(), "bias": np.zeros(key_dim, dtype=np.float32)}
    return KNNDatastore(keys=keys, values=values, projection=projection)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostTimed(LogitsProcessor):
    """Forwards to ``processor`` and adds up the host seconds spent in its calls (kernel launches and Python; on a GPU
    the processor does not wait for the device, apart from its finiteness check every ``check_finite_every`` steps)."""

    def __init__(self, processor):
        self.processor, self.seconds, self.calls = processor, 0.0, 0

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def host_ms(self) -> float | None:
        return self.seconds / self.calls * 1000 if self.calls else None


def _generate_seconds(model, inputs, args, device, processor=None) -> float:
    lp = LogitsProcessorList([processor]) if processor is not None else None
    kw = dict(num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False, logits_processor=lp)  # fmt: skip
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(**inputs, **kw)
    sync(device)
    assert out.shape[1] == args.new_tokens + 1, out.shape
    return time.perf_counter() - t0


def time_generate(model, inputs, args, device, processor=None) -> float:
    """Median seconds of ``--repeats`` generate calls after a warm-up."""
    _generate_seconds(model, inputs, args, device, processor)  # warm-up
    return float(np.median([_generate_seconds(model, inputs, args, device, processor) for _ in range(args.repeats)]))


def time_pairs(model, inputs, args, device, processor) -> dict:
    """Base and kNN generate timed alternately (base, kNN, base, kNN, ...; ``--repeats`` pairs after a warm-up pair),
    so that both see the same host and GPU clocks: the base step is host-bound (Python launching small kernels) and
    its time drifts by tens of percent between minutes on a shared host. Returns the medians and the per-pair ratios
    base / kNN."""
    _generate_seconds(model, inputs, args, device)
    _generate_seconds(model, inputs, args, device, processor)
    timed = HostTimed(processor)
    base, knn = [], []
    for _ in range(args.repeats):
        base.append(_generate_seconds(model, inputs, args, device))
        knn.append(_generate_seconds(model, inputs, args, device, timed))
    ratios = [b / k for b, k in zip(base, knn, strict=True)]
    return {
        "base_s": float(np.median(base)),
        "knn_s": float(np.median(knn)),
        "ratios": ratios,
        "processor_host_ms": timed.host_ms(),
    }


def hbm_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def index_config(args, device):
    """The search backend config of ``--index``."""
    from hf_realm.search import IVFSearchConfig, ShardedSearchConfig, TorchSearchConfig

    if args.index == "torch-ivf":
        return IVFSearchConfig(nlist=args.nlist, nprobe=args.nprobe, device=device)
    if args.index == "sharded":
        return ShardedSearchConfig(inner=TorchSearchConfig(device=device))
    return TorchSearchConfig(device=device)


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_configs(text: str, device) -> list:
    """``"torch;torch:rescore=0;torch-ivf:nprobe=8,nlist=4096"`` -> search backend configs on ``device``."""
    import dataclasses

    from hf_realm.search import BACKENDS

    configs = []
    for spec in (part.strip() for part in text.split(";")):
        if not spec:
            continue
        name, _, fields = spec.partition(":")
        if name not in BACKENDS:
            raise ValueError(f"unknown search backend {name!r} in --configs; expected one of {sorted(BACKENDS)}")
        cls = BACKENDS[name]
        known = {f.name: f for f in dataclasses.fields(cls)}
        options = {}
        for item in (x for x in fields.split(",") if x):
            key, eq, value = item.partition("=")
            if not eq or key not in known:
                raise ValueError(
                    f"{item!r} in --configs: expected field=value with a field of {cls.__name__} {sorted(known)}"
                )
            value = _value(value)
            options[key] = bool(value) if isinstance(known[key].default, bool) else value
        if "device" in known:
            options.setdefault("device", device)
        configs.append(cls(**options))
    if not configs:
        raise ValueError("--configs names no search config")
    return configs


def config_label(config) -> str:
    """A short name of a config for the table: its name and the fields set away from their defaults."""
    import dataclasses

    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if f.name != "device" and getattr(config, f.name) != f.default
    ]
    return config.name + (f":{','.join(changed)}" if changed else "")


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    rank = 0
    if args.index == "sharded":
        from accelerate import PartialState

        state = PartialState(cpu=args.device == "cpu")
        rank = state.process_index
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{state.local_process_index}"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    configs = parse_configs(args.configs, device) if args.configs else [index_config(args, device)]
    graph_modes = {0: [False], 1: [True], 2: [False, True]}[args.cuda_graph]
    model = marian(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, args.vocab_size - 1, (args.batch_size, args.source_length), generator=gen)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    new_tokens = args.batch_size * args.new_tokens
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; model dtype {dtype}", flush=True)

    base_s = time_generate(model, inputs, args, device)
    base_tps = new_tokens / base_s
    print(f"base generate: {base_s * 1000:.1f} ms -> {base_tps:.0f} tokens/s", flush=True)
    bandwidth = hbm_bandwidth(device)
    key_dim = args.key_dim or args.d_model
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        t0 = time.perf_counter()
        store = random_store(n, args.d_model, args.vocab_size, device, args.key_dim, args.seed)
        print(f"store {n:,} x {key_dim}: made in {time.perf_counter() - t0:.1f}s", flush=True)
        queries = torch.randn(args.batch_size * args.num_beams, args.d_model, device=device, dtype=dtype)
        exact_ids = None
        for config in configs:
            label = config_label(config)
            t0 = time.perf_counter()
            store.build_index(config, device=device)
            build_s = time.perf_counter() - t0
            config_recall = {}  # the same for every graph mode
            for graph in graph_modes:
                processor = KNNLogitsProcessor(store, k=args.k, temperature=10.0, lmbda=0.5, cuda_graph=graph)
                row_label = label + (" +graph" if graph else "")
                with processor.attach(model, check_weights=False):
                    timed = time_pairs(model, inputs, args, device, processor)
                base_s, knn_s, ratios = timed["base_s"], timed["knn_s"], timed["ratios"]
                torch_s = None
                if args.compare_torch_search and device.type == "cuda" and config.name == "torch":
                    # the same run with exact_topk's chunked torch path (no fused Triton kernel)
                    os.environ["HF_REALM_DISABLE_TRITON"] = "1"
                    try:
                        with processor.attach(model, check_weights=False):
                            torch_s = time_generate(model, inputs, args, device, processor)
                    finally:
                        os.environ.pop("HF_REALM_DISABLE_TRITON", None)
                _, ids = store.search(queries, args.k)
                if exact_ids is None and config.name == "torch" and config.rescore:
                    exact_ids = ids
                recall = config_recall.get("recall")
                if recall is not None:
                    pass
                elif config.name == "torch-ivf":  # against an exact search of the same keys, same queries
                    from hf_realm.search import TorchSearchConfig, ivf_recall

                    exact = TorchSearchConfig(device=device).build(store.keys, metric="l2")
                    recall = ivf_recall(store._search_backend(device), exact, store.project(queries), args.k)
                    del exact
                elif exact_ids is not None:
                    hits = [
                        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.cpu(), exact_ids.cpu(), strict=True)
                    ]
                    recall = sum(hits) / ids.numel()
                config_recall["recall"] = recall
                sync(device)
                t0 = time.perf_counter()
                for _ in range(20):
                    store.search(queries, args.k)
                search_host_ms = (time.perf_counter() - t0) / 20 * 1000  # launching (and any host sync inside)
                sync(device)
                search_ms = (time.perf_counter() - t0) / 20 * 1000
                key_bytes = n * key_dim * 2
                roofline_ms = key_bytes / bandwidth * 1000 if bandwidth else None
                row = {
                    "entries": n,
                    "key_dim": key_dim,
                    "key_bytes": key_bytes,
                    "config": row_label,
                    "cuda_graph": graph,
                    "index_config": config.to_dict(),
                    "build_index_seconds": build_s,
                    "base_tokens_per_second": new_tokens / base_s,
                    "knn_tokens_per_second": new_tokens / knn_s,
                    "ratio": float(np.median(ratios)),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "ratios": ratios,
                    "knn_torch_search_tokens_per_second": new_tokens / torch_s if torch_s else None,
                    "ratio_torch_search": base_s / torch_s if torch_s else None,
                    "base_ms_per_step": base_s / args.new_tokens * 1000,
                    "knn_ms_per_step": knn_s / args.new_tokens * 1000,
                    "search_ms": search_ms,
                    "search_host_ms": search_host_ms,
                    "processor_host_ms": timed["processor_host_ms"],
                    "search_roofline_ms": roofline_ms,
                    # the roofline reads every key once; an IVF search reads only its probed lists, so the fraction
                    # would exceed 1 and mean nothing: its rows give the speed-up over that full read instead
                    "hbm_fraction": roofline_ms / search_ms if roofline_ms and config.name != "torch-ivf" else None,
                    "full_read_speedup": roofline_ms / search_ms
                    if roofline_ms and config.name == "torch-ivf"
                    else None,
                    "index": config.name,
                    "recall_vs_exact": recall,
                }
                rows.append(row)
                recall_text = f"; recall@{args.k} vs exact {recall:.3f}" if recall is not None else ""
                print(f"  {row_label}: kNN generate {knn_s * 1000:.1f} ms vs base {base_s * 1000:.1f} ms "
                      f"({row['ratio']:.2f}x, pairs {row['ratio_min']:.2f}-{row['ratio_max']:.2f}); one search "
                      f"{search_ms:.2f} ms{recall_text}", flush=True)  # fmt: skip
                del processor
        del store, exact_ids
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {
        "device": device_name,
        "torch": torch.__version__,
        "model": f"Marian {args.layers}+{args.layers} layers, d_model {args.d_model}, vocab {args.vocab_size}, {dtype}",
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "new_tokens": args.new_tokens,
        "k": args.k,
        "key_dim": key_dim,
        "keys": "random N(0, 1) float16"
        + (f", PCA layout (projection {args.d_model} x {key_dim})" if args.key_dim else ""),
        "hbm_bytes_per_second": bandwidth,
        "rows": rows,
        "index": configs[0].to_dict(),
        "num_processes": int(os.environ.get("WORLD_SIZE", "1")),
        "command": "python benchmarks/bench_knn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if rank != 0:  # every process of a sharded run times the same generate; the first one reports
        return result
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print()
    print(f"kNN-MT decoding speed on {device_name} (batch {args.batch_size}, beam {args.num_beams}, "
          f"{args.new_tokens} new tokens, k={args.k}, keys {key_dim}-d fp16, search on {device.type})")  # fmt: skip
    print("| entries | search config | base tok/s | kNN tok/s | kNN / base [pair range] | kNN / base (torch search) | ms/step base "
          "| ms/step kNN | search ms | roofline ms | HBM fraction | recall vs exact | host ms: processor / search |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        roof = f"{r['search_roofline_ms']:.2f}" if r["search_roofline_ms"] else "-"
        frac = f"{r['hbm_fraction']:.2f}" if r["hbm_fraction"] else "-"
        if r.get("full_read_speedup"):  # IVF: reads its probed lists only
            frac = f"- ({r['full_read_speedup']:.2f}x a full read)"
        tr = f"{r['ratio_torch_search']:.2f}x" if r["ratio_torch_search"] else "-"
        rec = "-" if r["recall_vs_exact"] is None else f"{r['recall_vs_exact']:.3f}"
        print(f"| {r['entries']:,} | {r['config']} | {r['base_tokens_per_second']:.0f} | {r['knn_tokens_per_second']:.0f} | "
              f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {tr} | {r['base_ms_per_step']:.2f} | {r['knn_ms_per_step']:.2f} | "
              f"{r['search_ms']:.2f} | {roof} | {frac} | {rec} | {_ms(r['processor_host_ms'])} / {_ms(r['search_host_ms'])} |")  # fmt: skip
    print(f"JSON: {args.output}")
    return result


if __name__ == "__main__":
    main()
