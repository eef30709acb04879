"""The contract of a search backend, and the registry that turns a backend name or config into one.

A backend holds a set of keys (rows ``0 .. num_keys - 1``) and answers ``search(queries, k) -> (scores, ids)``. It
knows nothing of what the keys stand for (REALM blocks, kNN-MT decoder states): its owner keeps that.

Two metrics:

- ``"inner_product"``: ``scores`` are inner products, best (largest) first (maximum inner product search).
- ``"l2"``: ``scores`` are squared L2 distances, best (smallest) first. Exact backends compute it as a maximum inner
  product search with ``key_bias = -||k||^2 / 2`` (``||q - k||^2 = ||q||^2 - 2 (q . k - ||k||^2 / 2)``).

An approximate backend that finds fewer than ``k`` keys pads with id ``-1`` (score ``-inf`` for inner products,
``+inf`` for distances); exact backends never do.

A backend is built from a config: a small dataclass registered under a name with [`register_backend`]. A new backend
is one config class (with a ``build`` method) and one backend class, in one module, registered by the decorator;
nothing else in the package needs to change.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch


METRICS = ("inner_product", "l2")


@runtime_checkable
class SearchBackend(Protocol):
    """What every search backend provides.

    Attributes:
        metric (`str`): `"inner_product"` (scores, descending) or `"l2"` (squared distances, ascending).
    """

    metric: str

    @property
    def num_keys(self) -> int:
        """Number of keys held (ids are ``0 .. num_keys - 1``, in insertion order)."""
        ...

    @property
    def dim(self) -> int:
        """Key dimension."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the search structure holds (device memory for torch backends, index memory for faiss)."""
        ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best keys of every query: `(scores or squared distances, ids)`, float32 and int64,
        `(num_queries, k)`, best first. ``1 <= k <= num_keys``."""
        ...

    def add(self, keys) -> None:
        """Appends keys (ids continue from ``num_keys``)."""
        ...

    def replace(self, keys) -> None:
        """Replaces all keys (a trained structure, e.g. faiss IVF centroids, is kept and the keys re-added)."""
        ...

    def save(self, path: str) -> bool:
        """Writes the backend's own state (e.g. a trained faiss index) to the file ``path``; returns `False` and writes
        nothing when the backend has no state beyond its keys (the owner saves those)."""
        ...


class BackendConfig:
    """Base class of backend configs (each a dataclass registered with [`register_backend`]).

    ``build(keys, metric=..., state=None)`` returns a [`SearchBackend`]; ``state`` is what a previous backend saved
    (e.g. a trained faiss index: an object or a file path), for backends that have any.
    """

    name: ClassVar[str] = ""

    def build(self, keys, *, metric: str = "inner_product", state: Any = None) -> SearchBackend:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (dtypes and devices as strings), with ``name``."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, (torch.dtype, torch.device)) else value
        return out


BACKENDS: dict[str, type[BackendConfig]] = {}
"""Registered backend configs by name."""


def register_backend(cls: type[BackendConfig]) -> type[BackendConfig]:
    """Class decorator: registers a backend config dataclass under its ``name``.

    Example:

    ```python
    >>> import dataclasses
    >>> from hf_realm.search import BACKENDS, BackendConfig, TorchSearchConfig, register_backend
    >>> @register_backend
    ... @dataclasses.dataclass
    ... class CpuExactConfig(BackendConfig):
    ...     name = "cpu-exact"
    ...     def build(self, keys, *, metric="inner_product", state=None):
    ...         return TorchSearchConfig(device="cpu").build(keys, metric=metric)
    >>> BACKENDS["cpu-exact"] is CpuExactConfig
    True
    >>> _ = BACKENDS.pop("cpu-exact")
    ```
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in BACKENDS and BACKENDS[cls.name] is not cls:
        raise ValueError(f"a search backend named {cls.name!r} is already registered ({BACKENDS[cls.name].__name__})")
    BACKENDS[cls.name] = cls
    return cls


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_search_args(queries: torch.Tensor, k: int, num_keys: int, dim: int) -> None:
    if queries.dim() != 2:
        raise ValueError(f"queries must be (num_queries, dim), got shape {tuple(queries.shape)}")
    if queries.shape[1] != dim:
        raise ValueError(f"query dim {queries.shape[1]} != key dim {dim}")
    if not 1 <= k <= num_keys:
        raise ValueError(f"k must be in [1, {num_keys}] (the number of keys), got {k}")


def as_tensor(keys) -> torch.Tensor:
    """A torch view of ``keys`` (tensor, numpy array or read-only memory map) without copying."""
    if torch.is_tensor(keys):
        return keys
    with warnings.catch_warnings():
        # torch warns on read-only arrays (memory-mapped files) because writing through the tensor would fail;
        # backends never write their keys.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(keys))
