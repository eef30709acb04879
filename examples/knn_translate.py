"""kNN-MT domain adaptation: build a datastore from in-domain pairs and translate with and without it (sacrebleu).

With no arguments the script runs a built-in task on the CPU in a few minutes: a synthetic language pair (word
translation + adjective/noun reordering) with two domains. A tiny Marian model is trained on the *general* domain,
where 25 ambiguous source nouns always take their general-domain translation; in the *target* domain those nouns
mostly (85%) take another translation and domain-specific words are frequent. The datastore, built by the general model teacher-forced
on target-domain pairs, adapts it with no training; k / T / λ are tuned on a target-domain dev set (never on the test
set or on datastore sentences), and BLEU is reported on the target-domain test set.

    python examples/knn_translate.py                                   # the built-in task
    python examples/knn_translate.py \\
        --model_name_or_path Helsinki-NLP/opus-mt-de-en \\
        --datastore_source_file ../shared/data/multi_domain_deen/koran/train.de \\
        --datastore_target_file ../shared/data/multi_domain_deen/koran/train.en \\
        --dev_source_file ../shared/data/multi_domain_deen/koran/dev.de \\
        --dev_target_file ../shared/data/multi_domain_deen/koran/dev.en --max_dev_samples 500 \\
        --test_source_file ../shared/data/multi_domain_deen/koran/test.de \\
        --test_target_file ../shared/data/multi_domain_deen/koran/test.en --output_dir outputs/koran
    python examples/knn_translate.py --model_name_or_path ... --dataset_name wmt16 --dataset_config_name de-en \\
        --source_lang de --target_lang en --datastore_split train --dev_split validation --test_split test

Writes `<output_dir>/all_results.json` (BLEU with and without kNN, the tuned k / T / λ, the grid, the datastore size
and bytes, tokens/s), the test hypotheses, the datastore in `<output_dir>/datastore` (`--push_to_hub` uploads it) and,
for the built-in task, the trained model in `<output_dir>/model`. `examples/prune_datastore.py --knn_dir <output_dir>`
then sweeps pruning and compression of that datastore.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    HfArgumentParser,
    LogitsProcessorList,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
)

from hf_realm import KNNDatastore, KNNLogitsProcessor
from hf_realm.utils import FAISS, SACREBLEU, check_dependencies, parse_args


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A seq2seq model (Hub id or path). Default: train the built-in tiny model."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, float32, float16 or bfloat16."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets translation dataset."})
    dataset_config_name: str | None = field(default=None)
    source_lang: str = field(default="de")
    target_lang: str = field(default="en")
    datastore_split: str = field(default="train")
    dev_split: str = field(default="validation")
    test_split: str = field(default="test")
    datastore_source_file: str | None = field(default=None, metadata={"help": "Line-aligned text files instead."})
    datastore_target_file: str | None = field(default=None)
    dev_source_file: str | None = field(default=None)
    dev_target_file: str | None = field(default=None)
    test_source_file: str | None = field(default=None)
    test_target_file: str | None = field(default=None)
    datastore_lines: str | None = field(
        default=None, metadata={"help": "Line range start:end of the datastore files."}
    )
    dev_lines: str | None = field(default=None, metadata={"help": "Line range start:end of the dev files."})
    max_datastore_samples: int | None = field(default=None)
    max_dev_samples: int | None = field(default=None)
    max_test_samples: int | None = field(default=None)


@dataclass
class KNNArguments:
    k: int = field(default=8, metadata={"help": "Neighbours (used as is when --tune false)."})
    temperature: float = field(default=10.0)
    lmbda: float = field(default=0.5)
    tune: bool = field(default=True, metadata={"help": "Grid-search k / T / λ on the dev set (greedy decoding)."})
    k_grid: str = field(default="4,8,16")
    temperature_grid: str = field(default="1,10,100")
    lmbda_grid: str = field(default="0.3,0.5,0.7")
    index_type: str = field(default="auto")
    num_beams: int = field(default=4, metadata={"help": "Beams for the test set (tuning is greedy)."})
    batch_size: int = field(default=64)
    max_new_tokens: int = field(default=128)
    max_source_length: int = field(default=256)


@dataclass
class RunArguments:
    output_dir: str = field(default="outputs/knn_translate")
    seed: int = field(
        default=0, metadata={"help": "Seed of the built-in task's data, of the tiny model's training and of PyTorch."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the datastore to the Hub."})
    hub_datastore_id: str | None = field(default=None)
    synthetic_train_steps: int = field(default=2000, metadata={"help": "Training steps of the built-in tiny model."})
    device: str | None = field(default=None)


# ----------------------------------------------------------------------------------------------------------------------
# The built-in synthetic task
# ----------------------------------------------------------------------------------------------------------------------

_SRC_SYL = ["ka", "lo", "mi", "ten", "ru", "sa", "vo", "bel", "gri", "nu", "dos", "fa", "pe", "zil", "han", "tro"]
_TGT_SYL = ["ba", "de", "ko", "lin", "mo", "ra", "su", "tep", "vi", "gar", "nol", "pi", "fu", "zer", "hop", "wen"]


def _words(syllables, n, rng, taken):
    out = []
    while len(out) < n:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice([2, 3])))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def make_synthetic_task(
    seed: int = 0, n_general: int = 20000, n_domain: int = 4000, n_dev: int = 200, n_test: int = 400
):
    """A two-domain synthetic translation task; returns a dict of splits, each a list of (source, target) strings.

    Source grammar `DET NOUN [ADJ] VERB DET NOUN [ADJ] [PREP DET NOUN [ADJ]]`, target `DET [ADJ] NOUN ...` (adjectives
    move before nouns); every word has one translation except 25 *ambiguous* nouns, translated one way in the general
    domain and another way in the target domain. General sentences use mostly general words (5% domain words, ambiguous
    nouns always in their general sense); target-domain sentences use mostly domain words and, 85% of the time, the
    domain senses.
    """
    rng = random.Random(seed)
    src_taken, tgt_taken = set(), set()
    kinds = {"det": 3, "prep": 4, "g_noun": 80, "g_adj": 30, "g_verb": 30, "d_noun": 40, "d_adj": 15, "d_verb": 15}
    src = {kind: _words(_SRC_SYL, n, rng, src_taken) for kind, n in kinds.items()}
    tgt = {kind: _words(_TGT_SYL, n, rng, tgt_taken) for kind, n in kinds.items()}
    lexicon = {s: t for kind in kinds for s, t in zip(src[kind], tgt[kind], strict=True)}
    amb_src = _words(_SRC_SYL, 25, rng, src_taken)
    amb_general = dict(zip(amb_src, _words(_TGT_SYL, 25, rng, tgt_taken), strict=True))
    amb_domain = dict(zip(amb_src, _words(_TGT_SYL, 25, rng, tgt_taken), strict=True))

    def pick(domain, kind):
        if domain == "general":
            if kind == "noun":
                r = rng.random()
                return rng.choice(src["g_noun"] if r < 0.7 else amb_src if r < 0.95 else src["d_noun"])
            return rng.choice(src["g_" + kind] if rng.random() < 0.95 else src["d_" + kind])
        if kind == "noun":
            r = rng.random()
            return rng.choice(src["d_noun"] if r < 0.5 else amb_src if r < 0.9 else src["g_noun"])
        return rng.choice(src["d_" + kind] if rng.random() < 0.7 else src["g_" + kind])

    def noun_phrase(domain):
        det, noun = rng.choice(src["det"]), pick(domain, "noun")
        adj = pick(domain, "adj") if rng.random() < 0.5 else None
        # the target domain uses the domain sense of an ambiguous noun 85% of the time (so no system reaches 100)
        sense = amb_domain if domain != "general" and rng.random() < 0.85 else amb_general
        t_noun = sense.get(noun) or lexicon[noun]
        s = [det, noun] + ([adj] if adj else [])
        t = [lexicon[det]] + ([lexicon[adj]] if adj else []) + [t_noun]
        return s, t

    def sentence(domain):
        s1, t1 = noun_phrase(domain)
        verb = pick(domain, "verb")
        s2, t2 = noun_phrase(domain)
        s, t = s1 + [verb] + s2, t1 + [lexicon[verb]] + t2
        if rng.random() < 0.5:
            prep = rng.choice(src["prep"])
            s3, t3 = noun_phrase(domain)
            s, t = s + [prep] + s3, t + [lexicon[prep]] + t3
        return " ".join(s), " ".join(t)

    splits = {"general_train": [sentence("general") for _ in range(n_general)]}
    for name, n in (("domain_datastore", n_domain), ("domain_dev", n_dev), ("domain_test", n_test)):
        splits[name] = [sentence("domain") for _ in range(n)]
    return splits


def word_tokenizer(pairs) -> PreTrainedTokenizerFast:
    """A joint word-level tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2) that appends `</s>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for s, t in pairs for w in (s + " " + t).split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def train_tiny_translator(pairs, tokenizer, steps: int, seed: int = 0, device: str = "cpu", log=print):
    """Trains a 2+2-layer, d=64 Marian from scratch on ``pairs`` (AdamW, label smoothing 0.1)."""
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1, dropout=0.1,
        scale_embedding=True,
    )  # fmt: skip
    model = MarianMTModel(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(pairs, 64)
        enc = tokenizer([s for s, _ in batch], text_target=[t for _, t in batch], padding=True, return_tensors="pt")
        labels = enc["labels"].masked_fill(enc["labels"] == 0, -100)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                       labels=labels.to(device)).logits  # fmt: skip
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), labels.view(-1).to(device), ignore_index=-100, label_smoothing=0.1
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Translation, BLEU, tuning: shared with benchmarks/knn_mt_experiment.py
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def translate(
    model,
    tokenizer,
    sources: list[str],
    processor: KNNLogitsProcessor | None = None,
    batch_size: int = 64,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    max_source_length: int = 256,
) -> tuple[list[str], dict[str, float]]:
    """Translates ``sources`` (length-sorted batches), with the kNN processor when given; returns hypotheses, speed."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    hyps: list[str | None] = [None] * len(sources)
    tokens = 0
    lp = LogitsProcessorList([processor]) if processor is not None else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [sources[i] for i in idx], padding=True, truncation=True, max_length=max_source_length, return_tensors="pt"
        ).to(device)
        out = model.generate(
            **enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=lp
        )
        gen = out[:, 1:]
        pad, eos = model.generation_config.pad_token_id, model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        # tokens up to and including the first EOS
        is_eos = (gen == eos).int()
        before_eos = (is_eos.cumsum(1) - is_eos) == 0
        tokens += int((before_eos & (gen != pad) | (is_eos.bool() & before_eos)).sum())
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
            hyps[i] = text.strip()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return hyps, {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}


def corpus_bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def translate_with_knn(model, tokenizer, sources, store, k, temperature, lmbda, check_weights=True, **kw):
    processor = KNNLogitsProcessor(store, k=k, temperature=temperature, lmbda=lmbda)
    with processor.attach(model, tokenizer=tokenizer, check_weights=check_weights):
        return translate(model, tokenizer, sources, processor=processor, **kw)


def tune_knn(model, tokenizer, store, dev_src, dev_ref, ks, temperatures, lmbdas, log=print, **kw):
    """Greedy-decoding BLEU on the dev set for every (k, T, λ); returns the best setting and the whole grid."""
    grid = []
    for k, t, lm in itertools.product(ks, temperatures, lmbdas):
        if k > len(store):
            continue
        hyps, _ = translate_with_knn(model, tokenizer, dev_src, store, k, t, lm, num_beams=1, **kw)
        bleu = corpus_bleu(hyps, dev_ref)
        grid.append({"k": k, "temperature": t, "lmbda": lm, "dev_bleu": bleu})
        log(f"  dev k={k:<3d} T={t:<6g} λ={lm:<4g} BLEU {bleu:.2f}")
    best = max(grid, key=lambda g: g["dev_bleu"])
    return best, grid


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def read_lines(path: str, lines: str | None = None, max_samples: int | None = None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        data = f.read().split("\n")
    if data and data[-1] == "":
        data = data[:-1]
    if lines:
        start, _, end = lines.partition(":")
        data = data[int(start or 0) : int(end) if end else None]
    return data[:max_samples] if max_samples else data


def load_pairs(data: DataArguments, split: str) -> tuple[list[str], list[str]]:
    """(sources, targets) of a split from text files or a `datasets` translation dataset."""
    src_file = getattr(data, f"{split}_source_file")
    tgt_file = getattr(data, f"{split}_target_file")
    max_samples = getattr(data, f"max_{split}_samples")
    lines = getattr(data, f"{split}_lines", None)
    if src_file and tgt_file:
        src, tgt = read_lines(src_file, lines, max_samples), read_lines(tgt_file, lines, max_samples)
        if len(src) != len(tgt):
            raise ValueError(f"{src_file} has {len(src)} lines but {tgt_file} has {len(tgt)}")
        return src, tgt
    if data.dataset_name is None:
        raise ValueError(f"give --{split}_source_file/--{split}_target_file or --dataset_name")
    import datasets

    ds = datasets.load_dataset(data.dataset_name, data.dataset_config_name, split=getattr(data, f"{split}_split"))
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    if "translation" in ds.column_names:
        src = [x[data.source_lang] for x in ds["translation"]]
        tgt = [x[data.target_lang] for x in ds["translation"]]
    else:
        src, tgt = ds[data.source_lang], ds[data.target_lang]
    return list(src), list(tgt)


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, KNNArguments, RunArguments))


def check_extras(knn_args: KNNArguments) -> None:
    """Fail before any work (training the built-in model takes minutes) when an optional package is missing."""
    check_dependencies(
        "examples/knn_translate.py", [SACREBLEU, FAISS if knn_args.index_type.startswith("faiss") else None]
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, knn_args, run_args = parse_args(make_parser(), argv)
    check_extras(knn_args)
    torch.manual_seed(run_args.seed)
    device = run_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(run_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    results: dict = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    if model_args.model_name_or_path is None:
        if device == "cpu":
            # a model this small gains nothing from intra-op threads, and they slow it down badly on a busy machine
            torch.set_num_threads(1)
        log("Built-in task: a synthetic two-domain language pair; training a tiny Marian on the general domain")
        task = make_synthetic_task(run_args.seed)
        tokenizer = word_tokenizer([p for split in task.values() for p in split])
        model = train_tiny_translator(task["general_train"], tokenizer, run_args.synthetic_train_steps, run_args.seed,
                                      device=device, log=log)  # fmt: skip
        model.name_or_path = "synthetic-tiny-marian"
        ds_src, ds_tgt = map(list, zip(*task["domain_datastore"], strict=True))
        dev_src, dev_ref = map(list, zip(*task["domain_dev"], strict=True))
        test_src, test_ref = map(list, zip(*task["domain_test"], strict=True))
        results["task"] = "synthetic"
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        dtype = model_args.torch_dtype if model_args.torch_dtype == "auto" else getattr(torch, model_args.torch_dtype)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, dtype=dtype).to(device).eval()
        ds_src, ds_tgt = load_pairs(data_args, "datastore")
        dev_src, dev_ref = load_pairs(data_args, "dev")
        test_src, test_ref = load_pairs(data_args, "test")
        results["task"] = data_args.dataset_name or data_args.test_source_file
        overlap = len(set(dev_src) & set(ds_src))
        if overlap:
            log(f"warning: {overlap} dev sources are also in the datastore")
    results.update(model=model.name_or_path, datastore_pairs=len(ds_src), dev_pairs=len(dev_src),
                   test_pairs=len(test_src))  # fmt: skip

    import datasets

    log(f"Building the datastore from {len(ds_src)} pairs")
    t0 = time.time()
    store = KNNDatastore.build(
        model,
        datasets.Dataset.from_dict({"source": ds_src, "target": ds_tgt}),
        out_dir / "datastore",
        tokenizer=tokenizer,
        source_column="source",
        target_column="target",
        batch_size=knn_args.batch_size,
        max_length=knn_args.max_source_length,
    )
    store.build_index(knn_args.index_type, device=device)
    results.update(datastore_entries=len(store), datastore_bytes=store.nbytes, build_seconds=time.time() - t0,
                   index_type=store.index_type)  # fmt: skip
    log(f"  {len(store)} entries, {store.nbytes / 2**20:.1f} MiB, index {store.index_type}")

    kw = dict(batch_size=knn_args.batch_size, max_new_tokens=knn_args.max_new_tokens,
              max_source_length=knn_args.max_source_length)  # fmt: skip
    if knn_args.tune:
        log("Tuning k / T / λ on the dev set (greedy)")
        dev_base, _ = translate(model, tokenizer, dev_src, num_beams=1, **kw)
        results["dev_base_bleu"] = corpus_bleu(dev_base, dev_ref)
        log(f"  dev base BLEU {results['dev_base_bleu']:.2f}")
        best, grid = tune_knn(
            model, tokenizer, store, dev_src, dev_ref, [int(x) for x in _floats(knn_args.k_grid)],
            _floats(knn_args.temperature_grid), _floats(knn_args.lmbda_grid), log=log, **kw,
        )  # fmt: skip
        results["grid"] = grid
        k, temperature, lmbda = best["k"], best["temperature"], best["lmbda"]
        results["dev_knn_bleu"] = best["dev_bleu"]
    else:
        k, temperature, lmbda = knn_args.k, knn_args.temperature, knn_args.lmbda
    results.update(k=k, temperature=temperature, lmbda=lmbda, test_num_beams=knn_args.num_beams)

    log(f"Test set ({len(test_src)} sentences, beam {knn_args.num_beams})")
    base_hyps, base_speed = translate(model, tokenizer, test_src, num_beams=knn_args.num_beams, **kw)
    knn_hyps, knn_speed = translate_with_knn(
        model, tokenizer, test_src, store, k, temperature, lmbda, num_beams=knn_args.num_beams, **kw
    )
    results.update(
        test_base_bleu=corpus_bleu(base_hyps, test_ref),
        test_knn_bleu=corpus_bleu(knn_hyps, test_ref),
        base_tokens_per_second=base_speed["tokens_per_second"],
        knn_tokens_per_second=knn_speed["tokens_per_second"],
    )
    results["test_bleu_gain"] = results["test_knn_bleu"] - results["test_base_bleu"]
    with open(out_dir / "test_hypotheses.jsonl", "w") as f:
        for src, ref, b, h in zip(test_src, test_ref, base_hyps, knn_hyps, strict=True):
            f.write(json.dumps({"source": src, "reference": ref, "base": b, "knn": h}, ensure_ascii=False) + "\n")
    if results["task"] == "synthetic":  # kept, so that examples/prune_datastore.py can sweep this datastore
        model.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
        results["model_dir"] = str(out_dir / "model")
    with open(out_dir / "all_results.json", "w") as f:
        json.dump(results, f, indent=2)
    if run_args.push_to_hub:
        store.push_to_hub(run_args.hub_datastore_id or f"{out_dir.name}-knn-datastore")

    log("")
    log(f"| {'':24s} | {'BLEU':>6s} | {'tokens/s':>9s} |")
    log(f"| {'base model':24s} | {results['test_base_bleu']:6.2f} | {base_speed['tokens_per_second']:9.0f} |")
    label = f"kNN-MT k={k} T={temperature:g} λ={lmbda:g}"
    log(f"| {label:24s} | {results['test_knn_bleu']:6.2f} | {knn_speed['tokens_per_second']:9.0f} |")
    log(f"datastore: {len(store)} entries, {store.nbytes / 2**20:.1f} MiB; results in {out_dir / 'all_results.json'}")
    return results


if __name__ == "__main__":
    main()
