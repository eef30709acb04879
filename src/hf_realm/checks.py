"""Early checks where a tokenizer meets a model: a clear error instead of an `IndexError` deep in an embedding."""

from __future__ import annotations

import torch


def check_tokenizer_fits(tokenizer, model_or_config, what: str = "the tokenizer") -> None:
    """Raises if ``tokenizer`` can produce token ids the model has no embedding for (`len(tokenizer) > vocab_size`).

    Such ids fail in the embedding lookup (`IndexError: index out of range in self` on the CPU, a device-side assert
    that poisons the CUDA context on a GPU), usually long after the mismatch was made: a tokenizer with added tokens
    and no `resize_token_embeddings`, or another checkpoint's tokenizer.

    Args:
        tokenizer: Anything with `len()` (a `PreTrainedTokenizerBase`); `None` is skipped.
        model_or_config: A model (its `config`) or a config with `vocab_size`.
        what (`str`, *optional*): How to name the tokenizer in the error.
    """
    if tokenizer is None:
        return
    config = getattr(model_or_config, "config", model_or_config)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(
            f"{what} has {size} tokens but the model's config.vocab_size is {vocab_size}: ids >= {vocab_size} have no "
            "embedding. Use the model's own tokenizer, or call model.resize_token_embeddings(len(tokenizer)) after "
            "adding tokens"
        )


def check_token_ids_fit(input_ids, model_or_config, what: str = "input_ids") -> None:
    """Raises if a tensor of token ids holds an id outside `[0, config.vocab_size)` (one host sync on a GPU)."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None or input_ids is None or input_ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one sync for both
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{what} hold token id {bad} but the model's config.vocab_size is {vocab_size}: they come from another "
            "tokenizer (or one with added tokens and no model.resize_token_embeddings)"
        )
