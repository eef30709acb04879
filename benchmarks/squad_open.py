#!/usr/bin/env python
"""REALM against ORQA on SQuAD-open: ICT then open-QA fine-tuning (a, ORQA), ICT then REALM pretraining on the
corpus's own sentences then the same fine-tuning (b, REALM), and (b) fine-tuned with LoRA (c); test exact match with
paired-bootstrap intervals of the differences.

Corpus: the 2,067 paragraphs of SQuAD v1.1 dev plus wikitext-2's paragraphs as distractors
(`examples/prepare_squad_open.py --distractors`); questions split by article into train, dev (convergence is watched
on it) and test. Every tower starts from the same BERT-family encoder (`--bert`: a path, or `minilm` for the `[minilm]`
extra's all-MiniLM-L6-v2), and (a) and (b) run the same ICT warm start.

    python benchmarks/squad_open.py --out outputs/squad_open --bert minilm
    python benchmarks/squad_open.py --out /tmp/smoke --bert minilm --smoke     # minutes on a CPU: a few steps each

Stages write `<out>/<stage>.json` (and logs); a stage whose JSON exists is skipped, so an interrupted run resumes
where it stopped (its checkpoints live under `<out>/work`). `<out>/squad_open.json` gathers every figure, and the
table is printed. Independent stages run side by side (`--parallel`, one GPU shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--squad", default=os.path.join(ROOT, "..", "shared", "data", "squad_v1.1", "dev-v1.1.json"))
    p.add_argument("--wikitext", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2"))
    p.add_argument("--out", default="outputs/squad_open")
    p.add_argument("--bert", default="minilm", help="BERT-family encoder for every tower (path or 'minilm').")
    p.add_argument("--runs", default="a,b,c", help="Which of a (ORQA), b (REALM), c (REALM + LoRA) to run.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=3.0, help="Fine-tuning epochs over the training questions.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-4, help="Reader learning rate in fine-tuning.")
    p.add_argument("--retriever_learning_rate", type=float, default=2e-5)
    p.add_argument("--lora_learning_rate", type=float, default=1e-3)
    p.add_argument(
        "--retriever_epochs", type=float, default=None,
        help="Fine-tuning epochs the retriever trains for (then only the reader; default: all of --epochs).",
    )  # fmt: skip
    p.add_argument("--searcher_beam_size", type=int, default=20)
    p.add_argument("--reader_beam_size", type=int, default=5)
    p.add_argument("--reader_seq_len", type=int, default=320)
    p.add_argument(
        "--retriever_proj_size", type=int, default=128,
        help="Retriever projection width of (a) and REALM pretraining ((b) and (c) read theirs from the checkpoint); "
        "the encoder's width (384 for MiniLM) keeps all it has.",
    )  # fmt: skip
    p.add_argument("--ict_steps", type=int, default=200)
    p.add_argument("--ict_batch_size", type=int, default=64)
    p.add_argument("--ict_learning_rate", type=float, default=5e-5)
    p.add_argument(
        "--ict_group_by", default=None,
        help="Corpus column whose documents ICT batches keep whole (doc_id: hard in-batch negatives).",
    )  # fmt: skip
    p.add_argument("--realm_steps", type=int, default=1000)
    p.add_argument("--realm_batch_size", type=int, default=32)
    p.add_argument("--realm_learning_rate", type=float, default=5e-5, help="Reader learning rate in REALM.")
    p.add_argument("--realm_retriever_learning_rate", type=float, default=1e-5)
    p.add_argument("--reader_warmup_steps", type=int, default=300)
    p.add_argument("--refresh_steps", type=int, default=200)
    p.add_argument(
        "--pretrain_args", default="",
        help="More train_realm.py arguments for REALM pretraining, e.g. '--share_embedders false'.",
    )  # fmt: skip
    p.add_argument("--finetune_args", default="", help="More finetune_openqa.py arguments for every fine-tuning run.")
    p.add_argument("--dev_evals", type=int, default=4, help="Dev evaluations over fine-tuning (convergence).")
    p.add_argument("--max_eval_examples", type=int, default=None, help="Cap on test questions (default: all).")
    p.add_argument("--bootstrap_samples", type=int, default=10000)
    p.add_argument("--parallel", action="store_true", help="Run independent stages side by side.")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    p.add_argument("--timeout", type=int, default=3600, help="Seconds per stage before it is stopped.")
    p.add_argument(
        "--until", choices=["pretrain", "all"], default="all",
        help="pretrain: stop after the first stage (a and REALM pretraining), e.g. to split a run over two sessions.",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="A few steps of everything, for a CPU check.")
    return p.parse_args(argv)


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def stage_commands(args, data: str, work: str) -> dict[str, list[str]]:
    """The example-script command line of each stage."""
    py = sys.executable
    train_questions = count_lines(os.path.join(data, "train.jsonl"))
    steps = max(1, round(args.epochs * train_questions / args.batch_size))
    common_ft = [
        "--corpus_file", f"{data}/corpus.jsonl", "--train_file", f"{data}/train.jsonl",
        "--eval_file", f"{data}/test.jsonl", "--dev_file", f"{data}/dev.jsonl",
        "--dev_eval_steps", str(max(1, steps // max(1, args.dev_evals))),
        "--reader_seq_len", str(args.reader_seq_len), "--searcher_beam_size", str(args.searcher_beam_size),
        "--reader_beam_size", str(args.reader_beam_size), "--max_steps", str(steps),
        "--per_device_train_batch_size", str(args.batch_size), "--seed", str(args.seed),
        "--disable_tqdm", "true", "--logging_steps", "50", "--warmup_steps", str(max(1, steps // 20)),
    ]  # fmt: skip
    if args.retriever_epochs is not None:
        common_ft += ["--retriever_max_steps", str(round(args.retriever_epochs * train_questions / args.batch_size))]
    if args.max_eval_examples:
        common_ft += ["--max_eval_examples", str(args.max_eval_examples)]
    if args.smoke:
        common_ft += ["--max_dev_examples", "8", "--eval_batch_size", "4"]
    if args.bf16:
        common_ft += ["--bf16", "true"]
    common_ft += shlex.split(args.finetune_args)
    ict = ["--ict_steps", str(args.ict_steps), "--ict_batch_size", str(args.ict_batch_size)]
    ict += ["--ict_learning_rate", str(args.ict_learning_rate)]
    ict += ["--retriever_proj_size", str(args.retriever_proj_size)]
    if args.ict_group_by:
        ict += ["--ict_group_by", args.ict_group_by]
    finetune = [py, os.path.join(ROOT, "examples", "finetune_openqa.py")]
    pretrain = f"{work}/b_pretrain"
    commands = {
        "a": finetune + common_ft + ict + [
            "--bert_name_or_path", args.bert, "--output_dir", f"{work}/a",
            "--learning_rate", str(args.learning_rate), "--retriever_learning_rate", str(args.retriever_learning_rate),
        ],
        "b_pretrain": [
            py, os.path.join(ROOT, "examples", "train_realm.py"),
            "--corpus_file", f"{data}/corpus.jsonl", "--corpus_title_column", "title",
            "--bert_name_or_path", args.bert, "--max_position_embeddings", "512", "--block_seq_len", "288",
            "--output_dir", pretrain, "--seed", str(args.seed), "--max_steps", str(args.realm_steps),
            "--per_device_train_batch_size", str(args.realm_batch_size),
            "--learning_rate", str(args.realm_learning_rate),
            "--retriever_learning_rate", str(args.realm_retriever_learning_rate),
            "--reader_warmup_steps", str(args.reader_warmup_steps),
            "--refresh_steps", str(args.refresh_steps), "--monitor_steps", str(args.refresh_steps),
            "--max_eval_examples", "8" if args.smoke else "2000",
            "--disable_tqdm", "true", "--logging_steps", "50",
        ] + ict + (["--bf16", "true"] if args.bf16 else []) + shlex.split(args.pretrain_args),
        "b": finetune + common_ft + [
            "--realm_checkpoint", pretrain, "--output_dir", f"{work}/b",
            "--learning_rate", str(args.learning_rate), "--retriever_learning_rate", str(args.retriever_learning_rate),
        ],
        "c": finetune + common_ft + [
            "--realm_checkpoint", pretrain, "--output_dir", f"{work}/c", "--lora_r", "16", "--lora_alpha", "32",
            "--learning_rate", str(args.lora_learning_rate), "--retriever_learning_rate", str(args.lora_learning_rate),
        ],
    }  # fmt: skip
    return commands


def run_stages(names, commands, args, work: str) -> dict[str, dict]:
    """Start every stage in `names` whose result is missing (side by side with --parallel), wait, collect."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    running = {}
    for name in names:
        if os.path.isfile(os.path.join(args.out, f"{name}.json")):
            print(f"[squad_open] {name}: done before, kept", flush=True)
            continue
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        print(f"[squad_open] {name}: {' '.join(commands[name])}", flush=True)
        proc = subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        running[name] = (proc, log, time.time())
        if not args.parallel:
            _wait(name, running.pop(name), args, work)
    for name, entry in running.items():
        _wait(name, entry, args, work)
    return {n: json.load(open(os.path.join(args.out, f"{n}.json"))) for n in names if _done(args, n)}


def _done(args, name) -> bool:
    return os.path.isfile(os.path.join(args.out, f"{name}.json"))


def _wait(name, entry, args, work):
    proc, log, start = entry
    try:
        code = proc.wait(timeout=max(1, args.timeout - (time.time() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    log.close()
    results = os.path.join(work, name, "all_results.json")
    if code == 0 and os.path.isfile(results):
        result = json.load(open(results))
        result["wall_seconds"] = time.time() - start
        predictions = os.path.join(work, name, "predictions.jsonl")
        if os.path.isfile(predictions):
            os.replace(predictions, os.path.join(args.out, f"{name}_predictions.jsonl"))
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"[squad_open] {name}: finished in {time.time() - start:.0f} s", flush=True)
    else:
        print(f"[squad_open] {name}: FAILED ({code}); see {args.out}/{name}.log", flush=True)


def exact_matches(path: str) -> np.ndarray:
    from hf_realm.metrics import exact_match

    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return np.array([exact_match(r["prediction"], r["answers"]) for r in rows], dtype=np.float64)


def em_by_gold_rank(predictions_path: str, questions_path: str) -> dict | None:
    """Exact match by where the gold paragraph ranks among the blocks the reader read: first, among the others, or
    absent. Separates the reader's limit (EM with the gold block first) from the retriever's. None when the
    predictions or questions carry no ranks (`retrieved`, `gold_block_id`)."""
    from hf_realm.metrics import exact_match

    with open(predictions_path) as f:
        predictions = [json.loads(line) for line in f]
    with open(questions_path) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    if len(predictions) > len(questions):
        raise ValueError(f"{predictions_path}: {len(predictions)} predictions for {len(questions)} questions")
    if not predictions or "retrieved" not in predictions[0] or "gold_block_id" not in questions[0]:
        return None
    bins = {}
    for p, q in zip(predictions, questions[: len(predictions)], strict=True):
        if p["question"] != q["question"]:
            raise ValueError(
                f"{predictions_path}: prediction for {p['question']!r} against question {q['question']!r}"
            )
        retrieved = list(p["retrieved"])
        rank = retrieved.index(q["gold_block_id"]) if q["gold_block_id"] in retrieved else None
        name = "first" if rank == 0 else (f"2-{len(retrieved)}" if rank is not None else "absent")
        hits = bins.setdefault(name, [])
        hits.append(exact_match(p["prediction"], p["answers"]))
    return {
        name: {"questions": len(bins[name]), "exact_match": float(np.mean(bins[name]))}
        for name in sorted(bins, key=lambda n: {"first": 0, "absent": 2}.get(n, 1))
    }


def paired_bootstrap(first: np.ndarray, second: np.ndarray, samples: int, seed: int = 0) -> dict:
    """Mean of `second - first` (per question, in EM points) and its 95% percentile interval over `samples`
    resamples of the questions (the same questions for both systems)."""
    if first.shape != second.shape:
        raise ValueError(f"paired bootstrap needs the same questions: {first.shape} vs {second.shape}")
    diff = (second - first) * 100
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(samples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "ci95": [float(low), float(high)], "samples": samples}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.epochs, args.ict_steps, args.realm_steps, args.reader_warmup_steps = 0.01, 2, 3, 2
        args.refresh_steps, args.max_eval_examples, args.bootstrap_samples = 2, 8, 200
        args.ict_batch_size, args.realm_batch_size = 8, 4
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    data = os.path.join(work, "data")
    wikitext = ",".join(os.path.join(args.wikitext, f) for f in ("valid.txt", "test.txt"))
    if not os.path.isfile(os.path.join(data, "test.jsonl")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "prepare_squad_open.py"), "--squad_path", args.squad,
             "--output_dir", data, "--dev_fraction", "0.1", "--distractors", wikitext, "--seed", str(args.seed)],
            check=True, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
        )  # fmt: skip
    commands = stage_commands(args, data, work)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    first = [n for n in ("a",) if n in runs] + (["b_pretrain"] if {"b", "c"} & set(runs) else [])
    results = run_stages(first, commands, args, work)
    second = [n for n in ("b", "c") if n in runs]
    if second and _done(args, "b_pretrain") and args.until == "all":
        results.update(run_stages(second, commands, args, work))

    summary = {"command": " ".join(sys.argv), "runs": {}, "comparisons": {}}
    for name in ("a", "b", "c"):
        if name in results:
            r = results[name]
            keys = ("eval_exact_match", "eval_f1", "eval_recall@5", "eval_answer_recall@5", "eval_recall@20",
                    "eval_closed_book_exact_match", "eval_num_examples", "ict_seconds", "finetune_seconds",
                    "train_steps_per_second", "wall_seconds", "dev_history")  # fmt: skip
            summary["runs"][name] = {k: r[k] for k in keys if k in r}
    if "b_pretrain" in results:
        r = results["b_pretrain"]
        keys = ("eval_masked_span_accuracy", "eval_closed_book_span_accuracy", "eval_retrieval_utility",
                "eval_recall@8", "monitor", "realm_seconds", "steady_steps_per_second", "wall_seconds")  # fmt: skip
        summary["b_pretrain"] = {k: r[k] for k in keys if k in r}
    em = {n: exact_matches(os.path.join(args.out, f"{n}_predictions.jsonl")) for n in summary["runs"]}
    for name in summary["runs"]:
        by_rank = em_by_gold_rank(
            os.path.join(args.out, f"{name}_predictions.jsonl"), os.path.join(data, "test.jsonl")
        )
        if by_rank is not None:
            summary["runs"][name]["exact_match_by_gold_rank"] = by_rank
    for x, y in (("a", "b"), ("b", "c"), ("a", "c")):
        if x in em and y in em:
            summary["comparisons"][f"{y}-{x}"] = paired_bootstrap(em[x], em[y], args.bootstrap_samples, args.seed)
    with open(os.path.join(args.out, "squad_open.json"), "w") as f:
        json.dump(summary, f, indent=2)
    names = {"a": "(a) ORQA: ICT + fine-tuning", "b": "(b) REALM: ICT + REALM + fine-tuning", "c": "(c) (b) with LoRA"}
    print(f"\n{'run':40s} {'EM':>6s} {'F1':>6s} {'R@5':>6s} {'ansR@5':>7s} {'closed':>7s} {'n':>5s}")
    for name, r in summary["runs"].items():
        print(
            f"{names[name]:40s} {100 * r.get('eval_exact_match', float('nan')):6.1f} "
            f"{100 * r.get('eval_f1', float('nan')):6.1f} {100 * r.get('eval_recall@5', float('nan')):6.1f} "
            f"{100 * r.get('eval_answer_recall@5', float('nan')):7.1f} "
            f"{100 * r.get('eval_closed_book_exact_match', float('nan')):7.1f} {r.get('eval_num_examples', 0):5d}"
        )
    for name, r in summary["runs"].items():
        ranks = r.get("exact_match_by_gold_rank", {})
        shown = ", ".join(f"{k} {100 * v['exact_match']:.1f} ({v['questions']})" for k, v in ranks.items())
        print(f"{name}: EM by the gold paragraph's rank among the blocks read (questions): {shown}")
    for key, c in summary["comparisons"].items():
        print(f"EM {key}: {c['difference']:+.2f} points, 95% CI [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]")
    return summary


if __name__ == "__main__":
    main()
