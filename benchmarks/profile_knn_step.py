"""Where a kNN decoding step spends its time: host (Python, launches) and device, per operation, under torch's profiler.

Same model and store as `bench_knn.py` (Marian size, random weights; random keys, `--key_dim` for the PCA layout).
One `generate()` with the kNN processor runs under `torch.profiler`, after a warm-up; the tables give, per operation,
the host time spent launching it and the device time it took. With `record_function` ranges the processor's own
share (`knn:processor`, inside it `knn:search`) is split from the model's forward and beam search.
The profiler slows the host, so the absolute numbers are above `bench_knn.py`'s; the shares are what it is for.

    python benchmarks/profile_knn_step.py --num_keys 10000000 --key_dim 128 --config "torch:rescore=0"
    python benchmarks/profile_knn_step.py --num_keys 20000 --d_model 64 --layers 1 --vocab_size 500 --batch_size 2 \
        --new_tokens 4 --device cpu          # a CPU smoke run

Prints the tables and writes `--output` (text).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_knn  # noqa: E402

from hf_realm import KNNLogitsProcessor  # noqa: E402


class Ranged(KNNLogitsProcessor):
    """The processor with profiler ranges around the search and the mixing."""

    def __call__(self, input_ids, scores):
        with torch.profiler.record_function("knn:processor"):
            return super().__call__(input_ids, scores)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_keys", type=int, default=10_000_000)
    parser.add_argument("--key_dim", type=int, default=None)
    parser.add_argument("--config", default="torch:rescore=0", help="one search config, as in bench_knn.py --configs")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--source_length", type=int, default=32)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=58101)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=30, help="operations per table")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="benchmarks/results/profile_knn_step.txt")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    args.repeats = 1
    model = bench_knn.marian(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, args.vocab_size - 1, (args.batch_size, args.source_length), generator=gen)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    store = bench_knn.random_store(args.num_keys, args.d_model, args.vocab_size, device, args.key_dim, args.seed)
    (config,) = bench_knn.parse_configs(args.config, device)
    store.build_index(config, device=device)
    search = store.search

    def ranged_search(*a, **kw):
        with torch.profiler.record_function("knn:search"):
            return search(*a, **kw)

    store.search = ranged_search
    processor = Ranged(store, k=args.k, temperature=10.0, lmbda=0.5)
    kw = dict(num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False)  # fmt: skip
    lines = [f"command: python benchmarks/profile_knn_step.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    with processor.attach(model, check_weights=False):
        for lp in (None, LogitsProcessorList([processor])):  # warm-up (compiles, tunes)
            model.generate(**inputs, **kw, logits_processor=lp)
        for name, lp in (("base", None), ("knn", LogitsProcessorList([processor]))):
            bench_knn.sync(device)
            t0 = time.perf_counter()
            model.generate(**inputs, **kw, logits_processor=lp)
            bench_knn.sync(device)
            lines.append(
                f"{name} generate (no profiler): {(time.perf_counter() - t0) / args.new_tokens * 1000:.2f} ms/step"
            )
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            model.generate(**inputs, **kw, logits_processor=LogitsProcessorList([processor]))
            bench_knn.sync(device)
    averages = prof.key_averages()
    steps = args.new_tokens
    for event in averages:
        if event.key in ("knn:processor", "knn:search"):
            lines.append(
                f"{event.key} per step: host {event.cpu_time_total / event.count / 1000:.3f} ms "
                f"({event.count} calls), device {getattr(event, 'device_time_total', 0) / max(1, event.count) / 1000:.3f} ms"
            )
    lines.append(f"steps: {steps}; config {bench_knn.config_label(config)}; {args.num_keys:,} keys; device {device}")
    sort_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append("\nby self device time:")
    lines.append(averages.table(sort_by=sort_device, row_limit=args.rows))
    lines.append("\nby self host time:")
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    text = "\n".join(lines)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
