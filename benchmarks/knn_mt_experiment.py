"""Real kNN-MT domain adaptation (issue 6) and datastore pruning / compression sweeps (issue 7), in two commands.

Step 1 (`train`): train a BPE tokenizer (the `tokenizers` library) and a small Marian-architecture de->en model from
scratch on the general-domain pairs in the shared data (multi30k, Tatoeba, WMT newstest, FLORES, NTREX; never Koran or
IT), within a time budget, in bf16 on a GPU. Saves the model in fp16 (+ tokenizer) to `--output_dir`.

Step 2 (`evaluate`): for the Koran domain (train = datastore, dev = tune k / T / λ, test = BLEU) and the IT domain
(first 1,500 dev lines = datastore, last 500 = tune, test = BLEU): base BLEU, kNN-MT BLEU with the tuned setting,
datastore size; then the pruning sweeps (random / per-value clustering / greedy merging with first or mean keys /
model-confidence at 25/10/50/5%), PCA and PQ
compression, adaptive retrieval, each with BLEU, tokens/s and bytes; and the plot (BLEU vs retained fraction).
Tuning decodes greedily; the test set is decoded greedily (all rows) and with beam search (base and tuned kNN).
Rows named in `--retune` get their own T / λ on dev as an extra row, and for each size budget (25% of the entries,
10x fewer bytes) the re-tuned store with the best dev BLEU is picked and its test BLEU reported.
Nothing is tuned or chosen on a test set or on datastore sentences.

    python benchmarks/knn_mt_experiment.py train --data_dir ../shared/data --output_dir $OUT/model --max_minutes 7
    python benchmarks/knn_mt_experiment.py evaluate --model_dir model --data_dir ../shared/data --output_dir $OUT
    python benchmarks/knn_mt_experiment.py report --output_dir $OUT --data_dir ../shared/data   # table + plot again

Prints progress (flushed) and a table last; writes `knn_mt_results.json` (updated after every step, so a killed run
still leaves what it measured), `knn_mt_table.md` and `knn_mt_pruning.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from knn_translate import corpus_bleu, read_lines, translate, translate_with_knn  # noqa: E402
from prune_datastore import plot_sweep, sweep_table  # noqa: E402

from hf_realm import KNNDatastore  # noqa: E402
from hf_realm.knn_pruning import (  # noqa: E402
    datastore_neighbours,
    entry_model_log_probs,
    greedy_merge_sequence,
    shrink_datastore,
)


GENERAL_PAIRS = [
    ("multi30k/task1/raw/train.de", "multi30k/task1/raw/train.en"),
    ("multi30k/task1/raw/test_2016_flickr.de", "multi30k/task1/raw/test_2016_flickr.en"),
    ("multi30k/task1/raw/test_2017_flickr.de", "multi30k/task1/raw/test_2017_flickr.en"),
    ("multi30k/task1/raw/test_2017_mscoco.de", "multi30k/task1/raw/test_2017_mscoco.en"),
    ("multi30k/task1/raw/test_2018_flickr.de", "multi30k/task1/raw/test_2018_flickr.en"),
    (
        "opus_mt_testsets/datasets/helsinki_nlp/tatoeba/testsets/deu-eng/tatoeba-test-v2021-08-07.deu",
        "opus_mt_testsets/datasets/helsinki_nlp/tatoeba/testsets/deu-eng/tatoeba-test-v2021-08-07.eng",
    ),
    (
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2014/de-en/newstest2014.de",
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2014/de-en/newstest2014.en",
    ),
    (
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2019/de-en/newstest2019.de",
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2019/de-en/newstest2019.en",
    ),
    (
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2019/en-de/newstest2019.de",
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2019/en-de/newstest2019.en",
    ),
    (
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2020/de-en/newstest2020.de",
        "opus_mt_testsets/datasets/statmt/wmt_newstest/2020/de-en/newstest2020.en",
    ),
    (
        "opus_mt_testsets/datasets/facebook/flores/flores200_dataset/devtest/deu_Latn.devtest",
        "opus_mt_testsets/datasets/facebook/flores/flores200_dataset/devtest/eng_Latn.devtest",
    ),
    (
        "opus_mt_testsets/datasets/microsoft/ntrex/NTREX/NTREX-128/newstest2019-ref.deu.txt",
        "opus_mt_testsets/datasets/microsoft/ntrex/NTREX/NTREX-128/newstest2019-src.eng.txt",
    ),
]
GENERAL_DEV = ("multi30k/task1/raw/val.de", "multi30k/task1/raw/val.en")
DOMAINS = {
    # name: (datastore files + line range, dev files + line range, test files)
    "koran": (("koran/train", None), ("koran/dev", ":500"), "koran/test"),
    "it": (("it/dev", ":1500"), ("it/dev", "1500:"), "it/test"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pairs(data_dir: Path, src: str, tgt: str, lines: str | None = None, max_samples: int | None = None):
    s = read_lines(str(data_dir / src), lines, max_samples)
    t = read_lines(str(data_dir / tgt), lines, max_samples)
    if len(s) != len(t):
        raise ValueError(f"{src} has {len(s)} lines but {tgt} has {len(t)}")
    return s, t


# ----------------------------------------------------------------------------------------------------------------------
# Step 1: tokenizer + model from scratch
# ----------------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=256
    )


def token_batches(src_ids, tgt_ids, max_tokens: int, rng: random.Random):
    """Length-bucketed batches of at most ``max_tokens`` (padded source + target) tokens, shuffled."""
    order = sorted(range(len(src_ids)), key=lambda i: (len(tgt_ids[i]), len(src_ids[i])))
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, len(src_ids[i]) + len(tgt_ids[i]))
        if cur and w * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, w = [], len(src_ids[i]) + len(tgt_ids[i])
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _pad(seqs, value):
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def cmd_train(args) -> dict:
    from transformers import MarianConfig, MarianMTModel

    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir = Path(args.data_dir)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, tgt = [], []
    for s_file, t_file in GENERAL_PAIRS:
        if not (data_dir / s_file).is_file():
            log(f"missing {s_file}: skipped")
            continue
        s, t = _pairs(data_dir, s_file, t_file)
        keep = [(a.strip(), b.strip()) for a, b in zip(s, t, strict=True) if a.strip() and b.strip()]
        keep = [(a, b) for a, b in keep if len(a) <= args.max_chars and len(b) <= args.max_chars]
        src += [a for a, _ in keep]
        tgt += [b for _, b in keep]
        log(f"{s_file}: {len(keep)} pairs")
    if args.max_pairs:
        src, tgt = src[: args.max_pairs], tgt[: args.max_pairs]
    if not src:
        raise FileNotFoundError(f"no general-domain pairs under {data_dir}")
    log(f"{len(src)} general-domain pairs; training a {args.vocab_size}-token BPE")
    tokenizer = train_tokenizer(src + tgt, args.vocab_size)
    src_ids = tokenizer(src, truncation=True, max_length=args.max_length)["input_ids"]
    tgt_ids = tokenizer(tgt, truncation=True, max_length=args.max_length)["input_ids"]

    torch.manual_seed(args.seed)
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=1, dropout=args.dropout, attention_dropout=0.1,
        activation_dropout=0.1, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )  # fmt: skip
    model = MarianMTModel(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 2**20:.1f} MiB in fp16), device {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=1e-4)
    warmup = args.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1)))
    )  # inverse square root after warm-up
    amp = device.type == "cuda"
    rng = random.Random(args.seed)
    deadline = t_start + args.max_minutes * 60
    step, epoch, tokens_seen = 0, 0, 0
    loss = torch.tensor(float("nan"))
    model.train()
    t_train = time.time()
    done = False
    while not done:
        epoch += 1
        for batch in token_batches(src_ids, tgt_ids, args.max_tokens, rng):
            if time.time() > deadline or (args.max_steps and step >= args.max_steps):
                done = True
                break
            inp = _pad([src_ids[i] for i in batch], 0).to(device, non_blocking=True)
            labels = _pad([tgt_ids[i] for i in batch], -100).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=inp, attention_mask=(inp != 0).long(), labels=labels).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, label_smoothing=0.1
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            tokens_seen += int((labels != -100).sum())
            if step % args.log_every == 0:
                el = time.time() - t_train
                log(f"epoch {epoch} step {step} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                    f"{step / el:.1f} steps/s {tokens_seen / el:.0f} tgt tokens/s")  # fmt: skip
    model.eval()
    result = {"pairs": len(src), "steps": step, "epochs": epoch, "train_seconds": time.time() - t_train,
              "parameters": n_params, "final_loss": float(loss.item())}  # fmt: skip
    if (data_dir / GENERAL_DEV[0]).is_file():
        dev_s, dev_t = _pairs(data_dir, *GENERAL_DEV, max_samples=args.dev_samples)
        hyps, speed = translate(model, tokenizer, dev_s, batch_size=128, num_beams=1, max_new_tokens=args.max_length)
        result["general_dev_bleu_greedy"] = corpus_bleu(hyps, dev_t)
        log(f"general-domain dev (multi30k val, {len(dev_s)}) greedy BLEU {result['general_dev_bleu_greedy']:.2f}")
    model.half().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result["total_seconds"] = time.time() - t_start
    (out_dir / "train_results.json").write_text(json.dumps(result, indent=2))
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    log(f"saved {out_dir} ({size / 2**20:.1f} MiB): {json.dumps(result)}")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: domains, tuning, sweeps
# ----------------------------------------------------------------------------------------------------------------------


class Results:
    """A JSON file rewritten after every measurement."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def set(self, *keys_and_value):
        *keys, value = keys_and_value
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def get(self, *keys):
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node


def hyps_path(res, domain: str, name: str) -> Path:
    """Where the test hypotheses of a row are kept (next to the results JSON), for the bootstrap intervals."""
    return res.path.parent / "hyps" / domain / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".txt")


def save_hyps(res, domain: str, name: str, hyps: list[str]) -> None:
    path = hyps_path(res, domain, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps))


def load_hyps(res, domain: str, name: str) -> list[str] | None:
    path = hyps_path(res, domain, name)
    return path.read_text().split("\n")[:-1] if path.is_file() else None


def sentence_bleu_stats(hyps: list[str], refs: list[str]) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics (hyp len, ref len, 4 matches, 4 totals), sacrebleu's 13a tokens."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    rows = []
    for h, r in zip(hyps, refs, strict=True):
        s = bleu.sentence_score(h, [r])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.int64)


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU from summed statistics (the same number as sacrebleu.corpus_bleu on those sentences)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU.compute_bleu(stats[2:6].tolist(), stats[6:10].tolist(), int(stats[0]), int(stats[1])).score)


def bootstrap_gain_kept(base: np.ndarray, full: np.ndarray, row: np.ndarray, samples: int = 1000, seed: int = 0):
    """Paired bootstrap (test sentences resampled with replacement) of (BLEU_row - BLEU_base) / (BLEU_full - BLEU_base).

    Takes the per-sentence statistics of the three systems on the same test set; returns the 2.5 / 97.5 percentiles
    and the share of resamples where the row keeps at least 90% of the gain.
    """
    rng = np.random.default_rng(seed)
    n = base.shape[0]
    kept = []
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        b, f, r = (bleu_from_stats(x[idx].sum(0)) for x in (base, full, row))
        kept.append((r - b) / (f - b) if f != b else float("nan"))
    kept = np.asarray(kept)
    lo, hi = np.nanpercentile(kept, [2.5, 97.5])
    return {"ci95": [float(lo), float(hi)], "p_at_least_90": float(np.mean(kept >= 0.9)), "samples": samples}


def add_bootstrap(res, domain: str, refs: list[str], samples: int) -> None:
    """A bootstrap interval of the gain kept for every sweep row whose test hypotheses were saved."""
    base, full = load_hyps(res, domain, "base"), load_hyps(res, domain, "full")
    if not samples or base is None or full is None:
        return
    base, full = sentence_bleu_stats(base, refs), sentence_bleu_stats(full, refs)
    for name in list(res.get(domain, "sweep") or {}):
        hyps = load_hyps(res, domain, name) if name != "full" else None
        if hyps is not None:
            res.set(domain, "sweep", name, "bootstrap", bootstrap_gain_kept(base, full, sentence_bleu_stats(hyps, refs),
                                                                          samples))  # fmt: skip


def teacher_forced_states(model, tokenizer, sources, targets, device, n: int = 64) -> torch.Tensor:
    """The kNN query states of the first ``n`` pairs, teacher-forced: one row per target token."""
    import datasets

    from hf_realm.knn_build import _batch_tensors, _decoder_inputs
    from hf_realm.knn_hook import KNNQueryHook

    ds = datasets.Dataset.from_dict({"s": sources[:n], "t": targets[:n]})
    max_len = min(256, model.config.max_position_embeddings)
    inputs, labels = _batch_tensors(ds[:], tokenizer, True, False, "s", "t", None, max_len, 0)
    with torch.no_grad(), KNNQueryHook(model, capture="all") as hook:
        model(
            **{k_: v.to(device) for k_, v in inputs.items()},
            decoder_input_ids=_decoder_inputs(model, labels.to(device)),
        )
    return hook.state[labels.to(device) != -100]


def median_neighbour_distance(store, model, tokenizer, sources, targets, k, device) -> float:
    """Median squared L2 distance of the k-th neighbour of teacher-forced dev states (to scale the T grid)."""
    sqdist, _ = store.search(teacher_forced_states(model, tokenizer, sources, targets, device), k)
    return float(sqdist[:, -1].median())


def retune_setting(store, c, model, tokenizer, kw, lmbdas, temperature_factors=(0.5, 1.0, 2.0), grid=None):
    """Dev-set grid around the full store's setting (same k; T x 0.5 / 1 / 2; the λ grid) for a smaller store.

    A ``grid`` measured before (a resumed run) is reused instead of decoding dev again.
    """
    base = c["setting"]
    if grid:
        best = max(grid, key=lambda g: g["dev_bleu"])
        return {key: best[key] for key in ("k", "temperature", "lmbda")}, grid
    grid = []
    for f in temperature_factors:
        for lm in lmbdas:
            t = base["temperature"] * f
            hyps, _ = translate_with_knn(model, tokenizer, c["dev_src"], store, base["k"], t, lm, num_beams=1, **kw)
            grid.append({"k": base["k"], "temperature": t, "lmbda": lm, "dev_bleu": corpus_bleu(hyps, c["dev_ref"])})
    best = max(grid, key=lambda g: g["dev_bleu"])
    log(f"    retuned on dev: T={best['temperature']:g} λ={best['lmbda']:g} (dev BLEU {best['dev_bleu']:.2f})")
    return {key: best[key] for key in ("k", "temperature", "lmbda")}, grid


def evaluate_store(name, store, model, tokenizer, test_src, test_ref, setting, kw, res, domain, base_bleu, full_gain,
                   **extra):  # fmt: skip
    hyps, speed = translate_with_knn(
        model, tokenizer, test_src, store, setting["k"], setting["temperature"], setting["lmbda"], num_beams=1, **kw
    )
    bleu = corpus_bleu(hyps, test_ref)
    save_hyps(res, domain, name, hyps)
    full = res.get(domain, "datastore")
    row = {
        "fraction": (store.nbytes / full["bytes"])
        if extra.get("method") == "compression"
        else len(store) / full["entries"],
        "bleu": bleu,
        "tokens_per_second": speed["tokens_per_second"],
        "entries": len(store),
        "bytes": store.nbytes,
        "gain_kept": (bleu - base_bleu) / full_gain if full_gain else None,
        **extra,
    }
    res.set(domain, "sweep", name, row)
    log(f"  {domain} {name:28s} BLEU {bleu:6.2f}  {row['entries']:>9,d} entries  {row['bytes'] / 2**20:8.2f} MiB  "
        f"{speed['tokens_per_second']:7.0f} tok/s")  # fmt: skip
    return row


def cmd_evaluate(args) -> dict:
    """Phase 1 for every domain (base, datastore, tuning, kNN test), then beams, then sweeps, within --max_minutes."""
    import datasets
    from transformers import AutoTokenizer, MarianMTModel

    from hf_realm.knn_generation import KNNLogitsProcessor

    t_start = time.time()

    def time_left() -> float:
        return args.max_minutes * 60 - (time.time() - t_start)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(out_dir / "knn_mt_results.json")
    data_dir = Path(args.data_dir) / "multi_domain_deen"
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = MarianMTModel.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    res.set("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    res.set("model", {"dir": args.model_dir, "parameters": sum(p.numel() for p in model.parameters())})
    res.set("decoding", {"tuning": "greedy", "test": f"greedy (all rows) and beam {args.beams} (base, kNN)"})
    max_pos = model.config.max_position_embeddings
    kw = dict(batch_size=args.batch_size, max_new_tokens=min(args.max_new_tokens, max_pos - 2),
              max_source_length=min(256, max_pos))  # fmt: skip
    ks = [int(x) for x in args.k_grid.split(",")]
    lmbdas = [float(x) for x in args.lmbda_grid.split(",")]
    t_factors = [float(x) for x in args.temperature_factors.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    ctx: dict[str, dict] = {}

    # -- phase 1: base, datastore, tuning on dev, kNN on test ----------------------------------------------------------
    for domain in args.domains.split(","):
        (ds_base, ds_lines), (dev_base, dev_lines), test_base = DOMAINS[domain]
        ds_src, ds_tgt = _pairs(data_dir, f"{ds_base}.de", f"{ds_base}.en", ds_lines, args.max_datastore_pairs)
        dev_src, dev_ref = _pairs(data_dir, f"{dev_base}.de", f"{dev_base}.en", dev_lines, args.max_dev_pairs)
        test_src, test_ref = _pairs(data_dir, f"{test_base}.de", f"{test_base}.en", None, args.max_test_pairs)
        overlap = len(set(dev_src) & set(ds_src)) + len(set(test_src) & set(ds_src))
        res.set(domain, "sizes", {"datastore_pairs": len(ds_src), "dev_pairs": len(dev_src),
                                  "test_pairs": len(test_src), "dev_or_test_sources_in_datastore": overlap})  # fmt: skip
        log(f"== {domain}: datastore {len(ds_src)} pairs, dev {len(dev_src)}, test {len(test_src)} "
            f"({overlap} dev/test sources also in the datastore)")  # fmt: skip

        base = res.get(domain, "base")
        if base is None or load_hyps(res, domain, "base") is None:
            hyps, speed = translate(model, tokenizer, test_src, num_beams=1, **kw)
            save_hyps(res, domain, "base", hyps)
            if base is None:
                dev_hyps, _ = translate(model, tokenizer, dev_src, num_beams=1, **kw)
                base = {"test_bleu_greedy": corpus_bleu(hyps, test_ref), "dev_bleu_greedy": corpus_bleu(dev_hyps, dev_ref),
                        "tokens_per_second_greedy": speed["tokens_per_second"]}  # fmt: skip
                res.set(domain, "base", base)
            else:  # a resumed run without hypotheses: decoded again, for the bootstrap
                res.set(domain, "base", "rerun_test_bleu_greedy", corpus_bleu(hyps, test_ref))
        log(f"  base: test BLEU {base['test_bleu_greedy']:.2f} (greedy), dev {base['dev_bleu_greedy']:.2f}")

        t0 = time.time()
        store = KNNDatastore.build(
            model, datasets.Dataset.from_dict({"s": ds_src, "t": ds_tgt}), work / domain / "full", tokenizer=tokenizer,
            source_column="s", target_column="t", batch_size=128, max_length=kw["max_source_length"], progress=False,
        )  # fmt: skip
        store.build_index("torch", device=device)
        res.set(domain, "datastore", {"entries": len(store), "bytes": store.nbytes, "build_seconds": time.time() - t0})
        log(f"  datastore: {len(store):,} entries, {store.nbytes / 2**20:.1f} MiB ({time.time() - t0:.1f}s)")

        tuned = res.get(domain, "tuned")
        if tuned is None:
            med = median_neighbour_distance(store, model, tokenizer, dev_src, dev_ref, max(ks), device)
            temperatures = [float(f"{med * f:.3g}") for f in t_factors]
            log(f"  median {max(ks)}-th neighbour sq. distance on dev: {med:.2f}; T grid {temperatures}")
            grid = []
            for k in ks:
                for t in temperatures:
                    for lm in lmbdas:
                        hyps, _ = translate_with_knn(model, tokenizer, dev_src, store, k, t, lm, num_beams=1, **kw)
                        grid.append({"k": k, "temperature": t, "lmbda": lm, "dev_bleu": corpus_bleu(hyps, dev_ref)})
                        log(f"    dev k={k} T={t:g} λ={lm:g}: BLEU {grid[-1]['dev_bleu']:.2f}")
            tuned = max(grid, key=lambda g: g["dev_bleu"])
            res.set(domain, "grid", grid)
            res.set(domain, "median_sq_distance", med)
            res.set(domain, "tuned", tuned)
        log(f"  tuned on dev: k={tuned['k']} T={tuned['temperature']:g} λ={tuned['lmbda']:g} "
            f"(dev BLEU {tuned['dev_bleu']:.2f})")  # fmt: skip
        setting = {key: tuned[key] for key in ("k", "temperature", "lmbda")}
        knn = res.get(domain, "knn")
        if knn is None or load_hyps(res, domain, "full") is None:
            hyps, speed = translate_with_knn(model, tokenizer, test_src, store, **setting, num_beams=1, **kw)
            save_hyps(res, domain, "full", hyps)
            if knn is None:
                knn = {
                    "test_bleu_greedy": corpus_bleu(hyps, test_ref),
                    "tokens_per_second_greedy": speed["tokens_per_second"],
                }
                res.set(domain, "knn", knn)
            else:
                res.set(domain, "knn", "rerun_test_bleu_greedy", corpus_bleu(hyps, test_ref))
        log(f"  kNN-MT: test BLEU {knn['test_bleu_greedy']:.2f} vs base {base['test_bleu_greedy']:.2f} (greedy); "
            f"{time_left():.0f}s left")  # fmt: skip
        ctx[domain] = dict(store=store, test_src=test_src, test_ref=test_ref, setting=setting, base=base, knn=knn,
                           dev_src=dev_src, dev_ref=dev_ref)  # fmt: skip

    # -- phase 2: beam search on the test sets -------------------------------------------------------------------------
    for domain, c in ctx.items():
        if args.beams <= 1 or res.get(domain, "beam") is not None:
            continue
        if time_left() < args.reserve_seconds + 60:
            log(f"  {domain}: beam search skipped (time budget)")
            res.set(domain, "beam", {"skipped": "time budget"})
            continue
        hyps, bspeed = translate(model, tokenizer, c["test_src"], num_beams=args.beams, **kw)
        khyps, kspeed = translate_with_knn(
            model, tokenizer, c["test_src"], c["store"], **c["setting"], num_beams=args.beams, **kw
        )
        beam = {"num_beams": args.beams, "base_test_bleu": corpus_bleu(hyps, c["test_ref"]),
                "knn_test_bleu": corpus_bleu(khyps, c["test_ref"]), "base_tokens_per_second": bspeed["tokens_per_second"],
                "knn_tokens_per_second": kspeed["tokens_per_second"]}  # fmt: skip
        res.set(domain, "beam", beam)
        log(f"  {domain} beam {args.beams}: base {beam['base_test_bleu']:.2f}, kNN {beam['knn_test_bleu']:.2f}")

    # -- phase 3: pruning / compression / adaptive retrieval (jobs in priority order, domains interleaved) -----------
    for domain, c in ctx.items() if args.sweep else ():
        store = c["store"]
        base_bleu = c["base"]["test_bleu_greedy"]
        c["ev"] = dict(model=model, tokenizer=tokenizer, test_src=c["test_src"], test_ref=c["test_ref"],
                       setting=c["setting"], kw=kw, res=res, domain=domain, base_bleu=base_bleu,
                       full_gain=c["knn"]["test_bleu_greedy"] - base_bleu)  # fmt: skip
        res.set(domain, "sweep", "full", {"bleu": c["knn"]["test_bleu_greedy"], "entries": len(store),
                                          "bytes": store.nbytes, "tokens_per_second": c["knn"]["tokens_per_second_greedy"],
                                          "gain_kept": 1.0, "method": "full", "fraction": 1.0})  # fmt: skip
        c["merges"] = c["log_probs"] = None
        specs = [m for m in args.methods.split(",") if m] + [x for x in args.compression.split(",") if x]
        if any(spec.startswith("greedy_merge") for spec in specs):  # only what a named method needs
            log(f"  {domain}: greedy-merge neighbours ({args.merge_neighbors}, {args.merge_passes} passes)")
            t0 = time.time()
            neighbours = datastore_neighbours(store, args.merge_neighbors, device=device)
            c["merges"] = greedy_merge_sequence(
                store, args.merge_neighbors, neighbours=neighbours, max_passes=args.merge_passes, device=device
            )
            del neighbours
            reach = 1 - len(c["merges"]) / len(store)
            res.set(domain, "greedy_merge_min_fraction", reach)
            res.set(
                domain, "greedy_merge_settings", {"neighbors": args.merge_neighbors, "max_passes": args.merge_passes}
            )
            log(f"  ({time.time() - t0:.1f}s; merging can reach {reach:.1%} of the entries)")
        if any(spec.startswith("confidence") for spec in specs):
            c["log_probs"] = entry_model_log_probs(store, model)
    retune = {x for x in args.retune.split(",") if x}
    methods = [m for m in args.methods.split(",") if m]
    first, *rest = fractions
    jobs = [(f"{m}@{first:g}", m, first) for m in methods]
    jobs += [(spec, "compression", None) for spec in args.compression.split(",") if spec]
    jobs += [(f"{m}@{f:g}", m, f) for f in rest for m in methods]
    jobs += [(f"adaptive@{t:g}", "adaptive", t) for t in (float(x) for x in args.skip_thresholds.split(",") if x)]
    jobs += [(ivf_row_name(spec), "ivf", spec) for spec in args.ivf.split(",") if spec]
    for name, method, param in jobs:
        for domain, c in ctx.items() if args.sweep else ():
            store, ev = c["store"], c["ev"]
            done = res.get(domain, "sweep") or {}
            if name in done and (name not in retune or f"{name} (retuned)" in done):
                continue
            if time_left() < args.reserve_seconds:
                log(f"  {domain} {name}: skipped (time budget)")
                continue
            if method == "adaptive":
                proc = KNNLogitsProcessor(store, **c["setting"], skip_threshold=param)
                with proc.attach(model, tokenizer=tokenizer):
                    hyps, speed = translate(model, tokenizer, c["test_src"], processor=proc, num_beams=1, **kw)
                bleu = corpus_bleu(hyps, c["test_ref"])
                save_hyps(res, domain, name, hyps)
                saved = proc.num_skipped / max(1, proc.num_skipped + proc.num_searches)
                gain = ev["full_gain"]
                res.set(domain, "sweep", name, {"bleu": bleu, "tokens_per_second": speed["tokens_per_second"],
                                                "entries": len(store), "bytes": store.nbytes, "searches_saved": saved,
                                                "method": "adaptive", "fraction": 1.0,
                                                "gain_kept": (bleu - ev["base_bleu"]) / gain if gain else None})  # fmt: skip
                log(f"  {domain} {name:28s} BLEU {bleu:6.2f}  searches saved {saved:.1%}  "
                    f"{speed['tokens_per_second']:7.0f} tok/s")  # fmt: skip
                continue
            extra = {}
            if method == "ivf":  # the same entries, searched approximately (inverted lists over the keys)
                from hf_realm.search import ivf_recall

                probing, _, compressed = param.partition("@")  # `param` stays whole for the next domain
                nprobe, _, scan = probing.partition(":")
                # the store the lists are built over: the full one, or a compressed one (e.g. `8:union@pca128`)
                exact_store = store
                if compressed:
                    exact_store = shrink_datastore(store, compressed, num_neighbors=args.merge_neighbors,
                                                   device=device)  # fmt: skip
                    exact_store.build_index("torch", device=device)
                small = copy.copy(exact_store)
                small.build_index("torch-ivf", device=device, nprobe=int(nprobe), scan=scan or "query")
                # recall against the exact search of the same store on teacher-forced dev states (one batch of up to
                # 128 rows at a time), queries projected as the store does
                states = teacher_forced_states(model, tokenizer, c["dev_src"], c["dev_ref"], device)
                states = exact_store.project(states)
                exact, approx, k = (
                    exact_store._search_backend(device),
                    small._search_backend(device),
                    c["setting"]["k"],
                )
                recall = ivf_recall(approx, exact, states, k, batch_size=128)
                extra = {"recall_vs_exact": recall, "recall_queries": len(states), "nlist": approx.nlist,
                         "nprobe": approx.nprobe, "scan": scan or "query", "over": compressed or "full"}  # fmt: skip
                log(
                    f"  {domain} {name}: recall@{k} vs exact {extra['recall_vs_exact']:.3f} on {len(states)} dev states"
                )
            else:
                small = shrink_datastore(store, name, merges=c["merges"], log_probs=c["log_probs"],
                                         num_neighbors=args.merge_neighbors, device=device)  # fmt: skip
            if method in ("greedy_merge", "greedy_merge_mean"):
                same = next((n for n, r in (res.get(domain, "sweep") or {}).items()
                             if r.get("method") == method and r["entries"] == len(small)), None)  # fmt: skip
                if same is not None:  # merging saturated: the same store as a larger fraction
                    res.set(domain, "sweep", name, {**res.get(domain, "sweep", same), "same_as": same})
                    log(f"  {domain} {name}: merging saturated, same store as {same}")
                    continue
            if name not in done:
                evaluate_store(name, small, method=method, **ev, **extra)
            if name in retune and time_left() > args.reserve_seconds + 60:
                # The smaller store's own k / T / λ, chosen on dev (never on test): its distances and densities differ.
                setting, grid = retune_setting(small, c, model, tokenizer, kw, lmbdas,
                                               grid=res.get(domain, "retune_grid", name))  # fmt: skip
                res.set(domain, "retune_grid", name, grid)
                evaluate_store(f"{name} (retuned)", small, method=method, **{**ev, "setting": setting},
                               retuned=setting, dev_bleu=max(g["dev_bleu"] for g in grid))  # fmt: skip

    res.set("seconds", time.time() - t_start)
    print(write_report(res, list(ctx), data_dir.parent, args.bootstrap), flush=True)
    return res.data


def ivf_row_name(spec: str) -> str:
    """``"8:union"`` -> ``"ivf-union-nprobe8"``; ``"8:union@pca128"`` -> ``"pca128+ivf-union-nprobe8"``."""
    spec, _, compressed = spec.partition("@")
    nprobe, _, scan = spec.partition(":")
    return (f"{compressed}+" if compressed else "") + f"ivf-{scan or 'query'}-nprobe{nprobe}"


def summary_table(data: dict) -> str:
    lines = []
    for domain in DOMAINS:
        if domain not in data or "base" not in data[domain]:
            continue
        d = data[domain]
        lines.append(f"### {domain}: datastore {d.get('datastore', {}).get('entries', 0):,} entries, "
                     f"{d.get('datastore', {}).get('bytes', 0) / 2**20:.1f} MiB")  # fmt: skip
        if "tuned" in d:
            t = d["tuned"]
            lines.append(f"tuned on dev: k={t['k']}, T={t['temperature']:g}, λ={t['lmbda']:g}")
        lines.append("")
        lines.append("| system | BLEU greedy | BLEU beam |")
        lines.append("|---|---:|---:|")
        beam = d.get("beam", {})
        lines.append(
            f"| base | {d['base']['test_bleu_greedy']:.2f} | {beam.get('base_test_bleu', float('nan')):.2f} |"
        )
        if "knn" in d:
            lines.append(
                f"| kNN-MT | {d['knn']['test_bleu_greedy']:.2f} | {beam.get('knn_test_bleu', float('nan')):.2f} |"
            )
        if d.get("sweep"):
            lines.append("")
            lines.extend(sweep_table(d["sweep"], bleu_label="BLEU (greedy)"))
        picks = budget_picks(d)
        if picks:
            lines.append("")
            lines.append("| budget | chosen on dev (of the retuned stores within it) | dev gain kept | test BLEU | "
                         "test gain kept [95% CI] |")  # fmt: skip
            lines.append("|---|---|---:|---:|---:|")
            for p in picks:
                ci = " [{:.0%}, {:.0%}]".format(*p["bootstrap"]["ci95"]) if p.get("bootstrap") else ""
                lines.append(f"| {p['budget']} | {p['chosen']} (of {len(p['candidates'])}) | {p['dev_gain_kept']:.0%} | "
                             f"{p['test_bleu']:.2f} | {p['test_gain_kept']:.0%}{ci} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


BUDGETS = {"25% of the entries": lambda r, full: r["entries"] <= round(0.25 * full["entries"]),
           "10x fewer bytes": lambda r, full: 10 * r["bytes"] <= full["bytes"]}  # fmt: skip


def budget_picks(d: dict) -> list[dict]:
    """For each size budget, the store with the best dev BLEU among those re-tuned on dev that fit it, and its test.

    The choice of method is made on dev, like the choice of k / T / λ, so the test gain reported for a budget is not
    the best of several test scores.
    """
    sweep, grids = d.get("sweep") or {}, d.get("retune_grid") or {}
    if "full" not in sweep or "tuned" not in d:
        return []
    dev_base, dev_full = d["base"]["dev_bleu_greedy"], d["tuned"]["dev_bleu"]
    picks = []
    for budget, fits in BUDGETS.items():
        cands = {}
        for name, r in sweep.items():
            base_name = name.removesuffix(" (retuned)")
            if "retuned" in r and base_name in grids and fits(r, sweep["full"]):
                cands[name] = r.get("dev_bleu", max(g["dev_bleu"] for g in grids[base_name]))
        if not cands:
            continue
        chosen = max(cands, key=cands.get)
        picks.append({"budget": budget, "candidates": sorted(cands), "chosen": chosen,
                      "dev_bleu": cands[chosen], "dev_gain_kept": (cands[chosen] - dev_base) / (dev_full - dev_base),
                      "test_bleu": sweep[chosen]["bleu"], "test_gain_kept": sweep[chosen]["gain_kept"],
                      "bootstrap": sweep[chosen].get("bootstrap")})  # fmt: skip
    return picks


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in DOMAINS if d in data and data[d].get("sweep")]
    if not domains:
        return
    fig, axes = plt.subplots(1, len(domains), figsize=(8.5 * len(domains), 4.8), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        d = data[domain]
        title = f"{domain}: full datastore {d['sweep']['full']['entries']:,} entries"
        plot_sweep(ax, d["sweep"], d["base"]["test_bleu_greedy"], title, ylabel="test BLEU (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(res: Results, domains, data_dir: Path, samples: int) -> str:
    """Bootstrap intervals, per-budget picks, the table (`knn_mt_table.md`) and the plot, from the results so far."""
    for domain in domains:
        if res.get(domain, "sweep") is None:
            continue
        test_base = DOMAINS[domain][2]
        n_test = res.get(domain, "sizes", "test_pairs")  # the evaluate run's --max_test_pairs, if it had one
        refs = _pairs(data_dir / "multi_domain_deen", f"{test_base}.de", f"{test_base}.en", None, n_test)[1]
        add_bootstrap(res, domain, refs, samples)
        if budget_picks(res.data[domain]):
            res.set(domain, "budget_picks", budget_picks(res.data[domain]))
    table = summary_table(res.data)
    (res.path.parent / "knn_mt_table.md").write_text(table)
    try:
        plot(res.data, res.path.parent / "knn_mt_pruning.png")
    except Exception as err:  # the numbers matter more than the figure
        log(f"plot failed: {err!r}")
    return table


def cmd_report(args) -> dict:
    """Recomputes the bootstrap intervals, budget picks, table and plot of a finished (or copied) `evaluate` run."""
    res = Results(Path(args.output_dir) / "knn_mt_results.json")
    if not res.data:
        raise FileNotFoundError(f"no knn_mt_results.json in {args.output_dir}")
    print(write_report(res, DOMAINS, Path(args.data_dir), args.bootstrap), flush=True)
    return res.data


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="tokenizer + model from scratch on the general-domain pairs")
    t.add_argument("--data_dir", default="../shared/data")
    t.add_argument("--output_dir", default="outputs/knn_mt_model")
    t.add_argument("--max_minutes", type=float, default=7.0, help="wall-clock budget of the whole command")
    t.add_argument("--max_steps", type=int, default=0)
    t.add_argument("--max_pairs", type=int, default=0)
    t.add_argument("--max_chars", type=int, default=400)
    t.add_argument("--max_length", type=int, default=128)
    t.add_argument("--vocab_size", type=int, default=8000)
    t.add_argument("--d_model", type=int, default=256)
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--ffn_dim", type=int, default=1024)
    t.add_argument("--dropout", type=float, default=0.2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup_steps", type=int, default=500)
    t.add_argument("--max_tokens", type=int, default=12000, help="padded source + target tokens per batch")
    t.add_argument("--dev_samples", type=int, default=500)
    t.add_argument("--log_every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    e = sub.add_parser("evaluate", help="domains: base vs kNN-MT, tuning, pruning / compression sweeps, plot")
    e.add_argument("--model_dir", default="outputs/knn_mt_model")
    e.add_argument("--data_dir", default="../shared/data")
    e.add_argument("--output_dir", default="outputs/knn_mt")
    e.add_argument("--work_dir", default="outputs/knn_mt_work", help="datastores are written here")
    e.add_argument("--domains", default="koran,it")
    e.add_argument("--k_grid", default="8,16,32")
    e.add_argument("--temperature_factors", default="0.1,0.5,2", help="T grid = factors x median neighbour distance")
    e.add_argument("--lmbda_grid", default="0.3,0.5,0.7")
    e.add_argument("--beams", type=int, default=4, help="beam size for the final test decode (1 = skip)")
    e.add_argument("--batch_size", type=int, default=128)
    e.add_argument("--max_new_tokens", type=int, default=128)
    e.add_argument("--sweep", type=int, default=1)
    e.add_argument("--fractions", default="0.25,0.1,0.5,0.05", help="retained fractions; the first is swept first")
    e.add_argument("--methods", default="random,cluster,greedy_merge_mean,greedy_merge,confidence")
    e.add_argument("--merge_neighbors", type=int, default=32)
    e.add_argument("--merge_passes", type=int, default=32)
    e.add_argument("--compression", default="pca64,pq32,pca64+pq16,pca64+pq32,pca128+pq32,cluster0.25+pca64+pq16")
    e.add_argument(
        "--retune",
        default="",
        help="sweep rows (e.g. pq32,cluster@0.25) whose T/λ are re-tuned on dev "
        "(extra rows; the per-budget picks choose among them on dev)",
    )
    e.add_argument("--skip_thresholds", default="0.9,0.5")
    e.add_argument(
        "--ivf", default="",
        help="rows searched by torch-ivf: `nprobe[:scan][@compression]`, e.g. `8:union,32:query,8:union@pca128` (lists "
        "over the full store, or over the store compressed by a --compression spec; 4 sqrt(n) lists)",
    )  # fmt: skip
    e.add_argument(
        "--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the gain kept (0 = none)"
    )
    e.add_argument("--max_datastore_pairs", type=int, default=None)
    e.add_argument("--max_dev_pairs", type=int, default=None)
    e.add_argument("--max_test_pairs", type=int, default=None)
    e.add_argument("--max_minutes", type=float, default=8.5, help="wall-clock budget; later steps are skipped")
    e.add_argument("--reserve_seconds", type=float, default=20, help="kept for the table and the plot")
    e.add_argument("--device", default=None)
    r = sub.add_parser("report", help="bootstrap intervals, per-budget picks, table and plot of an evaluate run")
    r.add_argument("--output_dir", default="outputs/knn_mt", help="the evaluate run's --output_dir")
    r.add_argument("--data_dir", default="../shared/data")
    r.add_argument("--bootstrap", type=int, default=1000)
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    return {"train": cmd_train, "evaluate": cmd_evaluate, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
