"""`IndexRefreshCallback`: keep REALM's cached doc embeddings fresh while `Trainer` moves the doc encoder."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future

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
      and `index_refreshes`; saves the index into each checkpoint (`checkpoint-N/index/`) and reloads it from there
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
        self._pending: Future | None = None
        self._pending_step = 0

    # -- the refresh itself: RealmBlockIndex.refresh, with bookkeeping and failure safety ---------------------------

    def refresh(self, embedder, step: int) -> bool:
        """Re-embed the corpus with ``embedder`` now and swap the result in; returns whether it succeeded."""
        try:
            seconds = self.index.refresh(embedder, **self.embed_kwargs)
        except Exception as err:  # the old index keeps serving; training goes on
            self.failures += 1
            logger.error(f"index refresh at step {step} failed, the previous index keeps serving: {err!r}")
            return False
        self._refreshed(step, seconds)
        return True

    def _refreshed(self, step: int, seconds: float) -> None:
        self.built_at_step = step
        self.num_refreshes += 1
        self.last_refresh_seconds = seconds
        logger.info(f"index refreshed at step {step} in {seconds:.2f}s ({self.index.num_blocks} blocks)")

    def _start_async(self, embedder, step: int) -> None:
        self._pending = self.index.refresh(embedder, background=True, **self.embed_kwargs)
        self._pending_step = step

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
        self._refreshed(self._pending_step, future.result())

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


__all__ = ["IndexRefreshCallback"]
