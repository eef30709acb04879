"""Weights and tokenizer fingerprints: which model built an index or a datastore."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------------------------------------------------
# Embedder fingerprint
# ----------------------------------------------------------------------------------------------------------------------


def embedder_fingerprint(embedder_or_state_dict) -> str:
    """A hash of an embedder's weights, recorded with an index to detect a different embedder at load time.

    It is the sha256 of the sorted list of per-tensor digests, where a tensor's digest is the sha256 of its shape and
    its values as contiguous little-endian float32 (bf16/fp16 weights widen exactly), identical digests counted once.
    Only floating-point tensors count (integer buffers such as `position_ids` vary across versions), and names, order
    and weight tying do not: the same weights loaded under 4.x names (`embedder.realm.*`) or transformers 5 names give
    the same hash. Casting the weights to a narrower
    dtype changes them, and the hash.

    Args:
        embedder_or_state_dict (`torch.nn.Module` or `dict[str, torch.Tensor]`)

    Returns:
        `str`: `"sha256:<hex>"`.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm.fingerprint import embedder_fingerprint
    >>> layer = torch.nn.Linear(2, 2)
    >>> embedder_fingerprint(layer) == embedder_fingerprint({"renamed." + k: v for k, v in layer.state_dict().items()})
    True
    ```
    """
    state = (
        embedder_or_state_dict.state_dict()
        if hasattr(embedder_or_state_dict, "state_dict")
        else embedder_or_state_dict
    )
    digests = set()  # a set: tied weights, stored once or twice, count once
    for tensor in state.values():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h = hashlib.sha256(repr(tuple(t.shape)).encode())
        h.update(t.numpy().astype("<f4", copy=False).data)
        digests.add(h.hexdigest())
    total = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    return f"sha256:{total}"


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints: a datastore only makes sense with the model (and tokenizer) that built it.
# ----------------------------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 16) -> dict[str, Any]:
    """A cheap, dtype-tolerant fingerprint of a model's weights.

    Takes ``samples_per_tensor`` evenly spaced values of every floating parameter and buffer (in name order, tied
    weights once). ``sha256`` hashes their names, shapes and float32 values (exact identity); ``values`` keeps the
    samples so that the same weights cast to another dtype (fp32 -> bf16) can still be recognised with a tolerance.
    """
    names, values = [], []
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if not torch.is_floating_point(tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            continue
        positions = torch.linspace(0, n - 1, steps=min(n, samples_per_tensor), device=flat.device).round().long()
        names.append(f"{name}:{tuple(tensor.shape)}")
        values.append(flat[positions].float().cpu())
    sample = torch.cat(values).numpy().astype(np.float32) if values else np.zeros(0, np.float32)
    digest = hashlib.sha256()
    digest.update("\n".join(names).encode())
    digest.update(sample.tobytes())
    num_parameters = sum(p.numel() for p in model.parameters())
    return {"sha256": digest.hexdigest(), "values": sample.tolist(), "num_parameters": int(num_parameters)}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def _fingerprints_match(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    if stored.get("sha256") == current["sha256"]:
        return True
    a = np.asarray(stored.get("values", []), dtype=np.float64)
    b = np.asarray(current["values"], dtype=np.float64)
    if a.shape != b.shape or stored.get("num_parameters") != current["num_parameters"]:
        return False
    # Same weights in another dtype: bf16 keeps 8 bits of mantissa (relative error <= 2^-8).
    return bool(np.all(np.abs(a - b) <= 1e-2 * np.abs(a) + 1e-4))
