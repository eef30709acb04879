"""The CPU numbers README.md and docs/knn.md quote, regenerated: runs each example command for seeds 0, 1, 2, aggregates
the metrics of its `all_results.json` (mean, sample std, min / max, the tolerance a rerun must meet) and writes them,
with the exact commands, the package versions and the wall / CPU time per run, to
`benchmarks/results/readme_cpu_numbers.json`; then prints the markdown blocks the docs hold.

    python benchmarks/readme_numbers.py                                   # the kNN-MT examples (default)
    python benchmarks/readme_numbers.py --examples train_realm,finetune_openqa --update_docs

Each example runs with its own `--seed` and the seed of its generated data (they vary together: seed s runs its data
with seed s too), so that the spread covers both. An example that needs another's output (`prune_datastore` sweeps a
`knn_translate` run, `finetune_openqa` starts from a `train_realm` run) gets the run of the same seed. Seed 0 with no
other flag is the command README shows, so a reader who types it reproduces the seed-0 row.

The JSON keeps the entries of examples not run this time, so examples can be (re)measured separately. The markdown
blocks live in the docs between `<!-- readme_numbers:EXAMPLE [metrics=a,b_*,...] -->` and
`<!-- /readme_numbers:EXAMPLE -->`; `--update_docs` rewrites those blocks (metrics= picks the rows shown, by name or
pattern; all by default), and `tests/test_readme_numbers.py` checks that the docs quote exactly what the JSON holds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "readme_cpu_numbers.json"
DOCS = ("README.md", "docs/knn.md")
PACKAGES = ("torch", "transformers", "datasets", "accelerate", "faiss-cpu", "sacrebleu")
SEEDS = (0, 1, 2)
MACHINE = "2-core CPU, no GPU"
# Trainer bookkeeping in all_results.json that is not a result (times and counts vary with the machine)
NOT_METRICS = ("runtime", "per_second", "seconds", "flos", "epoch", "step", "samples", "pairs", "entries", "bytes")


@dataclass(frozen=True)
class Example:
    """One README example command: how seed ``s`` runs it and which numbers of its `all_results.json` are quoted.

    ``args`` are format strings: ``{seed}``, ``{output_dir}`` (this run's) and ``{outputs[NAME]}`` (the same seed's
    run of the example ``NAME`` in ``needs``). ``metrics`` = `None` takes every numeric top-level entry not named in
    `NOT_METRICS`. ``min_tolerance`` is in the metrics' unit (1 point for percentages). ``readme_command`` is the
    command README shows when the bare script is not the seed-0 run (a script whose default `--seed` is not 0).
    """

    script: str
    args: tuple[str, ...]
    metrics: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ()
    unit: str = "%"
    min_tolerance: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    readme_command: str | None = None

    @property
    def command(self) -> str:
        """The command README shows (it is the seed-0 run)."""
        return self.readme_command or f"python {self.script}"


EXAMPLES = {
    "knn_translate": Example(
        "examples/knn_translate.py",
        ("--seed", "{seed}", "--output_dir", "{output_dir}"),
        metrics=("test_base_bleu", "test_knn_bleu", "test_bleu_gain", "dev_base_bleu", "dev_knn_bleu"),
    ),
    "prune_datastore": Example(
        "examples/prune_datastore.py",
        ("--seed", "{seed}", "--knn_dir", "{outputs[knn_translate]}", "--output_dir", "{output_dir}"),
        needs=("knn_translate",),
    ),
    # The REALM world examples (fractions of 1, not percentages)
    "train_realm": Example(
        "examples/train_realm.py",
        ("--seed", "{seed}", "--world_seed", "{seed}", "--output_dir", "{output_dir}"),
        metrics=(
            "eval_masked_span_accuracy",
            "eval_closed_book_span_accuracy",
            "eval_accuracy_ratio_vs_closed_book",
            "eval_retrieval_utility",
            "eval_recall@1",
            "eval_recall@8",
        ),
        unit="",
        min_tolerance=0.05,
        env={"OMP_NUM_THREADS": "1"},
        readme_command="python examples/train_realm.py --seed 0",
    ),
    "finetune_openqa": Example(
        "examples/finetune_openqa.py",
        (
            "--seed",
            "{seed}",
            "--world_seed",
            "{seed}",
            "--realm_checkpoint",
            "{outputs[train_realm]}",
            "--output_dir",
            "{output_dir}",
        ),
        metrics=(
            "eval_exact_match",
            "eval_f1",
            "eval_closed_book_exact_match",
            "eval_recall@5",
            "eval_answer_recall@5",
        ),
        unit="",
        min_tolerance=0.05,
        needs=("train_realm",),
        env={"OMP_NUM_THREADS": "1"},
        readme_command="python examples/finetune_openqa.py --seed 0",
    ),
}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def seed_argv(name: str, seed: int, work_dir: Path) -> list[str]:
    example = EXAMPLES[name]
    outputs = {dep: str(work_dir / dep / f"seed{seed}") for dep in (*example.needs, name)}
    return [a.format(seed=seed, output_dir=outputs[name], outputs=outputs) for a in example.args]


def run_once(name: str, seed: int, work_dir: Path, reuse: bool = False) -> dict:
    """Runs one example for one seed in a child process; returns its metrics, wall and CPU seconds."""
    example = EXAMPLES[name]
    out = REPO / work_dir / name / f"seed{seed}"
    record = out / "readme_run.json"
    if reuse and record.is_file() and (out / "all_results.json").is_file():
        run = json.loads(record.read_text())  # the metrics are picked again: the list may have changed since
        run["metrics"] = select_metrics(example, json.loads((out / "all_results.json").read_text()))
        return run
    argv = [sys.executable, example.script, *seed_argv(name, seed, work_dir)]
    print(f"[{name} seed {seed}] {' '.join(argv[1:])}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, env={**os.environ, **example.env}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    results = json.loads((out / "all_results.json").read_text())
    run = {"seed": seed, "command": " ".join(["python", *argv[1:]]), "wall_seconds": round(wall, 1),
           "cpu_seconds": round(cpu, 1), "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
           "metrics": select_metrics(example, results)}  # fmt: skip
    record.write_text(json.dumps(run, indent=2))
    print(f"[{name} seed {seed}] {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return run


def select_metrics(example: Example, results: dict) -> dict[str, float]:
    if example.metrics is not None:
        missing = [m for m in example.metrics if m not in results]
        if missing:
            raise KeyError(f"{example.script}: all_results.json has no {missing} (has {sorted(results)})")
        return {m: float(results[m]) for m in example.metrics}
    return {
        k: float(v)
        for k, v in results.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not any(s in k for s in NOT_METRICS)
    }


def aggregate(name: str, runs: list[dict], versions: dict[str, str], shared_machine: bool) -> dict:
    """Mean, sample std, min / max and tolerance (max(3 std, min_tolerance)) of every metric over the runs."""
    example = EXAMPLES[name]
    metrics = {}
    for key in runs[0]["metrics"]:
        values = [r["metrics"][key] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        metrics[key] = {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values),
                        "tolerance": max(3 * std, example.min_tolerance), "values": values}  # fmt: skip
    walls, cpus = [r["wall_seconds"] for r in runs], [r["cpu_seconds"] for r in runs]
    return {
        "command": example.command,
        "seed_command": " ".join(["python", example.script, *example.args]),
        "needs": list(example.needs),
        "seeds": [r["seed"] for r in runs],
        "unit": example.unit,
        "tolerance_rule": f"max(3 x sample std over the seeds, {example.min_tolerance:g})",
        "versions": versions,
        "machine": MACHINE + (", shared with other jobs while measured" if shared_machine else ""),
        "wall_seconds": {"mean": statistics.fmean(walls), "min": min(walls), "max": max(walls)},
        "cpu_seconds": {"mean": statistics.fmean(cpus), "min": min(cpus), "max": max(cpus)},
        "metrics": metrics,
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------------

BLOCK = re.compile(r"<!-- readme_numbers:(\w+)(?: metrics=([^ ]+))? -->\n(.*?)<!-- /readme_numbers:\1 -->", re.S)
ROW = re.compile(r"^\| `([^`]+)` \| (-?[\d.]+) ± ([\d.]+) \| (-?[\d.]+) / (-?[\d.]+) \| ([\d.]+) \|$")


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def shown_metrics(entry: dict, metrics: list[str] | None) -> list[str]:
    """The metrics a block shows: all when `None`, else the names or shell patterns (`*_bleu`) given, in order."""
    if metrics is None:
        return list(entry["metrics"])
    shown = [k for pattern in metrics for k in entry["metrics"] if fnmatch.fnmatchcase(k, pattern)]
    missing = [p for p in metrics if not any(fnmatch.fnmatchcase(k, p) for k in entry["metrics"])]
    if missing:
        raise KeyError(f"metrics {missing} match none of {list(entry['metrics'])}")
    return shown


def render(name: str, entry: dict, metrics: list[str] | None = None) -> str:
    """The markdown block of an example: the command, versions and times, then one row per metric."""
    versions = ", ".join(f"{k} {v}" for k, v in entry["versions"].items())
    wall, cpu = entry["wall_seconds"], entry["cpu_seconds"]
    seeds = ", ".join(map(str, entry["seeds"]))
    needs = f" (not counting the {' and '.join(entry['needs'])} run it uses)" if entry["needs"] else ""
    header = (
        f"`{entry['command']}` (seeds {seeds}: `{entry['seed_command']}`), on {versions}. "
        f"Wall time per run{needs} on a {entry['machine']}: {_minutes(wall['mean'])} "
        f"({_minutes(wall['min'])} - {_minutes(wall['max'])}; CPU time {_minutes(cpu['mean'])}). "
        f"Metrics in {'percent' if entry['unit'] == '%' else entry['unit'] or 'the units of all_results.json'}; "
        f"a rerun must land within the tolerance of the mean ({entry['tolerance_rule']})."
    )
    lines = [
        textwrap.fill(header, 119, break_long_words=False, break_on_hyphens=False),
        "",
        "| metric (`all_results.json`) | mean ± std | min / max | tolerance |",
        "|---|---:|---:|---:|",
    ]
    for key in shown_metrics(entry, metrics):
        m = entry["metrics"][key]
        lines.append(f"| `{key}` | {m['mean']:.2f} ± {m['std']:.2f} | {m['min']:.2f} / {m['max']:.2f} | "
                     f"{m['tolerance']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def doc_blocks(text: str) -> list[tuple[str, list[str] | None, str]]:
    """(example, metrics shown or None for all, block body) of every numbers block in a document."""
    return [(m[1], m[2].split(",") if m[2] else None, m[3]) for m in BLOCK.finditer(text)]


def parse_rows(body: str) -> dict[str, tuple[float, ...]]:
    """Metric -> (mean, std, min, max, tolerance) of the table rows of a block."""
    return {m[1]: tuple(map(float, m.groups()[1:])) for m in map(ROW.match, body.splitlines()) if m}


def update_docs(data: dict, names: list[str]) -> list[str]:
    """Rewrites the blocks of ``names`` in the docs; returns the files that hold some (changed or already current)."""
    found = []
    for doc in DOCS:
        path = REPO / doc
        text = path.read_text()

        def fill(m):
            if m[1] not in names:
                return m[0]
            body = render(m[1], data[m[1]], m[2].split(",") if m[2] else None)
            return m[0][: m[0].index("-->") + 4] + body + f"<!-- /readme_numbers:{m[1]} -->"

        new = BLOCK.sub(fill, text)
        if new != text:
            path.write_text(new)
        if any(name in names for name, _, _ in doc_blocks(text)):
            found.append(doc)
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", default="knn_translate,prune_datastore", help=f"Comma-separated, of {list(EXAMPLES)}."
    )
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--work_dir", default="outputs/readme_numbers", help="Where the runs write (under the repo).")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--reuse", action="store_true", help="Keep runs already in work_dir (interrupted sweeps).")
    parser.add_argument("--shared_machine", action="store_true", help="Say that other jobs shared the machine.")
    parser.add_argument("--update_docs", action="store_true", help="Rewrite the numbers blocks of the docs.")
    args = parser.parse_args(argv)
    names = [n for n in args.examples.split(",") if n]
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        raise SystemExit(f"--examples: expected some of {list(EXAMPLES)}, got {unknown}")
    missing = [(n, d) for n in names for d in EXAMPLES[n].needs if d not in names]
    if missing:
        raise SystemExit(f"--examples: {missing[0][0]} needs the runs of {missing[0][1]}; list it too")
    seeds = [int(s) for s in args.seeds.split(",")]
    work_dir = Path(args.work_dir)  # relative to the repository (the runs' working directory), as the JSON quotes it
    if work_dir.is_absolute():
        raise SystemExit(f"--work_dir: expected a path relative to the repository, got {work_dir}")
    output = Path(args.output)
    data = json.loads(output.read_text()) if output.is_file() else {}

    versions = package_versions()
    runs = {n: [] for n in names}
    for seed in seeds:  # the examples of one seed in order, as each may need the one before
        for name in names:
            runs[name].append(run_once(name, seed, work_dir, reuse=args.reuse))
    for name in names:
        data[name] = aggregate(name, runs[name], versions, args.shared_machine)
        if not all(math.isfinite(m["mean"]) for m in data[name]["metrics"].values()):
            raise ValueError(f"{name}: a metric is not finite: {data[name]['metrics']}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")
    for name in names:
        print(f"\n<!-- readme_numbers:{name} -->\n{render(name, data[name])}<!-- /readme_numbers:{name} -->")
    if args.update_docs:
        print(f"\nblocks updated in: {update_docs(data, names) or 'none (no block of these examples in the docs)'}")
    print(f"\nwrote {output}")
    return data


if __name__ == "__main__":
    main()
