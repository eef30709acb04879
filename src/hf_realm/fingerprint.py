"""Weights and tokenizer fingerprints: which model built an index or a datastore.

One weights hash serves both: [`embedder_fingerprint`] (recorded with a REALM index) and the `"sha256"` of
[`model_fingerprint`] (recorded with a kNN datastore) are the same digest of every floating-point tensor, streamed
tensor by tensor (and in chunks of large tensors) so that hashing never holds a second copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn


# Elements widened and copied to the host at a time: bounds the extra memory of hashing a large tensor (64 MiB fp32).
_CHUNK = 1 << 24
FINGERPRINT_SCHEME = 2


# ----------------------------------------------------------------------------------------------------------------------
# The weights hash
# ----------------------------------------------------------------------------------------------------------------------


def _tensor_digest(tensor: torch.Tensor, cast: torch.dtype | None = None) -> str:
    """sha256 of a tensor's shape and its values as contiguous little-endian float32, optionally after a cast.

    The cast and the widening run on the tensor's device, one chunk at a time; only float32 chunks reach the host.
    """
    flat = tensor.detach().reshape(-1)
    h = hashlib.sha256(repr(tuple(tensor.shape)).encode())
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if cast is not None:
            chunk = chunk.to(cast)
        h.update(chunk.to(torch.float32).cpu().contiguous().numpy().astype("<f4", copy=False).data)
    return h.hexdigest()


def _floating_tensors(state: dict[str, Any]) -> Iterable[torch.Tensor]:
    # Only floating-point tensors count: integer buffers such as `position_ids` vary across library versions.
    return (t for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def _view_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def _weights_digest(tensors: Iterable[torch.Tensor], cast: torch.dtype | None = None) -> str:
    """sha256 of the sorted set of per-tensor digests: names, order and weight tying (one tensor stored twice) do not
    count."""
    digests = set()
    seen = set()
    for tensor in tensors:
        # A tied weight appears under two names as two views of one storage: hash it once (the set would also
        # merge the two equal digests, but only after hashing both).
        view = _view_key(tensor)
        if tensor.numel() and view in seen:
            continue
        seen.add(view)
        same = cast is None or tensor.dtype == cast  # a bf16 tensor cast to bf16 is itself
        digests.add(_tensor_digest(tensor, None if same else cast))
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def _state_dict(module_or_state_dict) -> dict[str, Any]:
    if hasattr(module_or_state_dict, "state_dict"):
        return module_or_state_dict.state_dict()
    return module_or_state_dict


def embedder_fingerprint(embedder_or_state_dict) -> str:
    """A hash of an embedder's weights, recorded with an index to detect a different embedder at load time.

    It is the sha256 of the sorted list of per-tensor digests, where a tensor's digest is the sha256 of its shape and
    its values as contiguous little-endian float32 (bf16/fp16 weights widen exactly), identical digests counted once.
    Only floating-point tensors count (integer buffers such as `position_ids` vary across versions), and names, order
    and weight tying do not: the same weights loaded under 4.x names (`embedder.realm.*`) or transformers 5 names give
    the same hash. Casting the weights to a narrower dtype changes them, and the hash. Every value is hashed, streamed
    tensor by tensor.

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
    return "sha256:" + _weights_digest(_floating_tensors(_state_dict(embedder_or_state_dict)))


# ----------------------------------------------------------------------------------------------------------------------
# Model fingerprint: a datastore only makes sense with the model (and tokenizer) that built it.
# ----------------------------------------------------------------------------------------------------------------------


def _sampled_fingerprint(model: nn.Module, samples_per_tensor: int) -> tuple[str, np.ndarray]:
    """The scheme-1 fingerprint (datastores written before the full hash): ``samples_per_tensor`` evenly spaced values
    of every floating parameter and buffer, in name order, tied weights once; sha256 of names, shapes and values."""
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
        # float32 positions as the scheme was defined; past 2**24 elements the last one can round to n (out of range:
        # an IndexError, a device-side assert on CUDA), so clamp: every position that was in range stays the same
        positions = torch.linspace(0, n - 1, steps=min(n, samples_per_tensor), device=flat.device).round().long()
        positions = positions.clamp_(max=n - 1)
        names.append(f"{name}:{tuple(tensor.shape)}")
        values.append(flat[positions].float().cpu())
    sample = torch.cat(values).numpy().astype(np.float32) if values else np.zeros(0, np.float32)
    digest = hashlib.sha256()
    digest.update("\n".join(names).encode())
    digest.update(sample.tobytes())
    return digest.hexdigest(), sample


# model -> (key of its tensors' identities and in-place versions, fingerprint): attaching the same unchanged model
# again does not hash its weights again.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_key(model: nn.Module, samples_per_tensor: int) -> tuple:
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    return (samples_per_tensor,) + tuple(
        (name, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for name, t in tensors
    )


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 16) -> dict[str, Any]:
    """A fingerprint of a model's weights that tells other weights apart and recognises the same weights cast to bf16.

    Keys:

    - ``sha256``: the hash of every floating weight ([`embedder_fingerprint`]'s digest, without its prefix): exact
      identity.
    - ``bf16_sha256``: the same hash after casting every floating weight to bfloat16, so that a model built in fp32
      and run in bf16 (or the reverse) is recognised without a tolerance.
    - ``dtypes``: the floating dtypes of the weights.
    - ``sample_sha256`` / ``values``: ``samples_per_tensor`` evenly spaced values of every tensor, kept for fp16 casts
      (where rounding twice makes the bf16 hashes differ) and for stores written with the sampled fingerprint alone.
    - ``num_parameters`` and ``scheme``.

    Results are cached per model until one of its tensors is replaced or changed in place.
    """
    key = _cache_key(model, samples_per_tensor)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    state = model.state_dict()
    hashes = _full_hashes(list(_floating_tensors(state)))
    fingerprint = _assemble(model, state, samples_per_tensor, hashes)
    _CACHE[model] = (key, fingerprint)
    return dict(fingerprint)


def _full_hashes(tensors: list[torch.Tensor]) -> dict[str, str]:
    return {"sha256": _weights_digest(tensors), "bf16_sha256": _weights_digest(tensors, cast=torch.bfloat16)}


def _assemble(model: nn.Module, state: dict, samples_per_tensor: int, hashes: dict[str, str]) -> dict[str, Any]:
    sample_sha, sample = _sampled_fingerprint(model, samples_per_tensor)
    return {
        "scheme": FINGERPRINT_SCHEME,
        "sha256": hashes["sha256"],
        "bf16_sha256": hashes["bf16_sha256"],
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in _floating_tensors(state)}),
        "sample_sha256": sample_sha,
        "values": sample.tolist(),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def start_model_fingerprint(
    model: nn.Module, samples_per_tensor: int = 16, max_host_bytes: int = 1 << 31
) -> Callable[[], dict[str, Any]]:
    """[`model_fingerprint`] started beside other work (a datastore build): returns a function that gives the result.

    The weights are copied to the host at once (tied weights once) and the two hashes of every weight, the costly part
    (0.6 s for a Marian-size model), run on a helper thread over that copy, which makes no CUDA call; the sampled part
    runs on the calling thread. The result equals `model_fingerprint(model)` and is cached like it, as long as the
    weights have not changed by the time it is asked for. A cached result is returned as it is; weights of more than
    ``max_host_bytes`` (default 2 GiB) are fingerprinted at once, as [`model_fingerprint`] does (no host copy of a
    large model)."""
    key = _cache_key(model, samples_per_tensor)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        result = dict(cached[1])
        return lambda: dict(result)
    state = model.state_dict()
    floating = list(_floating_tensors(state))
    copies: dict[tuple, torch.Tensor] = {}
    for tensor in floating:
        copies.setdefault(_view_key(tensor), tensor)
    if sum(t.numel() * t.element_size() for t in copies.values()) > max_host_bytes:
        result = model_fingerprint(model, samples_per_tensor)
        return lambda: dict(result)
    copies = {view: tensor.detach().to("cpu") for view, tensor in copies.items()}  # blocking: complete when used
    host = [copies[_view_key(tensor)] for tensor in floating]  # a tied weight stays one tensor (hashed once)
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-fingerprint")
    future = pool.submit(_full_hashes, host)
    pool.shutdown(wait=False)
    sampled = _assemble(model, state, samples_per_tensor, {"sha256": "", "bf16_sha256": ""})

    def result() -> dict[str, Any]:
        fingerprint = {**sampled, **future.result()}
        if _cache_key(model, samples_per_tensor) == key:
            _CACHE[model] = (key, fingerprint)
        return dict(fingerprint)

    return result


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def _samples_close(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    a = np.asarray(stored.get("values", []), dtype=np.float64)
    b = np.asarray(current["values"], dtype=np.float64)
    if a.shape != b.shape or stored.get("num_parameters") != current["num_parameters"]:
        return False
    # Same weights in another dtype: bf16 keeps 8 bits of mantissa (relative error <= 2^-8).
    return bool(np.all(np.abs(a - b) <= 1e-2 * np.abs(a) + 1e-4))


def _fingerprints_match(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the weights that built a datastore (``stored``) are those of the model at hand (``current``).

    With a full hash (scheme 2): equal hashes; or, when the weights' dtypes differ, equal hashes after casting both to
    bf16; or, when one side holds fp16 weights (fp16 and bf16 roundings of the same fp32 value can disagree), the
    sampled values within bf16 tolerance. Weights of the same dtypes must hash equal. A stored scheme-1 fingerprint
    (16 samples a tensor, no full hash) is compared as before: equal sample hash or samples within tolerance.
    """
    if "bf16_sha256" not in stored:  # scheme 1
        if stored.get("sha256") == current["sample_sha256"]:
            return True
        return _samples_close(stored, current)
    if stored["sha256"] == current["sha256"]:
        return True
    stored_dtypes, current_dtypes = set(stored.get("dtypes", [])), set(current["dtypes"])
    if stored_dtypes == current_dtypes:
        return False  # same dtypes, different values: other weights
    if stored["bf16_sha256"] == current["bf16_sha256"]:
        return True
    if "float16" in stored_dtypes | current_dtypes:
        return _samples_close(stored, current)
    return False
