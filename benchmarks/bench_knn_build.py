"""kNN-MT datastore build throughput: `KNNDatastore.build` (teacher-forced forward, decoder states captured, streamed
to disk) against a forward-only pass of the same model over the same batches, same run.

Marian-size model (6+6 layers, d_model 512, 8 heads, FFN 2048, vocabulary 58,101; random weights), a pre-tokenised
dataset of random source / target ids (``--num_examples`` pairs of ``--length`` tokens each), ``--batch_size`` pairs a
batch. The forward-only pass does what the build does up to the forward (the same batch tensors, the same decoder
inputs, the same asynchronous copies to the device: blocking ones would make the baseline ~10% slower, see
`profile_knn_build.py`), and nothing after it; both end with a device synchronisation.

    python benchmarks/bench_knn_build.py                                          # GPU
    python benchmarks/bench_knn_build.py --num_examples 64 --batch_size 16 --device cpu --dtype float32   # smoke run
    python benchmarks/bench_knn_build.py --device cpu --dtype float32 --wait_forward_ms 11 --vocab_size 8   # the host side

``--wait_forward_ms`` stands a waiting forward in for the model (see `WaitingModel`): what remains of the build time
is what the build adds to a forward (batch preparation is timed in both passes), on a machine without a GPU.

Each build row also gives the seconds of the commit (hashing, fsync, the swap into place) and of loading the result.
Prints a table and writes ``--output`` (JSON). Target (kNN-MT at scale): build tokens/s >= 0.8 x forward tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from unittest import mock


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "src")]  # bench_knn's model, and this checkout's hf_realm

import torch  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_examples", type=int, default=8192)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab_size", type=int, default=58101)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument(
        "--wait_forward_ms",
        type=float,
        default=0.0,
        help="replace the model by a stand-in whose forward waits this long (a device-bound forward as the host sees "
        "it) and returns fixed d_model states through a real output layer: times everything the build adds to a "
        "forward, on any machine",
    )
    p.add_argument("--output", default="outputs/bench_knn_build.json")
    return p


class WaitingModel(torch.nn.Module):
    """An encoder-decoder stand-in for `--wait_forward_ms`: its forward waits, then sends fixed random states of width
    ``d_model`` through a real `lm_head` (which the build's query hook captures)."""

    def __init__(self, d_model: int, vocab_size: int, wait_ms: float, device, dtype):
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig(is_encoder_decoder=True, pad_token_id=vocab_size - 1,
                                       decoder_start_token_id=vocab_size - 1, vocab_size=vocab_size)  # fmt: skip
        self.lm_head = torch.nn.Linear(d_model, vocab_size, bias=False).to(device, dtype)
        self.wait_s, self.d_model = wait_ms / 1000, d_model
        self._states = None

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, use_cache=False):
        time.sleep(self.wait_s)
        shape = (*decoder_input_ids.shape, self.d_model)
        if self._states is None or self._states.shape != shape:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(0)
            self._states = torch.randn(shape, generator=gen, device=self.lm_head.weight.device).to(
                self.lm_head.weight.dtype
            )
        return self.lm_head(self._states)


def random_pairs(num_examples: int, length: int, vocab_size: int):
    """The benchmark's pre-tokenised data: ``num_examples`` pairs of random source / target ids, ``length`` each."""
    import datasets

    ids = torch.randint(1, vocab_size - 1, (num_examples, 2, length), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids[:, 0].tolist(),
            "attention_mask": [[1] * length] * num_examples,
            "labels": ids[:, 1].tolist(),
        }
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    from bench_knn import marian

    from hf_realm import KNNDatastore, hub_io
    from hf_realm.knn_build import _batch_tensors, _decoder_inputs

    args = make_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if args.wait_forward_ms > 0:
        model = WaitingModel(args.d_model, args.vocab_size, args.wait_forward_ms, device, dtype)
    else:
        model = marian(args, device, dtype)  # the decoding benchmark's model
    config = model.config
    data = random_pairs(args.num_examples, args.length, args.vocab_size)
    tokens = args.num_examples * args.length  # target tokens = datastore entries

    @torch.no_grad()
    def forward_only() -> float:
        sync(device)
        start = time.perf_counter()
        for lo in range(0, args.num_examples, args.batch_size):
            batch = data[lo : lo + args.batch_size]
            inputs, targets = _batch_tensors(batch, None, True, True, None, None, None, None, config.pad_token_id)
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}  # as the build copies them
            dec = _decoder_inputs(model, targets.to(device, non_blocking=True))
            model(**inputs, decoder_input_ids=dec, use_cache=False)
        sync(device)
        return time.perf_counter() - start

    # Where the build's time goes after the last forward: the commit (hash, fsync, swap) and the load of the result.
    phases = {"commit": 0.0, "load": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - start

        return wrapper

    def instrumented():  # the library's classes are patched for the build only, and restored after it
        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch.object(hub_io.Staging, "commit", timed("commit", hub_io.Staging.commit)))
        load = classmethod(timed("load", KNNDatastore.from_pretrained.__func__))
        stack.enter_context(mock.patch.object(KNNDatastore, "from_pretrained", load))
        return stack

    def build() -> tuple[float, int, dict]:
        phases.update(commit=0.0, load=0.0)
        with tempfile.TemporaryDirectory() as tmp:
            sync(device)
            start = time.perf_counter()
            with instrumented():
                store = KNNDatastore.build(model, data, os.path.join(tmp, "store"), batch_size=args.batch_size,
                                           progress=False)  # fmt: skip
            sync(device)
            seconds = time.perf_counter() - start
            return seconds, len(store), dict(phases)

    forward_only()  # warm-up (kernels, allocator)
    rows = []
    for r in range(args.repeats):
        f = forward_only()
        b, n, spent = build()
        if n != tokens:
            raise RuntimeError(f"the build stored {n} entries, expected {tokens}")
        rows.append({"repeat": r, "forward_seconds": f, "build_seconds": b, "forward_tokens_per_s": tokens / f,
                     "build_tokens_per_s": tokens / b, "ratio": f / b, "commit_seconds": spent["commit"],
                     "load_seconds": spent["load"]})  # fmt: skip
    best = {"forward_tokens_per_s": max(x["forward_tokens_per_s"] for x in rows),
            "build_tokens_per_s": max(x["build_tokens_per_s"] for x in rows)}  # fmt: skip
    best["ratio"] = best["build_tokens_per_s"] / best["forward_tokens_per_s"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, "dtype": args.dtype,
        "settings": vars(args), "entries": tokens, "rows": rows, "best": best,
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"{report['device']}, {args.dtype}, {args.num_examples} pairs x {args.length} tokens, batch {args.batch_size}"
    )
    print("repeat  forward tok/s  build tok/s  build/forward  build s  of which commit s  load s")
    for x in rows:
        print(
            f"{x['repeat']:>6}  {x['forward_tokens_per_s']:>13,.0f}  {x['build_tokens_per_s']:>11,.0f}  {x['ratio']:>13.2f}"
            f"  {x['build_seconds']:>7.2f}  {x['commit_seconds']:>16.2f}  {x['load_seconds']:>6.2f}"
        )
    print(
        f"  best  {best['forward_tokens_per_s']:>13,.0f}  {best['build_tokens_per_s']:>11,.0f}  {best['ratio']:>13.2f}"
    )
    return report


if __name__ == "__main__":
    main()
