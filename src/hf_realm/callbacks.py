"""`IndexRefreshCallback`: keep REALM's cached doc embeddings fresh while `Trainer` moves the doc encoder.
`StepTimerCallback`: steady-state step times and the MFU of a training step.
`FreezeRetrieverCallback`: stop training the retriever after a number of steps while the reader trains on."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future

import torch
from transformers import TrainerCallback
from transformers.modeling_utils import unwrap_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, unwrap_peft_model
from transformers.utils import logging

from .corpus_index import RealmBlockIndex


logger = logging.get_logger(__name__)

INDEX_DIR_IN_CHECKPOINT = "index"
REFRESH_STATE_FILE = "refresh_state.json"


def _doc_embedder(model):
    # Trainer hands callbacks its model: unwrap DDP / DeepSpeed / torch.compile (accelerate) and peft wrappers.
    model = unwrap_peft_model(unwrap_model(model))
    # RealmForOpenQA's `embedder` is its query tower; a trainable doc tower is `doc_embedder`
    embedder = model._modules.get("doc_embedder")
    if embedder is None:
        embedder = getattr(model, "embedder", None)
    if embedder is None:
        raise ValueError(f"{type(model).__name__} has no `embedder` (the doc encoder) to refresh the index with")
    return embedder


def _checkpoint_index_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}", INDEX_DIR_IN_CHECKPOINT)


class IndexRefreshCallback(TrainerCallback):
    r"""
    Re-embeds the corpus with the current doc encoder every `refresh_steps` optimizer steps and swaps the new
    embeddings into the index atomically (REALM refreshes every ~500 steps: a stale index makes retrieval worse).

    - **sync** mode: training pauses while the corpus is embedded ([`embed_corpus`]: length-bucketed, bf16 on GPU,
      sharded over the processes under `accelerate` and gathered, so every process gets the same index).
    - **async** mode: the doc encoder is copied and the copy embeds the corpus on a background thread while training
      continues; the new embeddings are swapped in (one assignment) as soon as they are ready, and booked at the next
      step boundary (one refresh in flight at a time). With several processes each embeds the whole corpus on its own
      (no collective calls from a background thread).
    - Both modes go through [`~RealmBlockIndex.refresh`] (``background=True`` for async).
    - A failed refresh (an exception while embedding or building) is logged and the old index keeps serving;
      training goes on. An interrupted one never swaps anything in.
    - Logs `index_staleness` (optimizer steps since the serving embeddings were computed), `index_refresh_seconds`
      and `index_refreshes`; keeps every refresh of this run in `refresh_history` (step, mode, seconds, and its
      `time.perf_counter` window, which [`StepTimerCallback.summary`] leaves out of the steady-state figures); saves the index into each checkpoint (`checkpoint-N/index/`) and reloads it from there
      when training resumes, so model and index resume together.

    Args:
        index ([`RealmBlockIndex`]): The index the model searches (the same object: it is updated in place).
        refresh_steps (`int`, *optional*, defaults to 500): Refresh every this many steps; 0 disables refreshing.
        mode (`str`, *optional*, defaults to `"sync"`): `"sync"` or `"async"`.
        embed_kwargs (`dict`, *optional*): Passed to [`embed_corpus`] (`batch_size`, `dtype`, ...).
        refresh_at_train_end (`bool`, *optional*, defaults to `False`): Refresh once more when training ends.
        save_index (`bool`, *optional*, defaults to `True`): Save the index with each checkpoint.

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm import RealmConfig, RealmEmbedder
    >>> from hf_realm.callbacks import IndexRefreshCallback
    >>> from hf_realm.embedding import embed_corpus
    >>> from hf_realm.corpus_index import RealmBlockIndex
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16)
    >>> embedder = RealmEmbedder(config)
    >>> corpus = datasets.Dataset.from_dict({"input_ids": [[2, 10, 3], [2, 11, 12, 3], [2, 13, 3]]})
    >>> index = RealmBlockIndex.build(corpus, embedder, backend="torch", embed_kwargs={"show_progress": False})
    >>> callback = IndexRefreshCallback(index, refresh_steps=100, embed_kwargs={"show_progress": False})
    >>> with torch.no_grad():
    ...     _ = embedder.cls.dense.weight.mul_(2.0)  # training moved the doc encoder
    >>> callback.refresh(embedder, step=100)  # what Trainer triggers every 100 steps
    True
    >>> torch.allclose(index.embeddings, embed_corpus(embedder, corpus, show_progress=False))
    True
    ```
    """

    def __init__(
        self,
        index: RealmBlockIndex,
        refresh_steps: int = 500,
        mode: str = "sync",
        embed_kwargs: dict | None = None,
        refresh_at_train_end: bool = False,
        save_index: bool = True,
    ):
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        if refresh_steps < 0:
            raise ValueError(f"refresh_steps must be >= 0 (0 disables refreshing), got {refresh_steps}")
        self.index = index
        self.refresh_steps, self.mode = refresh_steps, mode
        self.embed_kwargs = dict(embed_kwargs or {})
        self.refresh_at_train_end, self.save_index = refresh_at_train_end, save_index
        self.built_at_step = self.num_refreshes = self.failures = 0
        self.last_refresh_seconds: float | None = None
        self.refresh_history: list[dict] = []
        self._pending: Future | None = None
        self._pending_step = 0
        self._pending_window: list[float | None] = [0.0, None]

    # -- the refresh itself: RealmBlockIndex.refresh, with bookkeeping and failure safety ---------------------------

    def refresh(self, embedder, step: int) -> bool:
        """Re-embed the corpus with ``embedder`` now and swap the result in; returns whether it succeeded."""
        start = time.perf_counter()
        try:
            seconds = self.index.refresh(embedder, **self.embed_kwargs)
        except Exception as err:  # the old index keeps serving; training goes on
            self.failures += 1
            logger.error(f"index refresh at step {step} failed, the previous index keeps serving: {err!r}")
            return False
        self._refreshed(step, seconds, "sync", (start, time.perf_counter()))
        return True

    def _refreshed(self, step: int, seconds: float, mode: str, window: tuple[float, float]) -> None:
        self.built_at_step = step
        self.num_refreshes += 1
        self.last_refresh_seconds = seconds
        self.refresh_history.append({"step": step, "mode": mode, "seconds": seconds, "window": window})
        logger.info(f"index refreshed at step {step} in {seconds:.2f}s ({self.index.num_blocks} blocks)")

    @property
    def refresh_windows(self) -> list[tuple[float, float | None]]:
        """`time.perf_counter` spans of this run's refreshes (the snapshot copy included for async ones); an async
        refresh still running ends at `None`."""
        windows = [r["window"] for r in self.refresh_history]
        if self._pending is not None:
            windows.append(tuple(self._pending_window))
        return windows

    def _start_async(self, embedder, step: int) -> None:
        window: list[float | None] = [time.perf_counter(), None]
        self._pending = self.index.refresh(embedder, background=True, **self.embed_kwargs)
        self._pending_step, self._pending_window = step, window
        # the moment the background thread finishes, not the step boundary where it is booked
        self._pending.add_done_callback(lambda _: window.__setitem__(1, time.perf_counter()))

    def _finish_async(self, wait: bool) -> None:
        """Books a finished background refresh (the index swapped it in itself when it was ready)."""
        if self._pending is None or (not wait and not self._pending.done()):
            return
        future, self._pending = self._pending, None
        err = future.exception()  # waits when the refresh is still running
        if err is not None:
            self.failures += 1
            logger.error(f"async index refresh from step {self._pending_step} failed: {err!r}")
            return
        window = (self._pending_window[0], self._pending_window[1] or time.perf_counter())
        self._refreshed(self._pending_step, future.result(), "async", window)

    # -- Trainer hooks --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:  # resuming: the checkpoint's index goes with the checkpoint's model
            path = _checkpoint_index_dir(args.output_dir, state.global_step)
            if os.path.isdir(path):
                saved = RealmBlockIndex.from_pretrained(path)
                self.index.update_embeddings(
                    saved.embeddings, embedder_name=saved.embedder_name, embedder_hash=saved.embedder_hash
                )
                self.built_at_step, self.num_refreshes = state.global_step, 0
                state_file = os.path.join(path, REFRESH_STATE_FILE)
                if os.path.isfile(state_file):
                    with open(state_file) as f:
                        saved_state = json.load(f)
                    self.built_at_step = int(saved_state["built_at_step"])
                    self.num_refreshes = int(saved_state["num_refreshes"])
                logger.info(f"index restored from {path}")
            else:
                logger.warning(f"resuming at step {state.global_step} without a saved index in {path}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.mode == "async":
            self._finish_async(wait=False)
        if self.refresh_steps == 0 or state.global_step % self.refresh_steps != 0:
            return
        if state.global_step >= state.max_steps:  # the last step: nothing trains on a new index any more
            return
        embedder = _doc_embedder(model)
        if self.mode == "sync":
            self.refresh(embedder, state.global_step)
        elif self._pending is None:
            self._start_async(embedder, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.mode == "async":
            self._finish_async(wait=True)
        if self.refresh_at_train_end and self.built_at_step != state.global_step:
            self.refresh(_doc_embedder(model), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        extra = {"index_staleness": state.global_step - self.built_at_step, "index_refreshes": self.num_refreshes}
        if self.last_refresh_seconds is not None:
            extra["index_refresh_seconds"] = round(self.last_refresh_seconds, 3)
        logs.update(extra)  # seen by the callbacks after this one (printing, trackers)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # Trainer recorded the entry before calling back

    def on_save(self, args, state, control, **kwargs):
        if not self.save_index or not state.is_world_process_zero:
            return
        if self.mode == "async":
            self._finish_async(wait=False)  # book a refresh that has already swapped in before saving its step
        path = _checkpoint_index_dir(args.output_dir, state.global_step)
        self.index.save_pretrained(path)
        with open(os.path.join(path, REFRESH_STATE_FILE), "w") as f:
            json.dump({"built_at_step": self.built_at_step, "num_refreshes": self.num_refreshes}, f)


# -- step FLOPs and MFU ------------------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("A100", 312.0))  # dense bf16 tensor-core peaks (SXM)


def device_peak_tflops(device) -> float | None:
    """The dense bf16 peak TFLOP/s of a CUDA device known by name (H200, H100, A100); `None` otherwise."""
    if getattr(device, "type", None) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def bert_forward_flops(config, num_sequences: int, length: int) -> int:
    """Matmul FLOPs of one BERT forward over ``num_sequences`` sequences padded to ``length``: per layer the Q, K, V,
    output and FFN projections, ``2 n L (4 h^2 + 2 h i)``, and the attention scores and weighted sum, ``4 n L^2 h``."""
    h, i, n, L = config.hidden_size, config.intermediate_size, num_sequences, length
    return config.num_hidden_layers * (2 * n * L * (4 * h * h + 2 * h * i) + 4 * n * L * L * h)


def realm_step_flops(
    config, batch_size: int, query_length: int, block_length: int, joint_length: int, num_masked: int
) -> int:
    r"""
    Matmul FLOPs of one [`RealmForMaskedLM`] training step (forward and backward) on one process, for the MFU.

    A matmul costs ``2 m n k`` forward and twice that backward (the gradients of both operands), so a part that gets
    gradients costs 3x its forward. With ``F(n, L)`` = [`bert_forward_flops`] (h hidden, p `retriever_proj_size`,
    V vocabulary, k `num_candidates`), B queries padded to Lq, the k - 1 retrieved blocks of each re-embedded with
    gradients (`_embed_blocks`, padded to Lb), the B k joint inputs ``[CLS] x [SEP] z [SEP]`` (`_joint_inputs`, padded
    to Lj) and M masked positions:

        3 [F(B, Lq) + 2 B (h^2 + h p)]              query embedder, its pooler and projection on [CLS]
      + 3 [F(B(k-1), Lb) + 2 B(k-1) (h^2 + h p)]    doc embedder over the candidates
      + 3 [2 B (k-1) p]                             retrieval logits
      + 3 F(Bk, Lj) + 2 Bk h^2                      reader (its pooler runs forward only: nothing reads it)
      + 3 [2 M k (h^2 + h V)]                       MLM head, at the masked positions only

    Left out: the MIPS search (no gradient; not model FLOPs), embedding lookups, norms, activations, softmaxes.

    Example:

    ```python
    >>> from hf_realm import RealmConfig
    >>> from hf_realm.callbacks import realm_step_flops
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16, num_candidates=3)
    >>> realm_step_flops(config, batch_size=2, query_length=8, block_length=6, joint_length=14, num_masked=2)
    10949376
    ```
    """
    h, p, v, k = config.hidden_size, config.retriever_proj_size, config.vocab_size, config.num_candidates
    docs, joint = batch_size * (k - 1), batch_size * k

    def embed(n, length):
        return bert_forward_flops(config, n, length) + 2 * n * (h * h + h * p)

    with_grad = embed(batch_size, query_length) + embed(docs, block_length) + 2 * docs * p
    with_grad += bert_forward_flops(config, joint, joint_length) + 2 * num_masked * k * (h * h + h * v)
    return 3 * with_grad + 2 * joint * h * h


class _RealmFlopsCounter:
    """Adds up [`realm_step_flops`] over the training forwards of a `RealmForMaskedLM` (training mode, gradients on,
    main thread: not evaluations, not refreshes), from the padded shapes its towers receive (forward pre-hooks)."""

    def __init__(self, model):
        self.flops = self.forwards = 0
        calls: list | None = None
        config = model.config

        def active():
            return model.training and torch.is_grad_enabled() and threading.current_thread() is threading.main_thread()

        # closures, not bound methods: copy.deepcopy (refresh snapshots) copies a bound method's object, not a function
        def start(module, args, kwargs):
            nonlocal calls
            calls = [] if active() else None

        def record(kind):
            def hook(module, args, kwargs):
                if calls is not None and active():
                    calls.append((kind, tuple((args[0] if args else kwargs["input_ids"]).shape)))

            return hook

        def finish(module, args, kwargs, output):
            nonlocal calls
            shapes = {kind: [shape for k, shape in calls or () if k == kind] for kind in ("embed", "joint", "mlm")}
            if len(shapes["embed"]) == 2 and shapes["joint"] and shapes["mlm"]:  # the query, then the candidates
                (b, lq), (_, lb), (_, lj) = shapes["embed"][0], shapes["embed"][1], shapes["joint"][0]
                self.flops += realm_step_flops(config, b, lq, lb, lj, shapes["mlm"][0][0])
                self.forwards += 1
            calls = None

        embedders = {id(m): m for m in (model.embedder, model.query_embedder)}.values()
        self._handles = [model.register_forward_pre_hook(start, with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(record("embed"), with_kwargs=True) for m in embedders]
        self._handles.append(model.encoder.realm.register_forward_pre_hook(record("joint"), with_kwargs=True))
        self._handles.append(model.encoder.cls.register_forward_pre_hook(record("mlm"), with_kwargs=True))
        self._handles.append(model.register_forward_hook(finish, with_kwargs=True))

    def remove(self):
        for handle in self._handles:
            handle.remove()


class FreezeRetrieverCallback(TrainerCallback):
    r"""
    Trains the retriever for the first `after_steps` optimizer steps only; the reader trains on to the end.

    In open-QA fine-tuning the retriever learns from weak supervision (any block that contains the answer string),
    and what it gains comes early: on SQuAD-open the dev recall@5 of the gold paragraph mostly peaks 1-2.5 epochs in,
    then drifts down while the reader's exact match still rises. This callback sets the learning rate of the optimizer
    groups marked `"retriever": True` (those of [`optimizer_grouped_parameters`]) to 0 before every optimizer step
    from step `after_steps` on, so AdamW leaves those weights exactly as they were after that step (weight decay
    included). The retriever's gradients are still computed (and count in `max_grad_norm` clipping): the towers
    stay as they are in the graph, so DDP and accelerate see no change.

    Args:
        after_steps (`int`): Optimizer steps the retriever trains for (0: none).

    Raises:
        `ValueError` at the start of training when the optimizer has no group marked `"retriever": True`.

    Example:

    ```python
    >>> import torch
    >>> from transformers import TrainerState
    >>> from hf_realm import FreezeRetrieverCallback, optimizer_grouped_parameters
    >>> model = torch.nn.ModuleDict({"embedder": torch.nn.Linear(2, 2), "reader": torch.nn.Linear(2, 2)})
    >>> optimizer = torch.optim.AdamW(optimizer_grouped_parameters(model, 1e-3, 1e-4))
    >>> freeze, state = FreezeRetrieverCallback(after_steps=1), TrainerState()
    >>> freeze.on_train_begin(None, state, None, optimizer=optimizer)
    >>> for step in range(3):
    ...     state.global_step = step
    ...     freeze.on_pre_optimizer_step(None, state, None, optimizer=optimizer)
    ...     print(step, sorted({g["lr"] for g in optimizer.param_groups if g["retriever"]}))
    0 [0.0001]
    1 [0.0]
    2 [0.0]
    ```
    """

    def __init__(self, after_steps: int):
        if isinstance(after_steps, bool) or not isinstance(after_steps, int) or after_steps < 0:
            raise ValueError(f"after_steps: expected an int >= 0, got {after_steps!r}")
        self.after_steps = after_steps
        self.frozen_at_step: int | None = None

    @staticmethod
    def _retriever_groups(optimizer) -> list[dict]:
        return [g for g in getattr(optimizer, "param_groups", []) if g.get("retriever")]

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self._retriever_groups(optimizer):
            keys = [sorted(k for k in g if k != "params") for g in getattr(optimizer, "param_groups", [])]
            raise ValueError(
                "FreezeRetrieverCallback: expected an optimizer with parameter groups marked 'retriever': True "
                f"(built from optimizer_grouped_parameters), got groups with keys {keys}"
            )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step < self.after_steps:
            return
        for group in self._retriever_groups(optimizer):
            group["lr"] = 0.0
        if self.frozen_at_step is None:
            self.frozen_at_step = state.global_step
            logger.info(f"retriever frozen after {state.global_step} optimizer steps; the reader trains on")


class StepTimerCallback(TrainerCallback):
    r"""
    Times every optimizer step of a `Trainer` run, for throughput figures that leave out what is not training (an
    index refresh, a retrieval check, a checkpoint save). Put it **first** in `callbacks`: the work other callbacks do
    in `on_step_end` then falls outside the step it times.

    - **step time**: from `on_step_begin` to this callback's `on_step_end` (forward, backward, the gradient
      all-reduce, the optimizer step), from CUDA events on the GPU (no synchronisation added to the step) and from
      `time.perf_counter` elsewhere;
    - **interval**: from one `on_step_begin` to the next: everything a step costs (data loading, logging, callbacks).

    [`~StepTimerCallback.summary`] gives steady-state figures: the first `warmup_steps` steps, the steps with a save,
    the steps in ``exclude_steps`` and every interval overlapping one of ``busy_windows`` (for instance
    [`IndexRefreshCallback.refresh_windows`]) are left out; the intervals lying wholly inside a busy window (training
    while an asynchronous refresh runs) are summarised apart.

    Given a [`RealmForMaskedLM`], it also counts the FLOPs of its training forwards ([`realm_step_flops`], from the
    padded shapes its towers receive) and reports the model FLOPs utilisation of a step: FLOPs per step per process /
    (step seconds x peak), equal to all processes' FLOPs / (step seconds x N x peak).

    Args:
        warmup_steps (`int`, *optional*, defaults to 2): Steps left out at the start (kernel selection, allocator).
        model ([`RealmForMaskedLM`], *optional*): The model whose step FLOPs to count (the unwrapped one).
        peak_tflops (`float`, *optional*): The device's peak for the MFU; defaults to [`device_peak_tflops`] (bf16
            dense) of the training device; no MFU on the CPU.

    Example:

    ```python
    >>> from transformers import TrainerState
    >>> from hf_realm.callbacks import StepTimerCallback
    >>> timer, state = StepTimerCallback(warmup_steps=0), TrainerState()
    >>> for step in range(1, 5):
    ...     timer.on_step_begin(None, state, None)
    ...     state.global_step = step
    ...     timer.on_step_end(None, state, None)
    >>> timer.on_train_end(None, state, None)
    >>> summary = timer.summary()
    >>> summary["steady_steps"], summary["steady_steps_per_second"] > 0  # 3 intervals between 4 step starts
    (3, True)
    ```
    """

    def __init__(self, warmup_steps: int = 2, model=None, peak_tflops: float | None = None):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps, self.peak_tflops, self.device = warmup_steps, peak_tflops, None
        self._flops = _RealmFlopsCounter(model) if model is not None else None
        self.steps: list[int] = []
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.step_seconds: list[float | None] = []
        self.saved_steps: set[int] = set()
        self._events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._begin: tuple[float, torch.cuda.Event | None] | None = None

    @staticmethod
    def _cuda(args) -> bool:
        device = getattr(args, "device", None)
        return device is not None and getattr(device, "type", None) == "cuda" and torch.cuda.is_available()

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = getattr(args, "device", None)

    def on_step_begin(self, args, state, control, **kwargs):
        event = None
        if self._cuda(args):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._begin = (time.perf_counter(), event)

    def on_step_end(self, args, state, control, **kwargs):
        if self._begin is None:
            return
        now = time.perf_counter()
        begin, begin_event = self._begin
        self._begin = None
        self.steps.append(state.global_step)
        self.begins.append(begin)
        self.ends.append(now)
        self.step_seconds.append(now - begin if begin_event is None else None)
        if begin_event is not None:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()
            self._events.append((len(self.steps) - 1, begin_event, end_event))
            self._resolve(wait=False)

    def on_save(self, args, state, control, **kwargs):
        self.saved_steps.add(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._resolve(wait=True)
        if self._flops is not None:
            self._flops.remove()

    def _resolve(self, wait: bool) -> None:
        """Reads the elapsed time of the CUDA events the GPU has passed (all of them with ``wait``)."""
        while self._events:
            i, begin, end = self._events[0]
            if not wait and not end.query():
                return
            end.synchronize()
            self.step_seconds[i] = begin.elapsed_time(end) / 1000
            self._events.pop(0)

    def summary(self, busy_windows=(), exclude_steps=()) -> dict:
        """Steady-state figures (see the class docstring); ``busy_windows`` are `time.perf_counter` spans
        (``(start, end)``, an end of `None` for one still open), ``exclude_steps`` global steps to leave out."""
        self._resolve(wait=True)
        windows = [(start, float("inf") if end is None else end) for start, end in busy_windows]
        skip = self.saved_steps | set(exclude_steps)
        clean, inside = [], []
        for i in range(self.warmup_steps, len(self.steps) - 1):  # the last step has no next start
            start, stop = self.begins[i], self.begins[i + 1]
            if self.steps[i] in skip:
                continue
            if not any(a < stop and start < b for a, b in windows):
                clean.append(i)
            elif any(a <= start and stop <= b for a, b in windows):
                inside.append(i)
        result = {"steps_timed": len(self.steps), "steady_steps": len(clean), "steps_inside_busy_windows": len(inside)}
        for rate, seconds, picked in (
            ("steady_steps_per_second", "step_seconds", clean),
            ("steps_per_second_while_busy", "step_seconds_while_busy", inside),
        ):
            if picked:
                result[rate] = len(picked) / sum(self.begins[i + 1] - self.begins[i] for i in picked)
                result[seconds] = sum(self.step_seconds[i] for i in picked) / len(picked)
        if self._flops is not None and self._flops.forwards:
            result["flops_per_step_per_process"] = self._flops.flops / self._flops.forwards
            peak = self.peak_tflops or device_peak_tflops(self.device)
            if peak and result.get("step_seconds"):
                result["peak_tflops"] = peak
                result["mfu"] = result["flops_per_step_per_process"] / (result["step_seconds"] * peak * 1e12)
        return result


__all__ = ["IndexRefreshCallback", "StepTimerCallback", "realm_step_flops"]
