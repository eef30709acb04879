"""Multi-process REALM pretraining: `examples/train_realm.py` under a 2-process `accelerate launch` (gloo on the CPU)
resumes model and index exactly and all-reduces bf16 gradients when asked; the step FLOPs, the unused weights and the
steady-state timing against exact references; `benchmarks/train_realm_distributed.py --tiny` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_realm import RealmBlockIndex, RealmForInverseClozeTask, RealmForMaskedLM
from hf_realm.callbacks import StepTimerCallback, _RealmFlopsCounter, realm_step_flops

from .conftest import ACCELERATE_LAUNCHER, ROOT, free_port, needs_accelerate, subprocess_env, tiny_realm_config
from .test_knn_generation import _load_script


LAUNCHER = ACCELERATE_LAUNCHER
TINY = ["--use_cpu", "true", "--num_entities", "60", "--hidden_size", "32", "--num_hidden_layers", "2",
        "--num_attention_heads", "4", "--intermediate_size", "37", "--retriever_proj_size", "16", "--ict_steps", "4", "--reader_warmup_steps", "2",
        "--per_device_train_batch_size", "4", "--max_eval_examples", "8", "--synthetic_blocks", "40", "--monitor_steps", "0", "--disable_tqdm", "true", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def train_realm():
    return _load_script("examples/train_realm.py")


@pytest.fixture(scope="module")
def driver():
    return _load_script("benchmarks/train_realm_distributed.py")


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    # `--multi_gpu` picks accelerate's torchrun launcher; `--use_cpu true` then gives gloo (see test_distributed_refresh)
    cmd = [LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
           str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "examples", "train_realm.py"), *args]  # fmt: skip
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# torch < 2.12 cannot load a checkpoint to `cpu:0`, the device Trainer gives each rank of a `--use_cpu` torchrun
# launch (seen with torch 2.11 on the GPU machine); the resume on CUDA is run d of benchmarks/train_realm_distributed.py
_CPU_RANK_RESUME = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12),
    reason="torch < 2.12 cannot restore a checkpoint to the 'cpu:0' device of a --use_cpu torchrun rank",
)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Two processes: 4 steps with bf16 gradients, checkpoints at 2 and 4 and a refresh at 3 (so the two checkpoints
    hold different indexes); then a second launch resumes from checkpoint-4 up to step 6."""
    out = tmp_path_factory.mktemp("resume")
    common = [*TINY, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--refresh_steps", "3"]
    launch_two([*common, "--max_steps", "4", "--ddp_bf16_grads", "true"])
    with open(out / "all_results.json") as f:
        first = json.load(f)
    result = launch_two([*common, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-4")])
    with open(out / "all_results.json") as f:
        resumed = json.load(f)
    return out, first, resumed, result.stderr


@needs_accelerate
@_CPU_RANK_RESUME
def test_two_process_resume_restores_weights_and_index_exactly(resumed_run, train_realm, driver):
    out, _, resumed, log = resumed_run
    record = resumed["resume"]
    assert record["step"] == 4 and resumed["global_step"] == 6
    assert log.count(f"index restored from {out / 'checkpoint-4' / 'index'}") == 2  # on both ranks
    check = driver.check_resume(str(out / "checkpoint-4"), record, train_realm.tensor_sha256)
    assert check["passed"], check
    assert check["weights_checked"] > 50 and check["index_blocks"] == 60 + 40
    # checkpoint-2 holds other weights and the index from before the refresh at step 3: the equalities above pick the
    # checkpoint the run resumed from, nothing weaker
    earlier = driver.check_resume(str(out / "checkpoint-2"), record, train_realm.tensor_sha256)
    assert not earlier["weights_equal"] and not earlier["index_embeddings_equal"] and not earlier["step_restored"]
    assert len(earlier["mismatched_weights"]) == 10
    index4 = RealmBlockIndex.from_pretrained(str(out / "checkpoint-4" / "index")).embeddings
    index2 = RealmBlockIndex.from_pretrained(str(out / "checkpoint-2" / "index")).embeddings
    assert not torch.equal(index4, index2)


@needs_accelerate
@_CPU_RANK_RESUME
def test_ddp_bf16_grads_registers_the_hook_and_trains(resumed_run):
    _, first, resumed, _ = resumed_run
    ddp = first["ddp"]
    assert ddp["ddp"] and ddp["comm_hook"] == "bf16_grads_hook"  # what DDP itself reports
    assert not ddp["find_unused_parameters"] and not ddp["broadcast_buffers"]
    assert "encoder.realm.pooler.dense.weight" in ddp["frozen_unused_parameters"]
    assert first["global_step"] == 4 and first["num_processes"] == 2 and first["refresh_sharded"]
    assert torch.isfinite(torch.tensor(first["train_loss"]))
    assert resumed["ddp"]["comm_hook"] is None  # the resumed launch did not ask for it
    assert first["refresh_steps_done"] == [3] and len(first["refresh_seconds"]) == 1


def _tiny_masked_lm(tie: bool, share: bool = True) -> RealmForMaskedLM:
    torch.manual_seed(0)
    config = tiny_realm_config(num_candidates=3, tie_word_embeddings=tie, share_embedders=share,
                               attn_implementation="eager")  # fmt: skip
    model = RealmForMaskedLM(config)
    blocks = [[2, 10 + i, 11 + i, 3] + [20 + i] * (1 + i % 3) + [3] for i in range(6)]

    class Index:  # candidates are given: no search
        def block_inputs(self, ids):
            rows = [blocks[i] for i in ids.tolist()]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}

    model.index = Index()
    return model.train()


def _masked_lm_step(model):
    input_ids = torch.tensor([[2, 40, 4, 41, 3, 0], [2, 42, 43, 4, 4, 3]])
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 3], labels[1, 4] = 21, 22, 23
    out = model(input_ids, attention_mask=(input_ids != 0).long(), labels=labels,
                candidate_block_ids=torch.tensor([[0, 1], [2, 5]]))  # fmt: skip
    out.loss.backward()


def test_realm_step_flops_hand_count():
    """h 32, i 37, 2 layers, p 16, V 99, k 3; B 2, Lq 8, Lb 6, Lj 14, M 2, counted by hand."""
    config = tiny_realm_config(num_candidates=3)
    layer = lambda n, L: 2 * n * L * (4 * 32 * 32 + 2 * 32 * 37) + 4 * n * L * L * 32  # noqa: E731
    query = 2 * layer(2, 8) + 2 * 2 * (32 * 32 + 32 * 16)  # 2 layers + pooler and projection on [CLS]
    docs = 2 * layer(4, 6) + 2 * 4 * (32 * 32 + 32 * 16)  # B (k - 1) = 4 candidates
    logits = 2 * 4 * 16
    reader = 2 * layer(6, 14)  # B k = 6 joint inputs
    head = 2 * 2 * 3 * (32 * 32 + 32 * 99)  # M k = 6 rows: transform, decoder
    expected = 3 * (query + docs + logits + reader + head) + 2 * 6 * 32 * 32  # the reader's pooler: forward only
    assert expected == 10_949_376
    assert realm_step_flops(config, 2, 8, 6, 14, 2) == expected


@pytest.mark.parametrize("share", [True, False])
def test_step_flops_counter_equals_torch_flop_counter(share):
    """The hooks see the padded shapes of every tower; the formula then gives exactly the matmul FLOPs torch counts in
    one forward and backward (eager attention: its matmuls are counted too)."""
    model = _tiny_masked_lm(tie=False, share=share)
    counter = _RealmFlopsCounter(model)
    with FlopCounterMode(display=False) as flop_counter:
        _masked_lm_step(model)
    assert counter.forwards == 1
    # B 2, Lq 6; candidate blocks 0, 1, 2, 5 (6, 7, 8, 7 wordpieces) padded to 8; the longest joint input is query 1
    # (6 wordpieces) with block 2 less its [CLS]: 13; 3 masked positions
    assert counter.flops == realm_step_flops(model.config, 2, 6, 8, 13, 3) == flop_counter.get_total_flops()
    with torch.no_grad():  # evaluations are not training steps
        model(torch.tensor([[2, 40, 4, 3]]), labels=torch.tensor([[-100, -100, 21, -100]]),
              candidate_block_ids=torch.tensor([[0, 1]]))  # fmt: skip
    counter.remove()
    _masked_lm_step(model)
    assert counter.forwards == 1


@pytest.mark.parametrize("tie", [True, False])
def test_freeze_unused_parameters_leaves_exactly_the_weights_that_get_gradients(train_realm, tie):
    model = _tiny_masked_lm(tie=tie)
    _masked_lm_step(model)
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    model.zero_grad(set_to_none=True)
    frozen = train_realm.freeze_unused_parameters(model)
    assert set(frozen) == no_grad and ("encoder.cls.predictions.bias" in frozen) == (not tie)
    _masked_lm_step(model)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    ict = RealmForInverseClozeTask(tiny_realm_config(share_embedders=False))
    frozen = train_realm.freeze_unused_parameters(ict)
    ict(torch.randint(5, 99, (3, 7)), torch.randint(5, 99, (3, 9))).loss.backward()
    assert {n for n, p in ict.named_parameters() if p.grad is None} == set(frozen)
    assert {n.split(".")[0] for n in frozen} == {"embedder", "query_embedder"}


def test_step_timer_summary_leaves_out_refreshes_saves_and_warmup():
    timer = StepTimerCallback(warmup_steps=1)
    timer.steps = [1, 2, 3, 4, 5, 6, 7]
    timer.begins = [0.0, 1.0, 2.0, 5.0, 5.5, 6.0, 7.0]
    timer.ends = [b + 0.25 for b in timer.begins]
    timer.step_seconds = [0.25, 0.5, 0.25, 0.4, 0.3, 0.25, 0.25]
    timer.saved_steps = {5}
    # step 3's interval [2, 5) holds a sync refresh; a background refresh runs over [5, 6.5]
    summary = timer.summary(busy_windows=[(2.3, 4.9), (5.0, 6.5)], exclude_steps=[])
    # step 1: warm-up; 3: refresh; 5: save; 6: [6, 7) overlaps the window's end; 7: no next start. Left: step 2.
    assert summary["steady_steps"] == 1 and summary["steady_steps_per_second"] == 1.0
    assert summary["step_seconds"] == 0.5
    # inside the background window: step 4's interval [5, 5.5] only (step 5 is a save)
    assert summary["steps_inside_busy_windows"] == 1 and summary["steps_per_second_while_busy"] == 2.0
    assert summary["step_seconds_while_busy"] == 0.4
    unbusy = timer.summary(exclude_steps=[2])
    assert unbusy["steady_steps"] == 3 and unbusy["steady_steps_per_second"] == pytest.approx(3 / 4.5)  # 3, 4, 6
    assert "mfu" not in unbusy


@pytest.mark.slow
@needs_accelerate
def test_driver_tiny_runs_every_run_and_writes_the_json(tmp_path, driver):
    """`benchmarks/train_realm_distributed.py --tiny`: every run on 2 (gloo) or 1 CPU processes, one JSON with each
    run's figures, the resume check passing and the scaling ratios computed from the runs' own figures."""
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_realm_distributed.py"), "--tiny", "--out",
           str(tmp_path), "--budget_s", "1200"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / driver.RESULT_FILE) as f:
        report = json.load(f)
    assert set(report["runs"]) == set(driver.RUN_ORDER) and not report["skipped"]
    for name, run in report["runs"].items():
        r = run["results"]
        assert run["returncode"] == 0 and r["num_processes"] == run["num_processes"], name
        keys = ["train_steps_per_second", "flops_per_step_per_process", "final_refresh_blocks_per_second_per_process",
                "eval_recall@8", "eval_masked_span_accuracy"]  # fmt: skip
        # the resumed run's 3 steps hold a save, a refresh and the warm-up: no steady step left to time
        keys += ["steady_steps_per_second", "step_seconds"] if name != "d" else []
        for key in keys:
            assert isinstance(r[key], float), (name, key)
        assert r["refresh_seconds"], name
        assert "mfu" not in r  # no peak on the CPU
    assert report["runs"]["c"]["results"]["steps_inside_busy_windows"] >= 0
    assert report["runs"]["e"]["results"]["ddp"]["comm_hook"] == "bf16_grads_hook"
    assert report["runs"]["d"]["resume_check"]["passed"] and report["runs"]["d"]["resume_check"]["final_step"] == 7
    a, b = report["runs"]["a"]["results"], report["runs"]["b"]["results"]
    ratio = a["steady_steps_per_second"] / b["steady_steps_per_second"]
    assert report["scaling"]["a_vs_b_steady_steps_per_second"] == pytest.approx(ratio)
    assert "a" in result.stdout and "steady" in result.stdout
