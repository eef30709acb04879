"""Multi-process REALM (accelerate / torch.distributed): sharded refresh, sharded search, DDP pretraining steps.

Run once per process count, then compare (the second run reads the first one's JSON for the scaling efficiency)::

    accelerate launch --num_processes 1 benchmarks/bench_distributed.py --num_blocks 2000000 --output_dir $OUT
    NCCL_NVLS_ENABLE=0 accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_distributed.py \\
        --num_blocks 2000000 --output_dir $OUT --baseline $OUT/bench_distributed_n1.json
    accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_distributed.py --tiny --cpu   # gloo smoke run

Every rank builds the same synthetic corpus (``--num_blocks`` blocks of 288 random token ids, see
`bench_refresh.py`) and the same BERT-base-size `RealmForMaskedLM` (one seed). Measured:

1. **refresh**: `embed_corpus` with ``gather=False``: rank ``r`` embeds its contiguous block range (bf16 weights),
   timed from a barrier to the slowest rank; then the all-gather that gives every rank the whole index (replicated
   search). blocks/s = num_blocks / (embed seconds), per GPU = that / N.
2. **search**: for ``--num_queries`` random queries, the sharded search (each rank its shard, distributed top-k
   merge, `sharded_search`) and the replicated search (`exact_topk` over the gathered matrix), each compared
   with a float64 brute force over the whole matrix on rank 0: ids must be equal.
3. **pretraining steps**: DDP over `RealmForMaskedLM` (retrieval from the replicated index, k candidates re-embedded
   with gradients), ``--batch_size`` queries per rank, bf16 autocast; steps/s and queries/s over all ranks.

Writes ``bench_distributed_n{N}.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(_HERE, "..", "src")]  # the benchmarks' helpers, and this checkout's hf_realm

from bench_pretraining import corpus_dataset  # noqa: E402
from bench_refresh import make_config, synthetic_tokens  # noqa: E402

from hf_realm import RealmBlockIndex, RealmConfig, RealmForMaskedLM, embed_corpus, shard_range, sharded_search  # noqa: E402  # noqa: E402
from hf_realm.search import exact_topk  # noqa: E402
from hf_realm.search.sharded import gather_shards  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = {"num_blocks": 2_000_000, "seq_len": 288, "refresh_batch_size": 512, "num_queries": 64, "k": 8,
             "query_len": 64, "steps": 10, "warmup": 3}  # fmt: skip
    for name, default in sizes.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--batch_size", type=int, default=8, help="pretraining queries per rank")
    p.add_argument("--baseline", default=None, help="the N=1 run's JSON, for the scaling efficiency")
    p.add_argument("--tiny", action="store_true", help="a tiny model and corpus (CPU / gloo smoke run)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even where a GPU is present")
    p.add_argument("--output_dir", default=os.environ.get("OUT", "bench_out"))
    return p.parse_args(argv)


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    args = parse_args(argv)
    if args.tiny:
        args.num_blocks, args.seq_len, args.query_len, args.steps, args.refresh_batch_size = 3001, 32, 16, 3, 64
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision="bf16" if torch.cuda.is_available() and not args.tiny else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()

    config = RealmConfig(**{**make_config(args.tiny).to_dict(), "num_candidates": args.k, "pad_token_id": 0})
    torch.manual_seed(0)
    model = RealmForMaskedLM(config).to(device)
    tokens = synthetic_tokens(args.num_blocks, args.seq_len, 1.0, config.vocab_size, 0)

    # 1. refresh, sharded; a short warm-up first (kernels, allocator)
    warm = synthetic_tokens(min(args.num_blocks, 4 * args.refresh_batch_size), args.seq_len, 1.0, config.vocab_size, 1)
    embed_corpus(
        model.embedder, warm, batch_size=args.refresh_batch_size, accelerator=accelerator, show_progress=False
    )
    sync()
    start = time.perf_counter()
    local = embed_corpus(
        model.embedder,
        tokens,
        batch_size=args.refresh_batch_size,
        accelerator=accelerator,
        gather=False,
        output_device=None,
        output_dtype=torch.float16,
        show_progress=rank == 0,
    )
    sync()
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    full = gather_shards(local, args.num_blocks, world) if world > 1 else local
    sync()
    gather_seconds = time.perf_counter() - start

    # 2. search: sharded (distributed top-k merge) and replicated, against a float64 brute force
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(args.num_queries, config.retriever_proj_size, generator=g).to(device, torch.float16)
    shard_start, _ = shard_range(args.num_blocks, rank, world)
    sync()
    start = time.perf_counter()
    _, sharded_ids = sharded_search(queries, local, args.k, shard_start=shard_start, accelerator=accelerator)
    sync()
    sharded_ms = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    _, replicated_ids = exact_topk(queries, full, args.k)
    sync()
    replicated_ms = 1000 * (time.perf_counter() - start)
    search = {"sharded_ms": sharded_ms, "replicated_ms": replicated_ms}
    if rank == 0:
        ref = queries.double().cpu() @ full.double().cpu().T
        ref_scores, ref_ids = ref.topk(args.k, dim=1)
        for name, ids in (("sharded", sharded_ids.cpu()), ("replicated", replicated_ids.cpu())):
            search[f"{name}_ids_equal_float64"] = bool(torch.equal(ids, ref_ids))
            # equal up to exact ties: the float64 scores of the returned ids are the float64 top-k scores
            search[f"{name}_max_score_gap_float64"] = float((ref.gather(1, ids) - ref_scores).abs().max())
        search["sharded_equal_replicated"] = bool(torch.equal(sharded_ids.cpu(), replicated_ids.cpu()))
        search["score_scale"] = float(ref_scores.abs().max())

    # 3. DDP pretraining steps over the replicated index
    model.index = RealmBlockIndex(corpus_dataset(tokens), full.float().cpu(), backend="torch", device=device)
    model.index._tokens = tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(5, config.vocab_size, (args.batch_size, args.query_len), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    labels = torch.full_like(input_ids, -100)
    labels[:, 5:9] = input_ids[:, 5:9]
    input_ids[:, 5:9] = 4
    batch = {"input_ids": input_ids.to(device), "labels": labels.to(device)}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            start = time.perf_counter()
        loss = ddp_model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    step_seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    if rank != 0:
        return None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_processes": world,
        "backend": torch.distributed.get_backend() if world > 1 else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else "BERT-base size (12 layers, 768, 12 heads), shared embedder + encoder",
        "num_blocks": args.num_blocks,
        "seq_len": args.seq_len,
        "refresh": {
            "embed_seconds": embed_seconds,
            "gather_seconds": gather_seconds,
            "blocks_per_s": args.num_blocks / embed_seconds,
            "blocks_per_s_per_process": args.num_blocks / embed_seconds / world,
            "blocks_per_s_with_gather": args.num_blocks / (embed_seconds + gather_seconds),
            "hours_for_13.35M_blocks": 13_353_718 / (args.num_blocks / embed_seconds) / 3600,
        },
        "search": search,
        "pretraining": {
            "batch_size_per_process": args.batch_size,
            "steps_per_s": 1 / step_seconds,
            "queries_per_s": world * args.batch_size / step_seconds,
            "peak_gib": peak,
        },
    }
    if args.baseline:
        with open(args.baseline) as f:
            base = json.load(f)
        result["baseline"] = {"file": os.path.basename(args.baseline), "num_processes": base["num_processes"]}
        scale = world / base["num_processes"]
        result["refresh_scaling_efficiency"] = result["refresh"]["blocks_per_s"] / (
            scale * base["refresh"]["blocks_per_s"]
        )
        result["pretraining_scaling_efficiency"] = result["pretraining"]["queries_per_s"] / (
            scale * base["pretraining"]["queries_per_s"]
        )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"bench_distributed_n{world}.json"), "w") as f:
        json.dump(result, f, indent=2)
    r, s, t = result["refresh"], result["search"], result["pretraining"]
    print(f"\nREALM on {world} x {result['device']} ({result['date']}), {result['model']}, {args.num_blocks:,} blocks")
    print(f"{'what':<44} {'value':>14}")
    print(f"{'refresh: embed (sharded), s':<44} {r['embed_seconds']:>14.1f}")
    print(
        f"{'refresh: blocks/s (all) / per process':<44} {r['blocks_per_s']:>7.0f} / {r['blocks_per_s_per_process']:.0f}"
    )
    print(f"{'refresh: all-gather, s':<44} {r['gather_seconds']:>14.2f}")
    print(f"{'search: sharded / replicated, ms':<44} {s['sharded_ms']:>7.1f} / {s['replicated_ms']:.1f}")
    print(f"{'search: ids equal float64 (sharded, replicated)':<44} "
          f"{s['sharded_ids_equal_float64']!s:>7} / {s['replicated_ids_equal_float64']}")  # fmt: skip
    print(f"{'search: max float64 score gap to exact top-k':<44} "
          f"{s['sharded_max_score_gap_float64']:>7.1e} / {s['replicated_max_score_gap_float64']:.1e}")  # fmt: skip
    print(f"{'pretraining: steps/s, queries/s (all ranks)':<44} {t['steps_per_s']:>7.2f} / {t['queries_per_s']:.1f}")
    for key in ("refresh_scaling_efficiency", "pretraining_scaling_efficiency"):
        if key in result:
            print(f"{key + ' vs ' + result['baseline']['file']:<44} {result[key]:>14.3f}")
    return result


if __name__ == "__main__":
    main()
