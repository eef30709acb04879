"""`accelerate launch --num_processes 2` on CPU (gloo): a sharded index refresh gives the 1-process index."""

import json
import os
import subprocess

import torch

from hf_realm import embed_corpus

from .conftest import ACCELERATE_LAUNCHER, free_port, needs_accelerate, subprocess_env
from .scripts.distributed_refresh_worker import build


WORKER = os.path.join(os.path.dirname(__file__), "scripts", "distributed_refresh_worker.py")


@needs_accelerate
def test_two_process_refresh_equals_one_process(tmp_path):
    launcher = ACCELERATE_LAUNCHER
    env = subprocess_env(OMP_NUM_THREADS="1")
    # `--multi_gpu` only picks accelerate's torchrun launcher; the worker asks for the CPU (gloo) itself, as
    # `TrainingArguments(use_cpu=True)` does. (`--cpu` alone needs mpirun for more than one process.)
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        WORKER,
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    embedder, corpus = build()
    reference = embed_corpus(embedder, corpus, batch_size=8, show_progress=False)
    counts = []
    for rank in range(2):
        got = torch.load(tmp_path / f"embeddings_rank{rank}.pt")
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
        with open(tmp_path / f"count_rank{rank}.json") as f:
            info = json.load(f)
        assert info["world"] == 2
        counts.append(info["blocks_embedded"])
    assert counts == [25, 25]  # each rank embedded its own half, then all gathered the whole


@needs_accelerate
def test_train_realm_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 examples/train_realm.py --use_cpu true`: every refresh,
    the final one included (all ranks take part), succeeds."""
    launcher = ACCELERATE_LAUNCHER
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision",
           "no", "--dynamo_backend", "no", os.path.join(root, "examples", "train_realm.py"), "--use_cpu", "true",
           "--num_entities", "100", "--max_steps", "10", "--ict_steps", "10", "--reader_warmup_steps", "4", "--refresh_steps", "5",
           "--max_eval_examples", "20", "--output_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed" not in result.stderr, result.stderr[-3000:]
    # the final refresh ran on both ranks: two log lines for each refreshed step
    assert result.stderr.count("index refreshed at step 10") == 2, result.stderr[-3000:]
    with open(tmp_path / "all_results.json") as f:
        results = json.load(f)
    assert results["eval_num_examples"] == 20 and results["index_refreshes"] == 1


def test_synthetic_blocks_extend_the_world_corpus():
    """`train_realm.py --synthetic_blocks`: the world's blocks keep their ids, the fillers follow, each its own
    document, `[CLS] title [SEP] body [SEP]` of exactly `seq_len` non-special wordpieces otherwise."""
    import numpy as np

    from hf_realm import KnowledgeWorld, build_corpus

    from .test_knn_generation import _load_script

    train_realm = _load_script("examples/train_realm.py")
    world = KnowledgeWorld(num_entities=20, seed=0)
    tokenizer = world.tokenizer()
    corpus = build_corpus(world.corpus(), tokenizer)
    full = train_realm.add_synthetic_blocks(corpus, 50, 40, len(tokenizer), tokenizer, seed=0)
    assert len(full) == len(corpus) + 50
    assert full.select(range(len(corpus)))["input_ids"] == corpus["input_ids"]
    filler = full.select(range(len(corpus), len(full)))
    assert filler["block_id"] == list(range(len(corpus), len(corpus) + 50))
    assert filler["doc_id"] == list(range(max(corpus["doc_id"]) + 1, max(corpus["doc_id"]) + 51))
    ids = np.array(filler["input_ids"])
    assert ids.shape == (50, 40)
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, [9, 39]] == tokenizer.sep_token_id).all()
    body = np.delete(ids, [0, 9, 39], axis=1)
    assert body.min() > max(tokenizer.all_special_ids) and body.max() < len(tokenizer)
    assert filler["token_type_start"] == [10] * 50
