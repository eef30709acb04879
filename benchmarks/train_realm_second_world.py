"""`examples/train_realm.py` on files of the second generated world (``templates="registry"``: other phrasings, name
shapes and a WordPiece vocabulary trained on the files) through the own-corpus path, and the no-refresh ablation on
the built-in world, over seeds; mean and sample std of the held-out metrics, written to JSON with the commands.

    python benchmarks/train_realm_second_world.py --seeds 0,1,2 --output benchmarks/results/train_realm_second_world_cpu.json

Seed ``s`` writes ``KnowledgeWorld(num_entities=1000, seed=s, templates="registry").write_pretraining_files(dir)`` and
runs ``train_realm.py --corpus_file corpus.jsonl --corpus_title_column title --train_file train.jsonl
--validation_file validation.jsonl --seed s``; ``--ablation`` also runs ``train_realm.py --seed s --world_seed s
--refresh_steps 0`` (the built-in world, index never refreshed). Each run is its own process (1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
METRICS = ("eval_masked_span_accuracy", "eval_closed_book_span_accuracy", "eval_accuracy_ratio_vs_closed_book",
           "eval_retrieval_utility", "eval_recall@1", "eval_recall@8")  # fmt: skip


def run(argv: list[str], out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_realm.py"), *argv, "--output_dir", out,
           "--disable_tqdm", "true"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    return {"command": "python examples/train_realm.py " + " ".join(argv), "wall_seconds": time.time() - start,
            "cpu_seconds": results.get("process_cpu_seconds"), **{m: results[m] for m in METRICS},
            "monitor": results.get("monitor")}  # fmt: skip


def summary(runs: list[dict]) -> dict:
    out = {}
    for m in (*METRICS, "wall_seconds"):
        values = [r[m] for r in runs]
        out[m] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values), "values": values}  # fmt: skip
    return out


def main(argv=None):
    from hf_realm import KnowledgeWorld

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work_dir", default="outputs/train_realm_second_world")
    p.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "results", "train_realm_second_world_cpu.json")
    )
    p.add_argument("--ablation", action="store_true", help="also the built-in world with --refresh_steps 0")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU, no GPU", "runs": {}}
    kinds = ["registry_files"] + (["builtin_norefresh"] if args.ablation else [])
    for kind in kinds:
        runs = []
        for seed in seeds:
            work = os.path.join(args.work_dir, f"{kind}_seed{seed}")
            if kind == "registry_files":
                paths = KnowledgeWorld(num_entities=1000, seed=seed, templates="registry").write_pretraining_files(
                    os.path.join(work, "data")
                )
                argv_ = ["--corpus_file", str(paths["corpus"]), "--corpus_title_column", "title", "--train_file",
                         str(paths["train"]), "--validation_file", str(paths["validation"]), "--seed", str(seed)]  # fmt: skip
            else:
                argv_ = ["--seed", str(seed), "--world_seed", str(seed), "--refresh_steps", "0"]
            runs.append({"seed": seed, **run(argv_, os.path.join(work, "out"))})
            report["runs"][kind] = {"per_seed": runs, "summary": summary(runs)}
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(report, f, indent=2)
            r = runs[-1]
            print(f"{kind} seed {seed}: span acc {r['eval_masked_span_accuracy']:.3f}, closed book "
                  f"{r['eval_closed_book_span_accuracy']:.3f}, recall@8 {r['eval_recall@8']:.3f}, "
                  f"{r['wall_seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
