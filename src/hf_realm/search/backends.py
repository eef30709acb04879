"""Backend names -> configs: the one vocabulary behind every string the package accepts.

`RealmBlockIndex(backend=...)` and `KNNDatastore.build_index(index_type=...)` take these names (or a config object);
both resolve them here:

| name | config |
|---|---|
| `"torch"` | [`TorchSearchConfig`] (exact; ``device``, ``dtype``) |
| `"faiss"`, `"faiss-flat"` | [`FaissSearchConfig`] (``index_factory``, default `"Flat"`: exact) |
| `"faiss-gpu"` | [`FaissSearchConfig`] with ``gpu`` = the device index (default 0) |
| `"faiss-ivfpq"` | [`FaissSearchConfig.ivfpq`] sized for the number of keys (``nlist``, ``m``, ``nbits``, ``nprobe``, ``rerank``) |
| `"pq"` | [`PQSearchConfig`] (keys given as [`PQCodes`]) |
| any name registered with [`register_backend`] | that config, built from the options |
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .base import BACKENDS, BackendConfig
from .faiss_backend import FaissSearchConfig
from .faiss_utils import faiss_available
from .pq import PQSearchConfig
from .torch_backend import TorchSearchConfig


logger = logging.getLogger(__name__)


_INDEX_NAMES = ("auto", "faiss", "faiss-gpu", "torch")
ALIASES = ("faiss-flat", "faiss-gpu", "faiss-ivfpq")
"""Names that are not a registered config's own name but map onto one."""


def backend_names() -> tuple[str, ...]:
    """Every name [`backend_config`] accepts."""
    return tuple(sorted({*BACKENDS, *ALIASES}))


def _gpu_id(device) -> int:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index or 0


def backend_config(spec, *, num_keys: int | None = None, dim: int | None = None, device=None, **options):
    """The [`BackendConfig`] for ``spec``: a config (returned as is), a dict from [`BackendConfig.to_dict`], or a name.

    Args:
        spec (`str`, `dict` or `BackendConfig`): See the table in this module's docstring.
        num_keys (`int`, *optional*) and dim (`int`, *optional*): Size of the key set (`"faiss-ivfpq"` sizes its lists
            and sub-quantisers from them).
        device (*optional*): The device of `"torch"` / `"pq"`, the GPU of `"faiss-gpu"`.
        options: Fields of the config (e.g. ``index_factory``, ``search_params``, ``dtype``).

    Example:

    ```python
    >>> from hf_realm.search import backend_config
    >>> backend_config("faiss-ivfpq", num_keys=10_000, dim=64, nprobe=8).index_factory
    'IVF256,PQ8x8'
    >>> backend_config("torch", device="cpu")
    TorchSearchConfig(device='cpu', dtype=None, rescore=True, chunk_size=1048576)
    ```
    """
    if isinstance(spec, BackendConfig):
        if options:
            raise ValueError(f"options {sorted(options)} given with a {type(spec).__name__}: set them in the config")
        return spec
    if isinstance(spec, dict):
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        spec = spec.get("name")
        if isinstance(options.get("dtype"), str):
            options["dtype"] = getattr(torch, options["dtype"].replace("torch.", ""))
    if spec == "faiss-ivfpq":
        if num_keys is None or dim is None:
            raise ValueError("'faiss-ivfpq' needs num_keys and dim to size the index")
        return FaissSearchConfig.ivfpq(num_keys, dim, **options)
    if spec == "faiss-flat":
        if options.get("index_factory", "Flat") != "Flat":
            raise ValueError(f"'faiss-flat' is index_factory='Flat', got {options['index_factory']!r}")
        return FaissSearchConfig(**options)
    if spec == "faiss-gpu":
        return FaissSearchConfig(**{"gpu": _gpu_id(device), **options})
    if spec in (TorchSearchConfig.name, PQSearchConfig.name):
        return BACKENDS[spec](**{"device": device, **options})
    if spec in BACKENDS:
        cls = BACKENDS[spec]
        names = {f.name for f in dataclasses.fields(cls)}
        if device is not None and "device" in names:
            options.setdefault("device", device)
        return cls(**options)
    raise ValueError(f"unknown search backend {spec!r}; known: {backend_names()}")


def config_from_options(
    backend,
    *,
    index_factory: str = "Flat",
    search_params: dict | None = None,
    device=None,
    search_dtype: torch.dtype | None = None,
    train_size: int | None = None,
) -> BackendConfig:
    """A backend name (or `"auto"`) plus the index-style options (``index_factory``, ``search_params``, ``device``,
    ``search_dtype``, ``train_size``) as one config; a config passed as ``backend`` is returned as is (the options must
    then be unset). `"auto"`: exact torch search on a GPU, else faiss (flat) when installed, else torch on the CPU."""
    if isinstance(backend, BackendConfig):
        given = {
            "index_factory": index_factory != "Flat",
            "search_params": bool(search_params),
            "device": device is not None,
            "search_dtype": search_dtype is not None,
            "train_size": train_size is not None,
        }
        if any(given.values()):
            names = [name for name, set_ in given.items() if set_]
            raise ValueError(f"backend is a {type(backend).__name__}: set {names} in it, not as index arguments")
        return backend
    if backend not in _INDEX_NAMES and backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {_INDEX_NAMES}, a registered search backend or a config, got {backend!r}"
        )
    if backend == "auto":
        if torch.cuda.is_available():
            backend = "torch"
        elif faiss_available():
            backend = "faiss"
        else:
            logger.info("faiss is not installed: exact search in torch on the CPU")
            backend = "torch"
    if backend == "torch":
        if index_factory != "Flat":
            raise ValueError(f"index_factory={index_factory!r} needs a faiss backend; the torch backend is exact")
        return TorchSearchConfig(device=device, dtype=search_dtype)
    if backend in ("faiss", "faiss-gpu"):
        options = {"index_factory": index_factory, "search_params": dict(search_params or {})}
        if train_size is not None:
            options["train_size"] = train_size
        return backend_config(backend, device=device, **options)
    return backend_config(backend, device=device)
