"""Where a datastore build spends its time, against a forward-only pass: host time per stage and device busy time.

Same model and data as `bench_knn_build.py` (Marian size, random weights and ids). Passes, each over the same batches:

- ``forward``: the forward-only pass of `bench_knn_build.py` (blocking copies to the device);
- ``forward_async``: the same with ``non_blocking`` copies, as the build makes them;
- ``build``: `KNNDatastore.build`;
- ``build_nowrite``: the build with `KNNDatastoreWriter.add` made a no-op (the copy back, its wait and the finite
  check still run on the writer thread; nothing is checked, hashed or written);

For every pass: wall ms a batch, and the host ms a batch in each stage (``batch``: `_batch_tensors`; ``forward``: the
model's forward call, i.e. its launches; ``submit``: handing the rows to the writer thread, waits included; on the
writer thread: ``add``: `KNNDatastoreWriter.add`, ``append``: the file writes and hashing within it; ``rest``: the
main thread's wall time outside ``batch``, ``forward`` and ``submit``: slicing the dataset, the gather and the wait at
the end). Then one build
and one forward-only pass run under `torch.profiler` over ``--profile_batches`` batches: device busy ms a batch and the
operations by self host time.

    python benchmarks/profile_knn_build.py                                   # GPU
    python benchmarks/profile_knn_build.py --num_examples 256 --batch_size 32 --d_model 64 --layers 1 \
        --vocab_size 500 --device cpu --dtype float32                        # a CPU smoke run

Prints the tables and writes ``--output`` (text).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "src")]

import torch  # noqa: E402


STAGES = ("batch", "forward", "submit", "add", "append")


def main(argv=None) -> str:
    from bench_knn import marian
    from bench_knn_build import random_pairs

    from hf_realm import KNNDatastore, knn_build
    from hf_realm.knn_build import _batch_tensors, _decoder_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_examples", type=int, default=16384)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab_size", type=int, default=58101)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--profile_batches", type=int, default=32)
    p.add_argument("--rows", type=int, default=25, help="operations per profiler table")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default="benchmarks/results/profile_knn_build.txt")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = marian(args, device, getattr(torch, args.dtype))
    data = random_pairs(args.num_examples, args.length, args.vocab_size)
    batches = -(-args.num_examples // args.batch_size)
    spent: dict[str, float] = defaultdict(float)
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                with torch.profiler.record_function(f"build:{name}"):
                    return fn(*a, **kw)
            finally:
                with lock:
                    spent[name] += time.perf_counter() - start

        return wrapper

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward_call = model.forward

    @contextlib.contextmanager
    def instrumented(nowrite=False):
        with contextlib.ExitStack() as stack:
            patch = stack.enter_context
            patch(mock.patch.object(knn_build, "_batch_tensors", timed("batch", _batch_tensors)))
            patch(mock.patch.object(model, "forward", timed("forward", forward_call)))
            row_writer = knn_build._OrderedRowWriter
            patch(mock.patch.object(row_writer, "submit", timed("submit", row_writer.submit)))
            add = (lambda self, *a, **kw: None) if nowrite else knn_build.KNNDatastoreWriter.add
            patch(mock.patch.object(knn_build.KNNDatastoreWriter, "add", timed("add", add)))
            append = knn_build._NpyAppender.append
            patch(mock.patch.object(knn_build._NpyAppender, "append", timed("append", append)))
            yield

    @torch.no_grad()
    def forward_only(non_blocking=False, limit=None):
        end = args.num_examples if limit is None else min(args.num_examples, limit * args.batch_size)
        for lo in range(0, end, args.batch_size):
            inputs, targets = knn_build._batch_tensors(
                data[lo : lo + args.batch_size], None, True, True, None, None, None, None, model.config.pad_token_id
            )
            inputs = {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
            dec = _decoder_inputs(model, targets.to(device, non_blocking=non_blocking))
            model(**inputs, decoder_input_ids=dec, use_cache=False)

    def build(limit=None):
        subset = data if limit is None else data.select(range(min(len(data), limit * args.batch_size)))
        with tempfile.TemporaryDirectory() as tmp:
            KNNDatastore.build(model, subset, os.path.join(tmp, "store"), batch_size=args.batch_size, progress=False)

    passes = {
        "forward": lambda: forward_only(False),
        "forward_async": lambda: forward_only(True),
        "build": build,
        "build_nowrite": build,
    }
    lines = [f"command: python benchmarks/profile_knn_build.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines.append(f"{dev_name}, torch {torch.__version__}, {args.dtype}, {args.num_examples} pairs x {args.length} "
                 f"tokens, batch {args.batch_size} ({batches} batches); {time.strftime('%Y-%m-%d')}")  # fmt: skip
    forward_only(False, limit=4)  # warm-up
    build(limit=4)
    lines.append("\nms a batch: wall, then host time in each stage (add/append run on the writer thread)")
    lines.append(f"{'pass':<14} {'wall':>7}" + "".join(f" {s:>8}" for s in STAGES) + f" {'rest':>8}")
    for name, run in passes.items():
        with instrumented(nowrite=name == "build_nowrite"):
            spent.clear()
            sync()
            start = time.perf_counter()
            run()
            sync()
            wall = time.perf_counter() - start
        cells = "".join(f" {spent.get(s, 0.0) / batches * 1000:>8.2f}" for s in STAGES)
        rest = wall - sum(spent.get(s, 0.0) for s in ("batch", "forward", "submit"))  # main thread, outside the stages
        lines.append(f"{name:<14} {wall / batches * 1000:>7.2f}{cells} {rest / batches * 1000:>8.2f}")
        print(lines[-1], flush=True)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = []
    for name, run in (("forward", lambda: forward_only(False, args.profile_batches)),
                      ("build", lambda: build(args.profile_batches))):  # fmt: skip
        with instrumented(), torch.profiler.profile(activities=activities) as prof:
            sync()
            start = time.perf_counter()
            run()
            sync()
            wall = time.perf_counter() - start
        averages = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1000
        n = args.profile_batches
        lines.append(f"\nunder the profiler, {name}: wall {wall / n * 1000:.2f} ms a batch, device busy "
                     f"{busy / n:.2f} ms a batch ({busy / (wall * 1000):.0%})")  # fmt: skip
        tables.append(f"\n{name}, by self host time ({n} batches):")
        tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    lines.extend(tables)
    text = "\n".join(lines)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
