"""The CPU numbers README.md and docs/knn.md quote are those of benchmarks/results/readme_cpu_numbers.json (fast), and
rerunning the default example commands gives them back within the stated tolerance (slow)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _load(relpath: str):
    sys.path.insert(0, str(REPO / Path(relpath).parent))
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
    spec.loader.exec_module(module)
    return module


numbers = _load("benchmarks/readme_numbers.py")
DATA = json.loads(numbers.RESULTS.read_text())
KNN_EXAMPLES = ("knn_translate", "prune_datastore")


@pytest.mark.parametrize("doc", numbers.DOCS)
def test_docs_quote_exactly_the_json(doc):
    """Every numbers block of the doc: its rows parse back to the JSON's mean / std / min / max / tolerance, and the
    whole block (command, versions, machine, times) is what the script renders from the JSON."""
    blocks = numbers.doc_blocks((REPO / doc).read_text())
    assert blocks, f"{doc} has no readme_numbers block"
    for name, shown, body in blocks:
        assert name in DATA, f"{doc} quotes {name}, which readme_cpu_numbers.json does not hold"
        entry = DATA[name]
        rows = numbers.parse_rows(body)
        assert list(rows) == numbers.shown_metrics(entry, shown), (doc, name)
        for key, quoted in rows.items():
            m = entry["metrics"][key]
            expected = tuple(round(m[f], 2) for f in ("mean", "std", "min", "max", "tolerance"))
            assert quoted == pytest.approx(expected, abs=1e-9), (doc, name, key)
        assert body == numbers.render(name, entry, shown), f"{doc}: rerun readme_numbers.py --update_docs ({name})"


def test_readme_quotes_the_knn_examples_with_their_commands():
    readme = (REPO / "README.md").read_text()
    quoted = {name for name, _, _ in numbers.doc_blocks(readme)}
    assert set(KNN_EXAMPLES) <= quoted
    for name in KNN_EXAMPLES:
        assert DATA[name]["command"] == f"python examples/{name}.py"
        assert f"{DATA[name]['command']}  " in readme or f"{DATA[name]['command']}\n" in readme  # the command block


@pytest.mark.parametrize("name", list(DATA))
def test_json_entry_is_complete_and_consistent(name):
    """Versions, machine, three seeds, and statistics that are those of the per-seed values it lists."""
    entry = DATA[name]
    assert set(entry["versions"]) == {"python", *numbers.PACKAGES}
    assert entry["machine"].startswith(numbers.MACHINE)
    assert entry["seeds"] == [0, 1, 2] and [r["seed"] for r in entry["runs"]] == entry["seeds"]
    example = numbers.EXAMPLES[name]
    for run in entry["runs"]:
        assert run["command"] == " ".join(["python", example.script, *numbers.seed_argv(name, run["seed"],
                                                                                          Path("outputs/readme_numbers"))])  # fmt: skip
        assert run["wall_seconds"] > 0 and run["cpu_seconds"] > 0
    assert entry["wall_seconds"]["mean"] == pytest.approx(statistics.fmean(r["wall_seconds"] for r in entry["runs"]))
    for key, m in entry["metrics"].items():
        values = [r["metrics"][key] for r in entry["runs"]]
        assert m["values"] == values
        assert m["mean"] == pytest.approx(statistics.fmean(values))
        assert m["std"] == pytest.approx(statistics.stdev(values))
        assert (m["min"], m["max"]) == (min(values), max(values))
        assert m["tolerance"] == pytest.approx(max(3 * m["std"], example.min_tolerance))


def test_seed_zero_is_the_default_command():
    """README shows the commands without flags: their defaults must be the seed-0 runs of the JSON."""
    knn_translate = _load("examples/knn_translate.py")
    prune = _load("examples/prune_datastore.py")
    assert knn_translate.RunArguments().seed == 0
    assert prune.PruneArguments().seed == 0
    assert prune.PruneArguments().knn_dir == knn_translate.RunArguments().output_dir  # sweeps the default run
    argv = numbers.seed_argv("prune_datastore", 2, Path("w"))
    assert argv == ["--seed", "2", "--knn_dir", "w/knn_translate/seed2", "--output_dir", "w/prune_datastore/seed2"]


def test_prune_all_results_are_percentages():
    prune = _load("examples/prune_datastore.py")
    results = {
        "base": {"bleu": 70.0},
        "sweep": {
            "full": {"bleu": 90.0, "gain_kept": 1.0},
            "random@0.5": {"bleu": 85.0, "gain_kept": 0.75},
            "pq8": {"bleu": 60.0, "gain_kept": -0.5},
            "greedy_merge@0.1": {"bleu": 80.0, "gain_kept": None},
        },
    }
    assert prune.flat_metrics(results) == {
        "base_bleu": 70.0,
        "full_bleu": 90.0,
        "random@0.5_bleu": 85.0,
        "random@0.5_gain_kept": 75.0,
        "pq8_bleu": 60.0,
        "pq8_gain_kept": -50.0,
        "greedy_merge@0.1_bleu": 80.0,
    }


def test_render_and_parse_round_trip():
    entry = {
        "command": "python examples/x.py",
        "seed_command": "python examples/x.py --seed {seed}",
        "needs": [],
        "seeds": [0, 1, 2],
        "unit": "%",
        "tolerance_rule": "max(3 x sample std over the seeds, 1)",
        "versions": {"python": "3.12.0", "torch": "2.13.0"},
        "machine": "2-core CPU, no GPU",
        "wall_seconds": {"mean": 125.4, "min": 61.0, "max": 150.0},
        "cpu_seconds": {"mean": 59.6, "min": 50.0, "max": 70.0},
        "metrics": {"a_bleu": {"mean": 75.123, "std": 1.5, "min": -3.0, "max": 77.0, "tolerance": 4.5}},
    }
    body = numbers.render("x", entry)
    assert "2 min 05 s (1 min 01 s - 2 min 30 s; CPU time 1 min 00 s)" in " ".join(body.split())
    assert max(map(len, body.splitlines())) <= 119
    assert numbers.parse_rows(body) == {"a_bleu": (75.12, 1.5, -3.0, 77.0, 4.5)}
    doc = "text\n<!-- readme_numbers:x metrics=a_bleu -->\nold\n<!-- /readme_numbers:x -->\nmore"
    assert numbers.doc_blocks(doc) == [("x", ["a_bleu"], "old\n")]


@pytest.fixture(scope="module")
def seed0_runs(tmp_path_factory):
    """The seed-0 (default) run of every example in the JSON, each in a fresh directory, made on first use."""
    work_dir, runs = tmp_path_factory.mktemp("readme_numbers"), {}

    def get(name):
        if name not in runs:
            for dep in numbers.EXAMPLES[name].needs:
                get(dep)
            runs[name] = numbers.run_once(name, 0, work_dir)
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATA))
def test_default_example_reproduces_readme_numbers(name, seed0_runs):
    """The default command (seed 0) reruns and every metric of its all_results.json lies within the JSON's tolerance
    of the quoted mean."""
    run = seed0_runs(name)
    metrics = DATA[name]["metrics"]
    assert set(run["metrics"]) == set(metrics)
    off = {
        key: (value, metrics[key]["mean"], metrics[key]["tolerance"])
        for key, value in run["metrics"].items()
        if abs(value - metrics[key]["mean"]) > metrics[key]["tolerance"]
    }
    assert not off, f"{name}: (rerun, quoted mean, tolerance) outside the tolerance: {off}"
