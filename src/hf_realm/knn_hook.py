"""The query hook: captures the input of a model's output embedding (the kNN query / datastore key)."""

from __future__ import annotations

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------------------------------
# The query hook.
# ----------------------------------------------------------------------------------------------------------------------


class KNNQueryHook:
    """Captures the input of a model's output embedding (the state that kNN-MT uses as key and query).

    Args:
        model (`PreTrainedModel`):
            Any model with `get_output_embeddings()` (encoder-decoder or decoder-only LM head models).
        capture (`str`, *optional*, defaults to `"last"`):
            `"last"` keeps the state at the last position, `(batch, dim)` (decoding); `"all"` keeps `(batch, seq,
            dim)` (teacher-forced datastore builds and kNN-LM evaluation).

    Example:

    ```python
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from hf_realm.knn_hook import KNNQueryHook
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    >>> with KNNQueryHook(model) as hook:
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> hook.state.shape, hook.num_calls
    (torch.Size([1, 32]), 1)
    ```
    """

    def __init__(self, model: nn.Module, capture: str = "last"):
        if capture not in ("last", "all"):
            raise ValueError(f"capture must be 'last' or 'all', got {capture!r}")
        get_out = getattr(model, "get_output_embeddings", None)
        module = get_out() if callable(get_out) else None
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no hookable output embedding (get_output_embeddings() returned "
                f"{type(module).__name__}); kNN-MT needs a model with an LM head (e.g. *ForConditionalGeneration, "
                "*ForCausalLM, *LMHeadModel)"
            )
        self.module = module
        self.capture = capture
        self.state: torch.Tensor | None = None
        self.num_calls = 0
        self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self) -> KNNQueryHook:
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> KNNQueryHook:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        if hidden.dim() != 3:
            raise RuntimeError(
                f"the output embedding got an input of shape {tuple(hidden.shape)}; expected (batch, seq, hidden)"
            )
        self.state = hidden[:, -1].detach() if self.capture == "last" else hidden.detach()
        self.num_calls += 1
