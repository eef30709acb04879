"""kNN-MT / kNN-LM in `generate()`: the logits processor that mixes a kNN distribution into the model's.

At decoding step t the current hidden state (the input of the output layer, captured by [`KNNQueryHook`]) queries
the k nearest keys of a [`KNNDatastore`] (squared L2; how a datastore is built and saved: `hf_realm.knn_datastore`),
and [`KNNLogitsProcessor`] returns, in log space,

    p(y) = λ p_kNN(y) + (1 - λ) p_LM(y)        with   p_kNN(y) ∝ sum_{neighbours i with value y} count_i * exp(-d_i / T)

(Khandelwal et al. 2020, kNN-LM, arXiv:1911.00172; 2021, kNN-MT, arXiv:2010.00710). A `LogitsProcessor` only sees
`(input_ids, scores)`: every `batch x beam` row of `scores` queries with its own last state. [`knn_lm_perplexity`]
evaluates the same mixture teacher-forced.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .knn_build import KNNDatastoreWriter, _batch_tensors, _decoder_inputs, merge_datastores
from .knn_datastore import KNNDatastore
from .knn_hook import KNNQueryHook
from .search.pq import pq_decode


# ----------------------------------------------------------------------------------------------------------------------
# The maths, shared by the processor and the kNN-LM evaluation.
# ----------------------------------------------------------------------------------------------------------------------


def knn_log_probs(
    sqdist: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    vocab_size: int,
    temperature: float,
    log_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_kNN over the vocabulary, `(b, vocab_size)` float32: softmax(-d / T + log count) scattered by value."""
    logits = -sqdist.float() / temperature
    if log_counts is not None:
        logits = logits + log_counts[ids]
    weights = torch.softmax(logits, dim=-1)
    tokens = values[ids].long()
    probs = torch.zeros(sqdist.shape[0], vocab_size, dtype=torch.float32, device=sqdist.device)
    probs.scatter_add_(1, tokens, weights)
    return probs.log()


def mix_log_probs(lm_scores: torch.Tensor, knn_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(λ p_kNN + (1 - λ) softmax(lm_scores)); tokens with `lm_scores == -inf` (banned upstream) stay banned."""
    lm_logp = torch.log_softmax(lm_scores.float(), dim=-1)
    log_l = math.log(lmbda) if lmbda > 0 else float("-inf")
    log_1ml = math.log1p(-lmbda) if lmbda < 1 else float("-inf")
    mixed = torch.logaddexp(knn_logp + log_l, lm_logp + log_1ml)
    return mixed.masked_fill(torch.isneginf(lm_scores), float("-inf"))


# ----------------------------------------------------------------------------------------------------------------------
# The logits processor.
# ----------------------------------------------------------------------------------------------------------------------


class KNNLogitsProcessor(LogitsProcessor):
    r"""Mixes a kNN distribution from a [`KNNDatastore`] into `generate()`: p = λ p_kNN + (1 - λ) p_LM.

    The query of every `batch x beam` row is the state that fed the output embedding in the forward pass of this
    step, captured by a hook: call [`~KNNLogitsProcessor.attach`] (also a context manager) before `generate()`.
    The processor returns normalised log-probabilities. It runs after generate's own processors (bad words, forced
    EOS, repetition penalty...) and the model's own adjustments (e.g. Marian's `final_logits_bias`), and before the
    sampling warpers (temperature, top-k/p). Tokens banned upstream (score `-inf`) stay banned; their kNN mass is
    dropped. Generation never runs silently without kNN: a missing, repeated or mismatched capture raises.

    Args:
        datastore (`KNNDatastore`):
            The datastore, built with this model.
        k (`int`, *optional*, defaults to 8):
            Neighbours per query, `1 <= k <= len(datastore)`.
        temperature (`float`, *optional*, defaults to 10.0):
            T in softmax(-d / T) over squared L2 distances d, `> 0`.
        lmbda (`float`, *optional*, defaults to 0.5):
            Weight λ of the kNN distribution, in `[0, 1]` (0 = the model alone, 1 = the datastore alone).
        skip_threshold (`float`, *optional*):
            Adaptive retrieval: rows whose model max-probability (``skip_metric="max_prob"``) is `>= skip_threshold`,
            or whose entropy in nats (``"entropy"``) is `<= skip_threshold`, skip the search and keep p_LM. Counted
            in `num_searches` / `num_skipped`. Needs one host sync per step.
        skip_metric (`str`, *optional*, defaults to `"max_prob"`):
            `"max_prob"` or `"entropy"`.
        check_finite_every (`int`, *optional*, defaults to 16):
            On GPUs, NaN/inf queries, and neighbours an approximate index did not find (id -1), are flagged on the
            device and checked (one host sync) every this many steps and on detach, so that the search overlaps the
            rest of the step; on the CPU every step. Either raises.
        cuda_graph (`bool`, *optional*, defaults to `False`):
            On CUDA (without `skip_threshold`), capture the step's search and mixing in a CUDA graph at the second
            step of each shape and replay it after: the host launches one graph instead of a few dozen kernels, and
            decoding is host-bound. Needs a search without host syncs: the exact index with `rescore=False`, or IVF
            with `scan="union", read_in_place=True`; where the capture fails (e.g. the exact index's default bound
            check syncs) the step runs as without it, with a warning. Graphs are dropped on attach/detach and when the
            index or tables change.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList
    >>> from hf_realm.knn_generation import KNNDatastore, KNNLogitsProcessor
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    >>> store = KNNDatastore(keys=np.random.randn(50, 32).astype(np.float16), values=np.full(50, 7))
    >>> processor = KNNLogitsProcessor(store, k=4, temperature=10.0, lmbda=1.0)
    >>> with processor.attach(model, check_weights=False):
    ...     out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False,
    ...                          logits_processor=LogitsProcessorList([processor]), pad_token_id=0)
    >>> out[0, 2:].tolist()  # with λ = 1 every step takes the datastore's only value
    [7, 7, 7]
    ```
    """

    def __init__(
        self,
        datastore: KNNDatastore,
        k: int = 8,
        temperature: float = 10.0,
        lmbda: float = 0.5,
        skip_threshold: float | None = None,
        skip_metric: str = "max_prob",
        check_finite_every: int = 16,
        cuda_graph: bool = False,
    ):
        if not isinstance(datastore, KNNDatastore):
            raise TypeError(f"datastore must be a KNNDatastore, got {type(datastore).__name__}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(datastore):
            raise ValueError(f"`k` has to be an integer in [1, {len(datastore)}] (the datastore size), but is {k}")
        if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`temperature` has to be a strictly positive finite float, but is {temperature}")
        if not isinstance(lmbda, numbers.Real) or not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"`lmbda` has to be a float in [0, 1], but is {lmbda}")
        if skip_metric not in ("max_prob", "entropy"):
            raise ValueError(f"`skip_metric` has to be 'max_prob' or 'entropy', but is {skip_metric!r}")
        if skip_threshold is not None:
            ok = 0.0 < skip_threshold <= 1.0 if skip_metric == "max_prob" else skip_threshold >= 0.0
            allowed = "(0, 1]" if skip_metric == "max_prob" else "[0, inf)"
            if not ok:
                raise ValueError(f"`skip_threshold` for {skip_metric} has to be in {allowed}, but is {skip_threshold}")
        if not isinstance(check_finite_every, int) or check_finite_every < 1:
            raise ValueError(f"`check_finite_every` has to be a positive integer, but is {check_finite_every}")
        self.datastore = datastore
        self.k = int(k)
        self.temperature = float(temperature)
        self.lmbda = float(lmbda)
        self.skip_threshold = skip_threshold
        self.skip_metric = skip_metric
        self.check_finite_every = check_finite_every
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict[tuple, _StepGraph] = {}
        self._graph_seen: set[tuple] = set()
        self._graph_failed: set[tuple] = set()
        self.hook: KNNQueryHook | None = None
        self.num_searches = 0
        self.num_skipped = 0
        self._consumed = 0
        self._last_len: int | None = None
        self._steps = 0
        self._nonfinite: torch.Tensor | None = None
        self._missing: torch.Tensor | None = None
        self._missing_device: torch.device | None = None
        self._steps_at_attach = 0

    # -- attach / detach -----------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, tokenizer=None, check_weights: bool = True) -> KNNLogitsProcessor:
        """Hooks ``model``'s output embedding (after checking the datastore fits the model) and returns ``self``.

        Use as `with processor.attach(model): model.generate(..., logits_processor=[processor])`.
        """
        self.datastore.check_model(model, tokenizer=tokenizer, check_weights=check_weights)
        hook = KNNQueryHook(model, capture="last")
        self.detach()
        self.hook = hook.attach()
        device = hook.module.weight.device if hasattr(hook.module, "weight") else next(model.parameters()).device
        self.datastore.to(device)
        self.reset()
        self._drop_graphs()
        self._steps_at_attach = self._steps
        return self

    def detach(self) -> None:
        """Removes the hook (and runs the pending NaN check; warns if the model ran but the processor never did)."""
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook.detach()
            self._drop_graphs()
            self._check_finite()
            self._warn_if_unused(hook)

    def reset(self) -> None:
        """Forgets the previous step (e.g. after a forward pass outside generate) and zeroes the counters."""
        self._consumed = self.hook.num_calls if self.hook is not None else 0
        self._last_len = None
        self.num_searches = 0
        self.num_skipped = 0

    def __enter__(self) -> KNNLogitsProcessor:
        if self.hook is None:
            raise RuntimeError("use `with processor.attach(model):` (the processor needs a model to hook)")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook.detach()
        self._drop_graphs()
        if exc_type is None:
            self._check_finite()
            if hook is not None:
                self._warn_if_unused(hook)

    def _warn_if_unused(self, hook: KNNQueryHook) -> None:
        # The usual slip: `with processor.attach(model): model.generate(...)` without `logits_processor=`. The hook
        # fires on every forward pass, the processor never runs, and the output is the plain model's.
        if hook.num_calls > 0 and self._steps == self._steps_at_attach:
            warnings.warn(
                f"the attached model ran {hook.num_calls} forward passes but the KNNLogitsProcessor was called 0 times: "
                "the outputs were generated without kNN. Pass it to generate: "
                "`model.generate(..., logits_processor=[processor])`",
                UserWarning,
                stacklevel=3,
            )

    def _check_finite(self) -> None:
        """Reads the flags raised on the device since the last check (NaN/inf queries, neighbours an approximate index
        did not find), in one host sync."""
        nonfinite, self._nonfinite = self._nonfinite, None
        missing, self._missing = self._missing, None
        pending = [f for f in (nonfinite, missing) if f is not None]
        if not pending:
            return
        values = torch.stack([f.to(pending[0].device) for f in pending]).tolist()
        if nonfinite is not None and values[0]:
            raise ValueError("the model produced NaN/inf hidden states as kNN queries; the kNN output is invalid")
        if missing is not None and values[-1]:
            raise self.datastore._missing_error(self._missing_device, self.k)

    def _flag_missing(self, ids: torch.Tensor) -> None:
        """Approximate indexes may find fewer than k entries (id -1): flagged on the device, raised at the next check."""
        if self.datastore._may_miss(ids.device):
            flag = (ids < 0).any()
            self._missing = flag if self._missing is None else self._missing | flag
            self._missing_device = ids.device

    # -- the step ------------------------------------------------------------------------------------------------------

    def _query(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        hook = self.hook
        if hook is None:
            raise RuntimeError(
                "KNNLogitsProcessor is not attached to a model: use `with processor.attach(model): model.generate(...)`"
            )
        fired = hook.num_calls - self._consumed
        cur_len = input_ids.shape[-1]
        continuing = self._last_len is not None and cur_len == self._last_len + 1
        if fired == 0:
            raise RuntimeError(
                "the output-embedding hook did not fire since the last step: the scores do not come from a forward "
                "pass of the attached model, so kNN cannot be applied"
            )
        if continuing and fired != 1:
            raise RuntimeError(
                f"the output embedding ran {fired} times in one decoding step (expected 1); a processor that runs "
                "the model (e.g. classifier-free guidance) or assisted decoding cannot be combined with kNN"
            )
        self._consumed = hook.num_calls
        self._last_len = cur_len
        state = hook.state
        if state.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"captured {state.shape[0]} query states for {scores.shape[0]} rows of scores; the hooked model is not "
                "the one producing these scores"
            )
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = self._query(input_ids, scores)
        values, log_counts = self.datastore.lookup_tables(scores.device)
        vocab = scores.shape[-1]
        max_value = int(self.datastore.metadata.get("max_value", -1))
        if max_value >= vocab:
            raise ValueError(f"datastore holds token id {max_value} but the scores have {vocab} columns")
        queries = state.to(scores.device)
        self._steps += 1
        if self.skip_threshold is None and self.cuda_graph and scores.is_cuda:
            out = self._graph_step(queries, scores, values, log_counts)
            if out is not None:
                self.num_searches += scores.shape[0]
                if self._steps % self.check_finite_every == 0:
                    self._check_finite()
                return out
        flag = ~torch.isfinite(queries).all()
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag
        if scores.device.type == "cpu" or self._steps % self.check_finite_every == 0:
            self._check_finite()

        if self.skip_threshold is None:
            on_cpu = scores.device.type == "cpu"  # checked at once; on GPUs flagged, checked with the NaN flag
            sqdist, ids = self.datastore.search(queries, self.k, check_finite=False, check_found=on_cpu)
            if not on_cpu:
                self._flag_missing(ids)
            self.num_searches += scores.shape[0]
            knn_logp = knn_log_probs(sqdist, ids, values, vocab, self.temperature, log_counts)
            return mix_log_probs(scores, knn_logp, self.lmbda).to(scores.dtype)

        lm_logp = torch.log_softmax(scores.float(), dim=-1)
        if self.skip_metric == "max_prob":
            need = lm_logp.max(dim=-1).values.exp() < self.skip_threshold
        else:
            entropy = -(lm_logp.exp() * lm_logp.nan_to_num(neginf=0.0)).sum(-1)
            need = entropy > self.skip_threshold
        rows = need.nonzero(as_tuple=True)[0]
        self.num_searches += int(rows.numel())
        self.num_skipped += scores.shape[0] - int(rows.numel())
        out = lm_logp.masked_fill(torch.isneginf(scores), float("-inf"))
        if rows.numel() == 0:
            return out.to(scores.dtype)
        sqdist, ids = self.datastore.search(queries[rows], self.k, check_finite=False)
        knn_logp = knn_log_probs(sqdist, ids, values, vocab, self.temperature, log_counts)
        out = out.index_copy(0, rows, mix_log_probs(scores[rows], knn_logp, self.lmbda))
        return out.to(scores.dtype)

    # -- CUDA graphs ---------------------------------------------------------------------------------------------------

    def _mixed(self, queries, scores, values, log_counts):
        """The search and mixing of one step without host syncs (what a graph captures): the mixed scores and the
        device flags (NaN/inf queries; neighbours not found, `None` for exact indexes)."""
        nonfinite = ~torch.isfinite(queries).all()
        sqdist, ids = self.datastore.search(queries, self.k, check_finite=False, check_found=False)
        missing = (ids < 0).any() if self.datastore._may_miss(ids.device) else None
        knn_logp = knn_log_probs(sqdist, ids, values, scores.shape[-1], self.temperature, log_counts)
        return mix_log_probs(scores, knn_logp, self.lmbda).to(scores.dtype), nonfinite, missing

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._graph_seen.clear()

    def _graph_step(self, queries, scores, values, log_counts) -> torch.Tensor | None:
        """The step replayed from a CUDA graph; `None` where it runs eagerly (the first step of a shape compiles and
        tunes the kernels; a failed capture is not retried)."""
        key = (tuple(queries.shape), queries.dtype, tuple(scores.shape), scores.dtype, scores.device)
        backend = self.datastore._search_backend(scores.device)
        tables = self.datastore._tables
        entry = self._graphs.get(key)
        if entry is not None and (entry.backend is not backend or entry.tables is not tables):
            del self._graphs[key]  # the index or the tables changed: the graph reads freed memory
            entry = None
        if entry is None:
            if key in self._graph_failed:
                return None
            if key not in self._graph_seen:
                self._graph_seen.add(key)
                return None
            try:
                entry = _StepGraph.capture(self, queries, scores, values, log_counts, backend, tables)
            except Exception as err:
                self._graph_failed.add(key)
                warnings.warn(
                    f"KNNLogitsProcessor(cuda_graph=True): the kNN step cannot be captured in a CUDA graph "
                    f"({type(err).__name__}: {str(err)[:200]}); it runs without one. The search must not synchronise "
                    "with the host: use the exact index with rescore=False or IVF with scan='union', read_in_place=True",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
            self._graphs[key] = entry
        entry.queries.copy_(queries)
        entry.scores.copy_(scores)
        entry.graph.replay()
        self._nonfinite = entry.nonfinite.clone() if self._nonfinite is None else self._nonfinite | entry.nonfinite
        if entry.missing is not None:
            self._missing = entry.missing.clone() if self._missing is None else self._missing | entry.missing
            self._missing_device = scores.device
        return entry.out.clone()  # the graph's output is overwritten by the next replay


class _StepGraph:
    """A captured kNN step: static inputs, the graph, its outputs, and what it read (to know when it goes stale)."""

    @classmethod
    def capture(cls, processor, queries, scores, values, log_counts, backend, tables) -> _StepGraph:
        self = cls()
        self.backend, self.tables = backend, tables
        self.queries, self.scores = queries.clone(), scores.clone()
        side = torch.cuda.Stream(device=scores.device)
        side.wait_stream(torch.cuda.current_stream(scores.device))
        # Warm-up off the capture (as torch's docs advise), with host syncs turned into errors: a search that syncs
        # must fail here, not during the capture, which would leave CUDA's random generator unusable.
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                processor._mixed(self.queries, self.scores, values, log_counts)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream(scores.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.nonfinite, self.missing = processor._mixed(self.queries, self.scores, values, log_counts)
        return self


# ----------------------------------------------------------------------------------------------------------------------
# kNN-LM evaluation.
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_lm_perplexity(
    model: nn.Module,
    datastore: KNNDatastore,
    dataset,
    k: int = 8,
    temperature: float = 10.0,
    lmbdas: float | Iterable[float] = 0.25,
    tokenizer=None,
    source_column: str | None = None,
    target_column: str | None = None,
    text_column: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher-forced perplexity of ``dataset`` with and without the datastore (same maths as the processor).

    Reads the dataset like [`KNNDatastore.build`]. Returns `{"num_tokens", "base_perplexity", "knn_perplexity"}`
    (``knn_perplexity`` is a dict λ -> perplexity when several ``lmbdas`` are given).

    Example:

    ```python
    >>> import datasets, tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_generation import knn_lm_perplexity
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    >>> data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6]]})
    >>> store = KNNDatastore.build(model, data, tempfile.mkdtemp() + "/ds", progress=False)
    >>> out = knn_lm_perplexity(model, store, data, k=1, lmbdas=0.5, progress=False)
    >>> out["knn_perplexity"] < out["base_perplexity"]  # the text is in the datastore
    True
    ```
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    single = isinstance(lmbdas, int | float)
    lmbda_list = [float(lmbdas)] if single else [float(x) for x in lmbdas]
    for lm in lmbda_list:
        if not 0.0 <= lm <= 1.0:
            raise ValueError(f"`lmbda` has to be a float in [0, 1], but is {lm}")
    if not 1 <= k <= len(datastore):
        raise ValueError(f"k must be in [1, {len(datastore)}] (the datastore size), got {k}")
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    pretokenized = "input_ids" in dataset.column_names
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    was_training = model.training
    model.eval()
    base_nll = 0.0
    knn_nll = [0.0] * len(lmbda_list)
    count = 0
    try:
        with KNNQueryHook(model, capture="all") as hook:
            for lo in tqdm(range(0, len(dataset), batch_size), desc="kNN-LM eval", disable=not progress):
                batch = dataset[lo : lo + batch_size]
                inputs, targets = _batch_tensors(
                    batch, tokenizer, is_enc_dec, pretokenized, source_column, target_column, text_column,
                    max_length, pad_id,
                )  # fmt: skip
                inputs = {key: v.to(device) for key, v in inputs.items()}
                targets = targets.to(device)
                if is_enc_dec:
                    logits = model(**inputs, decoder_input_ids=_decoder_inputs(model, targets), use_cache=False).logits
                else:
                    logits = model(**inputs, use_cache=False).logits
                mask = targets != -100
                rows, cols = mask.nonzero(as_tuple=True)
                gold = targets[rows, cols]
                lm_scores = logits[rows, cols].float()
                queries = hook.state[rows, cols]
                lm_logp = torch.log_softmax(lm_scores, -1).gather(1, gold[:, None]).squeeze(1)
                base_nll -= float(lm_logp.double().sum())
                values, log_counts = datastore.lookup_tables(device)
                for s in range(0, gold.shape[0], 1024):
                    sqdist, ids = datastore.search(queries[s : s + 1024], k)
                    knn_logp = knn_log_probs(sqdist, ids, values, lm_scores.shape[-1], temperature, log_counts)
                    for j, lm in enumerate(lmbda_list):
                        mixed = mix_log_probs(lm_scores[s : s + 1024], knn_logp, lm)
                        knn_nll[j] -= float(mixed.gather(1, gold[s : s + 1024, None]).double().sum())
                count += int(gold.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dataset has no target tokens to score")
    knn_ppl = {lm: math.exp(nll / count) for lm, nll in zip(lmbda_list, knn_nll, strict=True)}
    return {
        "num_tokens": count,
        "base_perplexity": math.exp(base_nll / count),
        "knn_perplexity": knn_ppl[lmbda_list[0]] if single else knn_ppl,
    }


__all__ = [
    "KNNDatastore",
    "KNNDatastoreWriter",
    "KNNLogitsProcessor",
    "KNNQueryHook",
    "knn_lm_perplexity",
    "knn_log_probs",
    "merge_datastores",
    "mix_log_probs",
    "model_fingerprint",
    "pq_decode",
    "tokenizer_fingerprint",
]
