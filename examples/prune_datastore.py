"""Datastore pruning and compression sweep: test BLEU against the retained fraction, one line per method.

Takes the output directory of `examples/knn_translate.py` (its datastore, its model, its test set and the k / T / λ it
tuned) and, for every pruning method and retained fraction, and for every compression spec, builds the smaller
datastore (`hf_realm.knn_pruning.shrink_datastore`) and translates the test set with it. Reports BLEU, the share of
the full datastore's gain over the base model that is kept, entries, bytes and tokens/s; draws the figure of the
kNN-MT paper (BLEU against retained fraction, the base model as a horizontal line).

With no arguments it first runs knn_translate.py's built-in task (CPU, about 2 minutes) into
`outputs/knn_translate`, then sweeps it:

    python examples/prune_datastore.py
    python examples/knn_translate.py --model_name_or_path Helsinki-NLP/opus-mt-de-en ... --output_dir outputs/koran
    python examples/prune_datastore.py --knn_dir outputs/koran --output_dir outputs/koran_pruning \\
        --methods random,cluster,greedy_merge_mean --fractions 0.5,0.25,0.1,0.05 --compression pq32,pca128+pq32

Methods: `random`, `cluster` (per-value k-means, centroids with counts), `greedy_merge` (He et al. 2021: neighbours
of the same value merged into counts), `greedy_merge_mean` (the same, keys moved to the mean), `confidence` (keeps the
entries the model predicts least well). Compression specs chain steps with `+`: `pcaN` (N dims), `pqM` (M bytes per
key), a pruning step first (`cluster@0.25+pca64+pq16`); `auto` = PCA to a quarter of the key dims, PQ with an eighth,
and the two combined. Greedy merging stops once no neighbour of the same value is left; fractions below that give
the same store (marked `same_as`).

Writes `<output_dir>/all_results.json` (every metric in percent, as BLEU is: `base_bleu`, `full_bleu`, and
`<store>_bleu` / `<store>_gain_kept` per row), `<output_dir>/prune_results.json` (the whole sweep, rewritten after every
row so that an interrupted sweep keeps what it measured; there `fraction` and `gain_kept` are fractions of 1),
`prune_table.md` and `prune_plot.png`; `--save_stores` also keeps every smaller store (`KNNDatastore.save_pretrained`,
loadable with `from_pretrained` and usable by `KNNLogitsProcessor` like the original).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser


sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_translate import corpus_bleu, read_lines, translate, translate_with_knn  # noqa: E402

from hf_realm import KNNDatastore  # noqa: E402
from hf_realm.knn_pruning import (  # noqa: E402
    entry_model_log_probs,
    greedy_merge_sequence,
    parse_shrink_spec,
    shrink_datastore,
)
from hf_realm.utils import MATPLOTLIB, SACREBLEU, check_dependencies, parse_args  # noqa: E402


METHODS = ("random", "cluster", "greedy_merge", "greedy_merge_mean", "confidence")
DEFAULT_KNN_DIR = "outputs/knn_translate"


@dataclass
class PruneArguments:
    knn_dir: str = field(
        default=DEFAULT_KNN_DIR,
        metadata={"help": "Output of knn_translate.py (all_results.json, datastore/, test_hypotheses.jsonl). The "
                  "default is created with the built-in task when missing."},
    )  # fmt: skip
    output_dir: str = field(default="outputs/prune_datastore")
    methods: str = field(default=",".join(METHODS), metadata={"help": f"Comma-separated, of {METHODS}."})
    fractions: str = field(default="0.5,0.25,0.1,0.05", metadata={"help": "Retained fractions of the entries."})
    compression: str = field(
        default="auto", metadata={"help": "Comma-separated specs (pcaN, pqM, chains with +), 'auto' or ''."}
    )
    keep_singletons: bool = field(
        default=False, metadata={"help": "random / confidence pruning keep the last entry of every value."}
    )
    merge_neighbors: int = field(default=32, metadata={"help": "Neighbours searched for greedy merging."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model of knn_dir."})
    test_source_file: str | None = field(default=None, metadata={"help": "Default: knn_dir's test set."})
    test_target_file: str | None = field(default=None)
    max_test_samples: int | None = field(default=None)
    k: int | None = field(default=None, metadata={"help": "Default: the k tuned by knn_translate.py."})
    temperature: float | None = field(default=None)
    lmbda: float | None = field(default=None)
    num_beams: int = field(default=1)
    batch_size: int = field(default=64)
    max_new_tokens: int = field(default=128)
    max_source_length: int = field(default=256)
    save_stores: bool = field(default=False, metadata={"help": "Keep every smaller store in output_dir/stores/."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of random pruning and k-means, and of the knn_translate.py run made when the default "
                  "--knn_dir is missing."},
    )  # fmt: skip
    device: str | None = field(default=None)


def sweep_specs(args: PruneArguments, key_dim: int) -> list[tuple[str, str, float | None]]:
    """The (name, method, fraction) of every store to build, checked before anything runs."""
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: expected some of {METHODS}, got {bad}")
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f]
    except ValueError as err:
        raise ValueError(f"--fractions: expected comma-separated numbers in (0, 1], got {args.fractions!r}") from err
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions: expected numbers in (0, 1], got {fractions}")
    compression = [c for c in args.compression.split(",") if c]
    if compression == ["auto"]:
        compression = [f"pca{key_dim // 4}", f"pq{key_dim // 8}", f"pca{key_dim // 4}+pq{key_dim // 16}"]
    for spec in compression:
        parse_shrink_spec(spec)
    jobs = [(f"{m}@{f:g}", m, f) for m in methods for f in sorted(fractions, reverse=True)]
    return jobs + [(spec, "compression", None) for spec in compression]


def sweep_table(sweep: dict[str, dict], bleu_label: str = "BLEU") -> list[str]:
    """Markdown rows of a sweep: BLEU, gain kept (with a bootstrap interval when there is one), entries, MiB, tokens/s."""
    lines = [
        f"| store | {bleu_label} | gain kept [95% CI] | entries | MiB | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in sweep.items():
        kept = f"{r['gain_kept']:.0%}" if r.get("gain_kept") is not None else "-"
        if "bootstrap" in r:
            kept += " [{:.0%}, {:.0%}]".format(*r["bootstrap"]["ci95"])
        extra = f" (searches saved {r['searches_saved']:.0%})" if "searches_saved" in r else ""
        extra += f" (= {r['same_as']})" if "same_as" in r else ""
        lines.append(f"| {name}{extra} | {r['bleu']:.2f} | {kept} | {r['entries']:,} | {r['bytes'] / 2**20:.2f} | "
                     f"{r['tokens_per_second']:.0f} |")  # fmt: skip
    return lines


def plot_sweep(ax, sweep: dict[str, dict], base_bleu: float, title: str, ylabel: str = "test BLEU") -> None:
    """BLEU against retained fraction on a log axis: a line per pruning method, compression as labelled points
    (fraction of the bytes), stores re-tuned on dev as stars, the base model as a dashed horizontal line."""
    styles = {"random": "o-", "cluster": "P-", "greedy_merge_mean": "s-", "greedy_merge": "s--", "confidence": "^-"}
    full = sweep["full"]
    for method, style in styles.items():
        rows = [r for r in sweep.values() if r.get("method") == method]
        pts = sorted({(r["fraction"], r["bleu"]) for r in rows if "retuned" not in r})
        tuned = [(r["fraction"], r["bleu"]) for r in rows if "retuned" in r]
        if not pts:
            continue
        pts = sorted({(1.0, full["bleu"]), *pts})
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method.replace("_", " "))
        if tuned:
            ax.plot(*zip(*tuned, strict=True), "*", ms=12, color=line.get_color(),
                    label=f"{method.replace('_', ' ')}, T/λ re-tuned on dev")  # fmt: skip
    for name, r in sweep.items():
        if r.get("method") == "compression" and ("retuned" in r or f"{name} (retuned)" not in sweep):
            ax.plot(r["fraction"], r["bleu"], "D", color="gray")
            ax.annotate(name, (r["fraction"], r["bleu"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base_bleu, color="k", linestyle="--", label="base model (no datastore)")
    ax.set_xscale("log")
    ax.set_xlabel("retained fraction (entries for pruning; bytes for PCA/PQ, gray)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def flat_metrics(results: dict) -> dict[str, float]:
    """The sweep as `all_results.json` holds it: one number per metric, all in percent (BLEU is already 0-100)."""
    flat = {"base_bleu": results["base"]["bleu"], "full_bleu": results["sweep"]["full"]["bleu"]}
    for name, row in results["sweep"].items():
        if name != "full":
            flat[f"{name}_bleu"] = row["bleu"]
            if row.get("gain_kept") is not None:
                flat[f"{name}_gain_kept"] = 100 * row["gain_kept"]
    return flat


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _load_knn_run(args: PruneArguments, log) -> dict:
    knn_dir = Path(args.knn_dir)
    if not (knn_dir / "all_results.json").is_file():
        if args.knn_dir != DEFAULT_KNN_DIR:
            raise FileNotFoundError(
                f"--knn_dir: expected the output of knn_translate.py (all_results.json, datastore/) in {knn_dir}, "
                "found no all_results.json"
            )
        log(f"No knn_translate.py run in {knn_dir}: running its built-in task first")
        import knn_translate

        with torch.enable_grad():
            knn_translate.main(["--output_dir", str(knn_dir), "--seed", str(args.seed)])
    return json.loads((knn_dir / "all_results.json").read_text())


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(PruneArguments)


def check_extras(args: PruneArguments) -> None:
    """Fail before any work (the default first runs knn_translate.py for minutes) when an optional package is
    missing."""
    check_dependencies("examples/prune_datastore.py", [SACREBLEU, MATPLOTLIB])


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args(make_parser(), argv)
    check_extras(args)

    def log(msg):
        print(msg, flush=True)

    sweep_specs(args, 64)  # bad --methods / --fractions / --compression fail here, before anything is written
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    run = _load_knn_run(args, log)
    knn_dir = Path(args.knn_dir)
    model_path = args.model_name_or_path or run.get("model_dir") or run["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_path).to(device).eval()
    if device.type == "cpu" and model.config.d_model <= 128:
        torch.set_num_threads(1)  # tiny models only lose time to intra-op threads
    store = KNNDatastore.from_pretrained(knn_dir / "datastore")
    jobs = sweep_specs(args, store.key_dim)
    if args.test_source_file:
        sources = read_lines(args.test_source_file, None, args.max_test_samples)
        references = read_lines(args.test_target_file, None, args.max_test_samples)
    else:
        lines = (knn_dir / "test_hypotheses.jsonl").read_text().splitlines()[: args.max_test_samples]
        sources, references = zip(*((r["source"], r["reference"]) for r in map(json.loads, lines)), strict=True)
        sources, references = list(sources), list(references)
    setting = {"k": args.k or run["k"], "temperature": args.temperature or run["temperature"],
               "lmbda": args.lmbda if args.lmbda is not None else run["lmbda"]}  # fmt: skip
    max_pos = getattr(model.config, "max_position_embeddings", None) or 10**6
    kw = dict(batch_size=args.batch_size, max_new_tokens=min(args.max_new_tokens, max_pos - 2),
              max_source_length=min(args.max_source_length, max_pos), num_beams=args.num_beams)  # fmt: skip

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"knn_dir": str(knn_dir), "model": model_path, "setting": setting, "test_sentences": len(sources),
               "num_beams": args.num_beams, "device": str(device)}  # fmt: skip
    log(f"Test set: {len(sources)} sentences; k={setting['k']} T={setting['temperature']:g} λ={setting['lmbda']:g}")
    store.build_index(device=device)
    base_hyps, base_speed = translate(model, tokenizer, sources, **kw)
    full_hyps, full_speed = translate_with_knn(model, tokenizer, sources, store, **setting, **kw)
    base_bleu, full_bleu = corpus_bleu(base_hyps, references), corpus_bleu(full_hyps, references)
    gain = full_bleu - base_bleu
    results["base"] = {"bleu": base_bleu, "tokens_per_second": base_speed["tokens_per_second"]}
    sweep = results["sweep"] = {
        "full": {"method": "full", "fraction": 1.0, "entries": len(store), "bytes": store.nbytes, "bleu": full_bleu,
                 "gain_kept": 1.0, "tokens_per_second": full_speed["tokens_per_second"]}
    }  # fmt: skip
    log(f"base BLEU {base_bleu:.2f}, full datastore {full_bleu:.2f} ({len(store):,} entries)")
    if gain <= 0:
        log("warning: the full datastore does not improve on the base model, so 'gain kept' means little")

    methods = {m for _, m, _ in jobs}
    merges = log_probs = None
    if methods & {"greedy_merge", "greedy_merge_mean"}:
        merges = greedy_merge_sequence(store, args.merge_neighbors, device=device, max_passes=4)
    if "confidence" in methods:
        log_probs = entry_model_log_probs(store, model)

    from tqdm.auto import tqdm

    for name, method, fraction in tqdm(jobs, desc="sweep", unit="store"):
        small = shrink_datastore(store, name, merges=merges, log_probs=log_probs, num_neighbors=args.merge_neighbors,
                                 keep_singletons=args.keep_singletons, seed=args.seed, device=device)  # fmt: skip
        same = next((n for n, r in sweep.items() if r.get("method") == method and method.startswith("greedy")
                     and r["entries"] == len(small)), None)  # fmt: skip
        if same is not None:  # merging stopped: the same store as a larger fraction
            sweep[name] = {**sweep[same], "same_as": same}
            _write_json(out_dir / "prune_results.json", results)
            continue
        hyps, speed = translate_with_knn(model, tokenizer, sources, small, **setting, **kw)
        bleu = corpus_bleu(hyps, references)
        sweep[name] = {
            "method": method,
            "fraction": len(small) / len(store) if fraction is not None else small.nbytes / store.nbytes,
            "entries": len(small),
            "bytes": small.nbytes,
            "bleu": bleu,
            "gain_kept": (bleu - base_bleu) / gain if gain else None,
            "tokens_per_second": speed["tokens_per_second"],
        }
        if args.save_stores:
            small.save_pretrained(out_dir / "stores" / name)
        kept = f"gain kept {100 * sweep[name]['gain_kept']:4.0f}%" if gain else ""
        log(f"  {name:28s} BLEU {bleu:6.2f}  {kept}  {len(small):>9,d} entries  {small.nbytes / 2**20:8.2f} MiB")
        _write_json(out_dir / "prune_results.json", results)

    _write_json(out_dir / "prune_results.json", results)
    _write_json(out_dir / "all_results.json", flat_metrics(results))
    table = [f"base model BLEU {base_bleu:.2f}; kNN-MT settings k={setting['k']}, T={setting['temperature']:g}, "
             f"λ={setting['lmbda']:g}; {len(sources)} test sentences, beam {args.num_beams}", "", *sweep_table(sweep)]  # fmt: skip
    (out_dir / "prune_table.md").write_text("\n".join(table) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    plot_sweep(
        ax, sweep, base_bleu, f"full datastore {len(store):,} entries", ylabel=f"test BLEU (beam {args.num_beams})"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "prune_plot.png", dpi=120)
    plt.close(fig)
    log("\n".join(table))
    log(f"results in {out_dir / 'prune_results.json'}, plot {out_dir / 'prune_plot.png'}")
    return results


if __name__ == "__main__":
    main()
