"""How fast a REALM reader learns to copy from a block: `train_reader_warm_start` on the built-in world (each corpus
sentence, a salient span masked, read with its own block), the held-out own-block MLM loss every 100 steps, for a tied
and an untied MLM decoder (2-layer reader of width 128 from scratch, lr 1e-3, batch 32, 1 thread).

    python benchmarks/bench_reader_copy.py --steps 1000 --output benchmarks/results/bench_reader_copy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def curve(tie: bool, steps: int, seed: int) -> list[tuple[int, float]]:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from hf_realm import (
        DataCollatorForSalientSpanMasking,
        KnowledgeWorld,
        RealmBlockIndex,
        RealmConfig,
        RealmForMaskedLM,
        build_corpus,
        build_pretraining_examples,
        train_reader_warm_start,
    )

    torch.set_num_threads(1)
    world = KnowledgeWorld(num_entities=1000, seed=seed)
    tokenizer = world.tokenizer(model_max_length=128)
    corpus = build_corpus(world.corpus(), tokenizer, block_seq_len=288)
    torch.manual_seed(seed)
    config = RealmConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, retriever_proj_size=128, max_position_embeddings=128,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=tie)  # fmt: skip
    model = RealmForMaskedLM(config)
    model.index = RealmBlockIndex.build(corpus, model.embedder, embed_kwargs={"show_progress": False})
    examples = build_pretraining_examples(corpus, None, tokenizer=tokenizer, max_length=64)
    probe = [examples[i] for i in range(0, len(examples), max(1, len(examples) // 256))][:256]
    batch = DataCollatorForSalientSpanMasking(tokenizer, max_length=64, seed=seed + 1)(probe)
    history = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 100 == 0:
                model.eval()
                with torch.no_grad():
                    loss = model.reader_mlm_loss(
                        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["source_block_id"]
                    )
                model.train()
                history.append((state.global_step, round(loss.item(), 4)))

    args = TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
                             warmup_steps=20, lr_scheduler_type="constant_with_warmup", report_to=[], use_cpu=True,
                             save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             logging_steps=10**6, seed=seed)  # fmt: skip
    train_reader_warm_start(model, corpus, tokenizer, args, max_length=64, callbacks=[Probe()])
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_reader_copy_cpu.json"))
    args = p.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "seed": args.seed, "curves": {}}
    for tie in (True, False):
        start = time.time()
        report["curves"]["tied" if tie else "untied"] = {"loss_every_100_steps": curve(tie, args.steps, args.seed),
                                                          "seconds": time.time() - start}  # fmt: skip
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print("step  " + "  ".join(f"{k:>8}" for k in report["curves"]))
    rows = zip(*(c["loss_every_100_steps"] for c in report["curves"].values()), strict=True)
    for row in rows:
        print(f"{row[0][0]:>4}  " + "  ".join(f"{loss:8.3f}" for _, loss in row))


if __name__ == "__main__":
    main()
