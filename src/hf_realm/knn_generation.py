"""kNN-MT / kNN-LM for `generate()`: a datastore of (hidden state -> next token) pairs and a logits processor.

Khandelwal et al. 2020 (kNN-LM, arXiv:1911.00172) and 2021 (kNN-MT, arXiv:2010.00710): run a model teacher-forced
over a corpus and store, for every target position, key = the hidden state that feeds the output embedding and
value = the next target token. At decoding step t the current state queries the k nearest keys (squared L2) and

    p_kNN(y) ∝ sum_{neighbours i with value y} count_i * exp(-d_i / T)
    p(y)     = λ p_kNN(y) + (1 - λ) p_LM(y)                 (computed in log space)

`KNNLogitsProcessor` injects this into `model.generate()`. A `LogitsProcessor` only sees `(input_ids, scores)`, so
the query comes from a forward pre-hook on `model.get_output_embeddings()` that keeps the input of the output layer
(`KNNQueryHook`); every `batch x beam` row of `scores` queries with its own last state.

Layout of a saved datastore (`KNNDatastore.save_pretrained`):

    knn_datastore.json   metadata: count, key dim, dtypes, model and tokenizer fingerprints, compression, history
    keys.npy             (num_entries, key_dim) float16       (absent when keys are product-quantised)
    values.npy           (num_entries,) int32                   next-token ids
    provenance.npy       (num_entries, 2) int64                 (example id, target position) of every entry
    counts.npy           (num_entries,) int32, optional         merge counts (greedy merging), used as weights
    projection.npz       optional                               PCA of the keys: queries are projected the same way
    pq.npz               optional                               product quantisation codes and codebooks
    index.faiss          optional                               a trained faiss index (IVF-PQ / flat)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

from .search import exact_topk


DATASTORE_CONFIG_NAME = "knn_datastore.json"
FORMAT_VERSION = 1
_NPY_HEADER_BYTES = 256
_INDEX_TYPES = ("auto", "torch", "faiss-flat", "faiss-ivfpq")


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this index needs faiss: `pip install faiss-cpu` (or `faiss-gpu-cu12`), or use index_type='torch'"
        ) from err
    return faiss


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


# ----------------------------------------------------------------------------------------------------------------------
# Streaming writes: .npy files whose size is not known in advance, in a temporary directory renamed at the end.
# ----------------------------------------------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = _NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"npy header for shape {shape} does not fit in {_NPY_HEADER_BYTES} bytes")
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


class _NpyAppender:
    """Appends rows to a .npy file; the header (with the final row count) is written on close."""

    def __init__(self, path: str | os.PathLike, dtype, row_shape: tuple[int, ...] = ()):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(
                f"rows of shape {array.shape[1:]} appended to {self.path.name}, expected {self.row_shape}"
            )
        self._file.write(array.tobytes())
        self.rows += array.shape[0]

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _replace_directory(tmp_dir: Path, final_dir: Path) -> None:
    """Moves a finished ``tmp_dir`` to ``final_dir``; an existing ``final_dir`` stays usable until the new one is in."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        backup = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, backup)
        try:
            os.replace(tmp_dir, final_dir)
        except BaseException:
            os.replace(backup, final_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


class KNNDatastoreWriter:
    """Streams (key, value, provenance) rows into a datastore directory of unknown final size.

    Rows go to a temporary directory next to ``save_directory``; [`~KNNDatastoreWriter.commit`] writes the
    metadata and renames it into place, so an interrupted build never leaves a half-written datastore behind (nor
    damages one already at ``save_directory``).

    Example:

    ```python
    >>> import numpy as np, tempfile
    >>> from hf_realm.knn_generation import KNNDatastore, KNNDatastoreWriter
    >>> path = tempfile.mkdtemp() + "/store"
    >>> writer = KNNDatastoreWriter(path, key_dim=4)
    >>> writer.add(np.eye(4, dtype=np.float16), np.arange(4), np.zeros((4, 2), dtype=np.int64))
    >>> store = KNNDatastore.from_pretrained(writer.commit())
    >>> len(store), store.key_dim
    (4, 4)
    ```
    """

    def __init__(self, save_directory: str | os.PathLike, key_dim: int, with_counts: bool = False):
        self.save_directory = Path(save_directory)
        self.key_dim = int(key_dim)
        self.save_directory.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{self.save_directory.name}.tmp-", dir=self.save_directory.parent)
        )
        self._keys = _NpyAppender(self.tmp_dir / "keys.npy", np.float16, (self.key_dim,))
        self._values = _NpyAppender(self.tmp_dir / "values.npy", np.int32)
        self._provenance = _NpyAppender(self.tmp_dir / "provenance.npy", np.int64, (2,))
        self._counts = _NpyAppender(self.tmp_dir / "counts.npy", np.int32) if with_counts else None
        self.max_value = -1
        self._closed = False

    def __len__(self) -> int:
        return self._values.rows

    def add(self, keys, values, provenance, counts=None) -> None:
        """Appends rows. ``keys`` `(n, key_dim)`, ``values`` `(n,)`, ``provenance`` `(n, 2)`; arrays or tensors."""
        keys, values, provenance = (_to_numpy(x) for x in (keys, values, provenance))
        n = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.key_dim:
            raise ValueError(f"keys of shape {keys.shape}, expected (n, {self.key_dim})")
        if values.shape != (n,) or provenance.shape != (n, 2):
            raise ValueError(f"got {n} keys, values of shape {values.shape}, provenance of shape {provenance.shape}")
        keys16 = keys.astype(np.float16)
        if not np.isfinite(keys16).all():
            bad = int((~np.isfinite(keys16)).any(axis=1).sum())
            raise ValueError(f"{bad} of {n} keys are not finite in float16 (NaN states, or values beyond +-65504)")
        if n and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise ValueError(f"values must be token ids in [0, 2^31), got range [{values.min()}, {values.max()}]")
        if (counts is None) != (self._counts is None):
            raise ValueError("counts must be given on every add() exactly when the writer was made with_counts=True")
        self._keys.append(keys16)
        self._values.append(values)
        self._provenance.append(provenance)
        if self._counts is not None:
            self._counts.append(_to_numpy(counts))
        if n:
            self.max_value = max(self.max_value, int(values.max()))

    def commit(self, metadata: dict[str, Any] | None = None) -> Path:
        """Finishes the files, writes the metadata and moves the datastore to ``save_directory``."""
        for appender in (self._keys, self._values, self._provenance, self._counts):
            if appender is not None:
                appender.close()
        meta = dict(metadata or {})
        meta.update(
            format_version=FORMAT_VERSION,
            num_entries=len(self),
            key_dim=self.key_dim,
            input_dim=meta.get("input_dim", self.key_dim),
            key_dtype="float16",
            value_dtype="int32",
            max_value=self.max_value,
            has_counts=self._counts is not None,
        )
        with open(self.tmp_dir / DATASTORE_CONFIG_NAME, "w") as f:
            json.dump(meta, f, indent=2)
        _replace_directory(self.tmp_dir, self.save_directory)
        self._closed = True
        return self.save_directory

    def abort(self) -> None:
        """Drops everything written so far."""
        for appender in (self._keys, self._values, self._provenance, self._counts):
            if appender is not None and not appender._file.closed:
                appender._file.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._closed = True


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):  # keeps np.memmap as it is
        return x
    return np.asarray(x)


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
    >>> from hf_realm.knn_generation import KNNQueryHook
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


# ----------------------------------------------------------------------------------------------------------------------
# The datastore.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _DeviceStore:
    """What the search needs, moved once to one device."""

    device: torch.device
    keys: torch.Tensor | None  # (n, d) fp16 (fp32 on CPU), None with PQ
    key_bias: torch.Tensor | None  # (n,) fp32: -||k||^2 / 2
    values: torch.Tensor  # (n,) int32
    log_counts: torch.Tensor | None  # (n,) fp32
    projection_bias: torch.Tensor | None
    projection_matrix: torch.Tensor | None
    pq_codes: torch.Tensor | None  # (n, m) uint8
    pq_codebooks: torch.Tensor | None  # (m, ksub, dsub) fp32


class KNNDatastore:
    r"""A kNN-MT / kNN-LM datastore: keys (float16 hidden states), values (int32 next tokens), provenance.

    Build one with [`KNNDatastore.build`] (teacher-forced over a `datasets.Dataset`), keep it with
    `save_pretrained` / `from_pretrained` / `push_to_hub`, and decode with [`KNNLogitsProcessor`]. Arrays are
    memory-mapped on load; the search structures are moved to a device on first use ([`KNNDatastore.to`]).

    Args:
        keys (`np.ndarray` of shape `(num_entries, key_dim)`, *optional*):
            Keys, stored as float16. `None` only for product-quantised stores (``pq``).
        values (`np.ndarray` of shape `(num_entries,)`):
            Next-token ids.
        provenance (`np.ndarray` of shape `(num_entries, 2)`, *optional*):
            `(example id, target position)` of every entry; `-1` where unknown.
        counts (`np.ndarray` of shape `(num_entries,)`, *optional*):
            Number of original entries each entry stands for (greedy merging); a weight at search time.
        metadata (`dict`, *optional*):
            Model / tokenizer fingerprints, compression and pruning history (see `knn_datastore.json`).
        projection (`dict`, *optional*):
            `{"matrix": (input_dim, key_dim), "bias": (key_dim,)}`: queries are mapped to `q @ matrix + bias`
            before the search (PCA compression; composes by matrix products).
        pq (`dict`, *optional*):
            `{"codes": (num_entries, m) uint8, "codebooks": (m, 256, key_dim / m) float32}` replacing ``keys``.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from hf_realm.knn_generation import KNNDatastore
    >>> store = KNNDatastore(keys=np.eye(3, dtype=np.float16), values=np.array([5, 6, 7]))
    >>> sqdist, ids = store.search(torch.tensor([[0.0, 0.9, 0.0]]), k=2)
    >>> ids.tolist(), store.values[ids[0]].tolist()
    ([[1, 0]], [6, 5])
    ```
    """

    def __init__(
        self,
        keys: np.ndarray | torch.Tensor | None = None,
        values: np.ndarray | torch.Tensor | None = None,
        provenance: np.ndarray | torch.Tensor | None = None,
        counts: np.ndarray | torch.Tensor | None = None,
        metadata: dict[str, Any] | None = None,
        projection: dict[str, np.ndarray] | None = None,
        pq: dict[str, np.ndarray] | None = None,
    ):
        if values is None:
            raise ValueError("values are required")
        self.values = _to_numpy(values)
        if self.values.ndim != 1:
            raise ValueError(f"values must be 1-d, got shape {self.values.shape}")
        n = self.values.shape[0]
        if self.values.dtype != np.int32:
            self.values = self.values.astype(np.int32)
        if keys is None and pq is None:
            raise ValueError("either keys or pq codes are required")
        if keys is not None:
            keys = _to_numpy(keys)
            if keys.dtype != np.float16:
                keys = keys.astype(np.float16)
            if keys.ndim != 2 or keys.shape[0] != n:
                raise ValueError(f"keys of shape {keys.shape} for {n} values; expected ({n}, key_dim)")
        self.keys = keys
        self.pq = None
        if pq is not None:
            codes, codebooks = _to_numpy(pq["codes"]).astype(np.uint8), _to_numpy(pq["codebooks"]).astype(np.float32)
            if codes.shape[0] != n or codes.ndim != 2 or codebooks.ndim != 3 or codebooks.shape[0] != codes.shape[1]:
                raise ValueError(f"pq codes {codes.shape} / codebooks {codebooks.shape} do not fit {n} entries")
            self.pq = {"codes": codes, "codebooks": codebooks}
        self.provenance = (
            np.full((n, 2), -1, dtype=np.int64) if provenance is None else _to_numpy(provenance).astype(np.int64)
        )
        if self.provenance.shape != (n, 2):
            raise ValueError(f"provenance of shape {self.provenance.shape}, expected ({n}, 2)")
        self.counts = None if counts is None else _to_numpy(counts).astype(np.int32)
        if self.counts is not None and self.counts.shape != (n,):
            raise ValueError(f"counts of shape {self.counts.shape}, expected ({n},)")
        self.projection = None
        if projection is not None:
            matrix = _to_numpy(projection["matrix"]).astype(np.float32)
            bias = _to_numpy(projection["bias"]).astype(np.float32)
            if matrix.ndim != 2 or matrix.shape[1] != self.key_dim or bias.shape != (self.key_dim,):
                raise ValueError(
                    f"projection matrix {matrix.shape} / bias {bias.shape} do not map to key dim {self.key_dim}"
                )
            self.projection = {"matrix": matrix, "bias": bias}
        self.metadata = dict(metadata or {})
        self.metadata["num_entries"] = n
        self.metadata["key_dim"] = self.key_dim
        self.metadata["input_dim"] = self.input_dim
        self.metadata["max_value"] = int(self.values.max()) if n else -1
        self.metadata["has_counts"] = self.counts is not None
        self._device_store: _DeviceStore | None = None
        self._faiss_index = None
        self.index_type = "torch"
        self.index_options: dict[str, Any] = {}

    # -- sizes ---------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        kind = "pq" if self.pq is not None else "float16"
        return (
            f"KNNDatastore(num_entries={len(self)}, key_dim={self.key_dim}, input_dim={self.input_dim}, keys={kind}, "
            f"counts={self.counts is not None}, index={self.index_type!r})"
        )

    @property
    def key_dim(self) -> int:
        if self.keys is not None:
            return int(self.keys.shape[1])
        cb = self.pq["codebooks"]
        return int(cb.shape[0] * cb.shape[2])

    @property
    def input_dim(self) -> int:
        """Dimension of the model states (queries) before any projection."""
        return int(self.projection["matrix"].shape[0]) if self.projection is not None else self.key_dim

    @property
    def nbytes(self) -> int:
        """Bytes the search needs: keys (or PQ codes + codebooks), values, counts and the projection."""
        total = self.values.nbytes
        total += self.keys.nbytes if self.keys is not None else self.pq["codes"].nbytes + self.pq["codebooks"].nbytes
        if self.counts is not None:
            total += self.counts.nbytes
        if self.projection is not None:
            total += self.projection["bias"].nbytes + self.projection["matrix"].nbytes
        return int(total)

    # -- persistence ---------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **push_kwargs) -> Path:
        """Writes the datastore to ``save_directory`` (atomically: a temporary directory renamed at the end)."""
        save_directory = Path(save_directory)
        writer_meta = dict(self.metadata)
        save_directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.tmp-", dir=save_directory.parent))
        try:
            if self.keys is not None:
                _save_npy_chunked(tmp / "keys.npy", self.keys)
            np.save(tmp / "values.npy", self.values)
            np.save(tmp / "provenance.npy", self.provenance)
            if self.counts is not None:
                np.save(tmp / "counts.npy", self.counts)
            if self.projection is not None:
                np.savez(tmp / "projection.npz", **self.projection)
            if self.pq is not None:
                np.savez(tmp / "pq.npz", **self.pq)
            if self._faiss_index is not None:
                faiss = _import_faiss()
                faiss.write_index(self._faiss_index, str(tmp / "index.faiss"))
                writer_meta["index"] = {"type": self.index_type, **self.index_options}
            writer_meta.update(
                format_version=FORMAT_VERSION,
                key_dtype="float16" if self.keys is not None else "pq",
                value_dtype="int32",
            )
            with open(tmp / DATASTORE_CONFIG_NAME, "w") as f:
                json.dump(writer_meta, f, indent=2)
            _replace_directory(tmp, save_directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", save_directory.name)
            self.push_to_hub(repo_id, _folder=save_directory, **push_kwargs)
        return save_directory

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        mmap: bool = True,
        repo_type: str = "dataset",
        revision: str | None = None,
        token: str | bool | None = None,
        load_index: bool = True,
    ) -> KNNDatastore:
        """Loads a datastore from a local directory or a Hub repository (arrays memory-mapped by default)."""
        path = Path(path_or_repo_id)
        if not (path / DATASTORE_CONFIG_NAME).is_file():
            if path.exists():
                raise FileNotFoundError(f"{path} is not a kNN datastore: no {DATASTORE_CONFIG_NAME} in it")
            from huggingface_hub import snapshot_download  # noqa: PLC0415

            path = Path(snapshot_download(str(path_or_repo_id), repo_type=repo_type, revision=revision, token=token))
        with open(path / DATASTORE_CONFIG_NAME) as f:
            meta = json.load(f)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"datastore format {meta['format_version']} is newer than this library's {FORMAT_VERSION}"
            )
        n, dim = int(meta["num_entries"]), int(meta["key_dim"])
        mode = "r" if mmap else None

        def load(name, shape, required=True):
            file = path / name
            if not file.is_file():
                if required:
                    raise FileNotFoundError(f"{file} is missing from the datastore")
                return None
            try:
                array = np.load(file, mmap_mode=mode)
            except ValueError as err:
                raise ValueError(
                    f"{file} is truncated or corrupt ({err}); rebuild or re-download the datastore"
                ) from err
            if array.shape != shape:
                raise ValueError(f"{file} holds shape {array.shape}, expected {shape} from {DATASTORE_CONFIG_NAME}")
            return array

        pq = None
        keys = None
        if (path / "pq.npz").is_file():
            with np.load(path / "pq.npz") as z:
                pq = {"codes": z["codes"], "codebooks": z["codebooks"]}
        else:
            keys = load("keys.npy", (n, dim))
        values = load("values.npy", (n,))
        provenance = load("provenance.npy", (n, 2))
        counts = load("counts.npy", (n,), required=bool(meta.get("has_counts")))
        projection = None
        if (path / "projection.npz").is_file():
            with np.load(path / "projection.npz") as z:
                projection = {"matrix": z["matrix"], "bias": z["bias"]}
        store = cls(keys, values, provenance, counts, meta, projection=projection, pq=pq)
        if load_index and (path / "index.faiss").is_file():
            faiss = _import_faiss()
            store._faiss_index = faiss.read_index(str(path / "index.faiss"))
            index_meta = dict(meta.get("index", {}))
            store.index_type = index_meta.pop("type", "faiss-ivfpq")
            store.index_options = index_meta
        return store

    def push_to_hub(
        self,
        repo_id: str,
        repo_type: str = "dataset",
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload kNN datastore",
        _folder: Path | None = None,
    ):
        """Uploads the datastore to the Hub (a dataset repository by default)."""
        from huggingface_hub import HfApi  # noqa: PLC0415

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        with contextlib.ExitStack() as stack:
            folder = _folder
            if folder is None:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "datastore"
                self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, commit_message=commit_message
            )

    # -- model compatibility -------------------------------------------------------------------------------------------

    def check_model(self, model: nn.Module, tokenizer=None, check_weights: bool = True) -> None:
        """Raises if ``model`` (or ``tokenizer``) is not the one this datastore was built with.

        Checks the hidden size against the key (input) dim, the vocabulary against the largest value, and, when the
        metadata holds them, the weights fingerprint and the tokenizer hash.
        """
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hidden = getattr(out, "in_features", None)
        if hidden is None and isinstance(getattr(out, "weight", None), torch.Tensor):
            hidden = out.weight.shape[1]
        if hidden is not None and hidden != self.input_dim:
            raise ValueError(f"model hidden size {hidden} != datastore key dim {self.input_dim}")
        vocab = getattr(out, "out_features", None)
        max_value = int(self.metadata.get("max_value", -1))
        if vocab is not None and max_value >= vocab:
            raise ValueError(f"datastore holds token id {max_value} but the model's vocabulary has {vocab} tokens")
        stored = self.metadata.get("model_fingerprint")
        if check_weights and stored is not None:
            current = model_fingerprint(model)
            if not _fingerprints_match(stored, current):
                raise ValueError(
                    "the model's weights do not match the datastore (weights hash "
                    f"{current['sha256'][:12]} != {stored['sha256'][:12]} of "
                    f"{self.metadata.get('model_name_or_path') or 'the building model'}); rebuild the datastore with "
                    "this model, or pass check_weights=False if you know what you are doing"
                )
        stored_tok = self.metadata.get("tokenizer_hash")
        if tokenizer is not None and stored_tok is not None:
            current_tok = tokenizer_fingerprint(tokenizer)
            if current_tok != stored_tok:
                raise ValueError(
                    f"tokenizer hash {current_tok[:12]} != {stored_tok[:12]} recorded in the datastore: the token ids "
                    "(values) would mean other tokens"
                )

    # -- search --------------------------------------------------------------------------------------------------------

    def build_index(
        self, index_type: str = "auto", device: str | torch.device | None = None, **options
    ) -> KNNDatastore:
        """Chooses (and for faiss, trains) the search structure.

        Args:
            index_type (`str`, *optional*, defaults to `"auto"`):
                `"torch"`: exact search on ``device`` (keys in fp16 on the GPU, fp32 on the CPU).
                `"faiss-flat"`: exact faiss search on the CPU. `"faiss-ivfpq"`: approximate, for large stores.
                `"auto"`: `"torch"` on a GPU when the keys fit in 80% of its free memory, or on the CPU up to 2M
                entries; `"faiss-ivfpq"` otherwise.
            device (`str` or `torch.device`, *optional*):
                Device of the torch search (default: CUDA when available).
            options:
                faiss-ivfpq: `nlist` (default `4 * sqrt(n)`), `m` (sub-quantisers, default `key_dim / 8`), `nbits`
                (8), `nprobe` (32), `rerank` (re-score `rerank * k` candidates exactly from the stored keys; 0 = off,
                default 4), `train_size` (entries used to train, default 256 * nlist).
        """
        if index_type not in _INDEX_TYPES:
            raise ValueError(f"index_type must be one of {_INDEX_TYPES}, got {index_type!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if index_type == "auto":
            index_type = self._auto_index_type(device)
        if self.pq is not None and index_type != "torch":
            raise ValueError(f"a product-quantised datastore is searched with index_type='torch', got {index_type!r}")
        self.index_type = index_type
        self.index_options = dict(options)
        self._faiss_index = None
        if index_type == "torch":
            self.to(device)
            return self
        faiss = _import_faiss()
        keys = np.asarray(self.keys, dtype=np.float32)
        d = self.key_dim
        if index_type == "faiss-flat":
            index = faiss.IndexFlatL2(d)
        else:
            n = len(self)
            nlist = int(options.get("nlist", max(1, min(n // 39, int(4 * math.sqrt(n))))))
            m = int(options.get("m", max(1, d // 8)))
            if d % m:
                raise ValueError(f"m={m} sub-quantisers must divide the key dim {d}")
            nbits = int(options.get("nbits", 8))
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
            train_size = min(n, int(options.get("train_size", 256 * nlist)))
            rng = np.random.default_rng(0)
            sample = keys[np.sort(rng.choice(n, size=train_size, replace=False))]
            index.train(sample)
            index.nprobe = int(options.get("nprobe", 32))
            self.index_options.update(nlist=nlist, m=m, nbits=nbits, nprobe=index.nprobe)
            self.index_options.setdefault("rerank", 4)
        for start in range(0, len(self), 1 << 18):
            index.add(np.ascontiguousarray(keys[start : start + (1 << 18)]))
        self._faiss_index = index
        self.to(device, keys_on_device=False)
        return self

    def _auto_index_type(self, device: torch.device) -> str:
        if self.pq is not None:
            return "torch"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return "torch" if self.keys.nbytes < 0.8 * free else "faiss-ivfpq"
        return "torch" if len(self) <= 2_000_000 else "faiss-ivfpq"

    def to(self, device: str | torch.device, keys_on_device: bool = True) -> KNNDatastore:
        """Moves the search structures (keys, key norms, values, counts) to ``device``; a no-op when already there."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        current = self._device_store
        if current is not None and current.device == device and (current.keys is not None or not keys_on_device):
            return self
        keys = key_bias = codes = codebooks = None
        if self.pq is not None:
            codes = torch.from_numpy(np.array(self.pq["codes"])).to(device)
            codebooks = torch.from_numpy(self.pq["codebooks"]).to(device)
            key_bias = -0.5 * _pq_sqnorms(codes, codebooks)
        elif keys_on_device:
            key_dtype = torch.float16 if device.type == "cuda" else torch.float32
            keys = torch.empty((len(self), self.key_dim), dtype=key_dtype, device=device)
            key_bias = torch.empty(len(self), dtype=torch.float32, device=device)
            step = 1 << 20
            for start in range(0, len(self), step):
                chunk = torch.from_numpy(np.array(self.keys[start : start + step])).to(device)
                keys[start : start + chunk.shape[0]] = chunk.to(key_dtype)
                key_bias[start : start + chunk.shape[0]] = -0.5 * chunk.float().pow(2).sum(-1)
        values = torch.from_numpy(np.array(self.values)).to(device)
        log_counts = None
        if self.counts is not None:
            log_counts = torch.from_numpy(self.counts.astype(np.float32)).to(device).log()
        bias = matrix = None
        if self.projection is not None:
            bias = torch.from_numpy(self.projection["bias"]).to(device)
            matrix = torch.from_numpy(self.projection["matrix"]).to(device)
        self._device_store = _DeviceStore(device, keys, key_bias, values, log_counts, bias, matrix, codes, codebooks)
        return self

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """Maps model states (`input_dim`) to key space (`key_dim`), float32."""
        queries = queries.float()
        if queries.shape[-1] != self.input_dim:
            raise ValueError(f"query dim {queries.shape[-1]} != datastore input dim {self.input_dim}")
        store = self._device_store_for(queries.device)
        if store.projection_matrix is not None:
            queries = torch.addmm(store.projection_bias, queries, store.projection_matrix)
        return queries

    def _device_store_for(self, device: torch.device) -> _DeviceStore:
        store = self._device_store
        if store is None or store.device != device:
            if self._faiss_index is not None:
                self.to(device, keys_on_device=False)
            else:
                self.to(device)
            store = self._device_store
        return store

    def search(self, queries: torch.Tensor, k: int, projected: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest entries of every query, by squared L2 distance.

        Args:
            queries (`torch.Tensor` of shape `(num_queries, input_dim)`):
                Model states (any float dtype, any device; results come back on the same device).
            k (`int`):
                Neighbours per query, `1 <= k <= len(self)`.
            projected (`bool`, *optional*, defaults to `False`):
                Whether ``queries`` are already in key space (see [`KNNDatastore.project`]).

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: squared distances (float32, ascending) and entry ids (int64), each
            `(num_queries, k)`. With the torch index the distances of the candidates are recomputed exactly in
            float32 from the keys (no fp16 cancellation).
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the datastore size), got {k}")
        if queries.dim() != 2:
            raise ValueError(f"queries must be 2-d (num_queries, dim), got shape {tuple(queries.shape)}")
        q = queries.float() if projected else self.project(queries)
        if q.shape[-1] != self.key_dim:
            raise ValueError(f"query dim {q.shape[-1]} != datastore key dim {self.key_dim}")
        store = self._device_store_for(q.device)
        if self._faiss_index is not None:
            return self._faiss_search(q, k)
        if store.pq_codes is not None:
            return _pq_search(q, store.pq_codes, store.pq_codebooks, store.key_bias, k)
        _, ids = exact_topk(q, store.keys, k, key_bias=store.key_bias)
        candidates = store.keys[ids].float()  # (b, k, d)
        sqdist = (q.unsqueeze(1) - candidates).pow(2).sum(-1)
        sqdist, order = sqdist.sort(dim=1)
        return sqdist, ids.gather(1, order)

    def _faiss_search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rerank = int(self.index_options.get("rerank", 0)) if self.index_type == "faiss-ivfpq" else 0
        fetch = min(len(self), k * rerank) if rerank > 0 else k
        q_np = q.detach().cpu().numpy().astype(np.float32)
        dist, ids = self._faiss_index.search(q_np, fetch)
        if rerank > 0:
            safe = np.where(ids < 0, 0, ids)
            cand = np.asarray(self.keys[safe.reshape(-1)], dtype=np.float32).reshape(*safe.shape, -1)
            dist = ((q_np[:, None, :] - cand) ** 2).sum(-1)
            dist[ids < 0] = np.inf
            order = np.argsort(dist, axis=1, kind="stable")[:, :k]
            dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
        if (ids < 0).any():
            raise RuntimeError(
                f"the faiss index returned fewer than {k} neighbours for some queries; raise nprobe "
                f"(now {self.index_options.get('nprobe')}) or lower k"
            )
        return torch.from_numpy(dist.astype(np.float32)).to(q.device), torch.from_numpy(ids).long().to(q.device)

    # -- building ------------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        dataset,
        save_directory: str | os.PathLike,
        tokenizer=None,
        source_column: str | None = None,
        target_column: str | None = None,
        text_column: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        accelerator=None,
        model_name_or_path: str | None = None,
        progress: bool = True,
    ) -> KNNDatastore:
        """Runs ``model`` teacher-forced over ``dataset`` and streams one entry per target token to disk.

        Encoder-decoder models (Marian, T5, BART, ...) read ``source_column`` -> ``target_column`` pairs; the entry
        of target position t has key = decoder state at t, value = target token t. Decoder-only models (GPT-2,
        Llama, ...) read ``text_column``; key = state at t, value = token t + 1. A dataset already tokenised
        (columns `input_ids`, optionally `attention_mask` and `labels` with -100 at positions not to store) needs
        no tokenizer.

        Under `accelerate` (``accelerator`` with several processes) every rank builds a contiguous shard of the
        dataset into its own directory and the main process merges them in order; all ranks return the merged store.

        Args:
            model (`PreTrainedModel`): the model, in the dtype and on the device to run it.
            dataset (`datasets.Dataset`): the corpus.
            save_directory (`str` or `os.PathLike`): where the datastore goes (replaced atomically if it exists).
            tokenizer (`PreTrainedTokenizerBase`, *optional*): needed for raw-text columns; its hash is recorded.
            source_column, target_column (`str`, *optional*): text columns for encoder-decoder models.
            text_column (`str`, *optional*): text column for decoder-only models.
            batch_size (`int`, *optional*, defaults to 32): examples per forward pass.
            max_length (`int`, *optional*): truncation length of sources / targets / texts.
            accelerator (`accelerate.Accelerator`, *optional*): for multi-process builds.
            model_name_or_path (`str`, *optional*): recorded in the metadata (default: `model.name_or_path`).
            progress (`bool`, *optional*, defaults to `True`): show a tqdm bar on the main process.

        Example:

        ```python
        >>> import datasets, tempfile, torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_realm.knn_generation import KNNDatastore
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
        >>> data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6]]})
        >>> store = KNNDatastore.build(model, data, tempfile.mkdtemp() + "/ds", progress=False)
        >>> len(store), store.values.tolist()
        (4, [2, 3, 4, 6])
        ```
        """
        is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        columns = set(dataset.column_names)
        pretokenized = "input_ids" in columns
        if not pretokenized:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed for a dataset without an `input_ids` column")
            needed = [source_column, target_column] if is_enc_dec else [text_column]
            if any(c is None for c in needed):
                what = "source_column and target_column" if is_enc_dec else "text_column"
                raise ValueError(f"{type(model).__name__} needs {what} for a raw-text dataset")
            missing = [c for c in needed if c not in columns]
            if missing:
                raise ValueError(f"columns {missing} not in the dataset (it has {sorted(columns)})")
        elif is_enc_dec and "labels" not in columns:
            raise ValueError("a pre-tokenised dataset for an encoder-decoder model needs a `labels` column")
        hook_probe = KNNQueryHook(model)  # raises early for models without an output embedding
        out = hook_probe.module
        key_dim = getattr(out, "in_features", None) or int(out.weight.shape[1])

        num_processes = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
        rank = getattr(accelerator, "process_index", 0) if accelerator is not None else 0
        save_directory = Path(save_directory)
        n = len(dataset)
        bounds = [n * r // num_processes for r in range(num_processes + 1)]
        start, end = bounds[rank], bounds[rank + 1]
        shard_root = save_directory.with_name(f".{save_directory.name}.shards")
        target_dir = save_directory if num_processes == 1 else shard_root / f"rank-{rank:05d}"

        metadata = {
            "model_name_or_path": model_name_or_path or getattr(model, "name_or_path", None) or None,
            "model_class": type(model).__name__,
            "model_fingerprint": model_fingerprint(model),
            "is_encoder_decoder": is_enc_dec,
            "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
            "tokenizer_hash": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            "vocab_size": int(getattr(out, "out_features", 0) or out.weight.shape[0]),
            "source": {
                "num_examples": n,
                "fingerprint": getattr(dataset, "_fingerprint", None),
                "columns": [source_column, target_column] if is_enc_dec else [text_column],
            },
            "history": [],
        }
        writer = KNNDatastoreWriter(target_dir, key_dim)
        try:
            _build_shard(
                model, dataset, start, end, writer, tokenizer, is_enc_dec, pretokenized,
                source_column, target_column, text_column, batch_size, max_length,
                progress=progress and rank == 0,
            )  # fmt: skip
            writer.commit(metadata)
        except BaseException:
            writer.abort()
            raise
        if num_processes == 1:
            return cls.from_pretrained(save_directory)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shards = [shard_root / f"rank-{r:05d}" for r in range(num_processes)]
            merge_datastores(shards, save_directory, metadata=metadata)
            shutil.rmtree(shard_root, ignore_errors=True)
        accelerator.wait_for_everyone()
        return cls.from_pretrained(save_directory)

    # -- subsets (used by pruning) -------------------------------------------------------------------------------------

    def select(self, indices, counts=None, history: dict[str, Any] | None = None) -> KNNDatastore:
        """A new in-memory datastore with the entries ``indices`` (provenance kept), optionally new ``counts``."""
        indices = np.asarray(_to_numpy(indices), dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(self))):
            raise ValueError(f"indices must be a 1-d array of entry ids in [0, {len(self)})")
        if counts is None and self.counts is not None:
            counts = self.counts[indices]
        meta = dict(self.metadata)
        meta["history"] = [*self.metadata.get("history", []), *([history] if history else [])]
        pq = None
        if self.pq is not None:
            pq = {"codes": self.pq["codes"][indices], "codebooks": self.pq["codebooks"]}
        return type(self)(
            keys=None if self.keys is None else self.keys[indices],
            values=self.values[indices],
            provenance=self.provenance[indices],
            counts=counts,
            metadata=meta,
            projection=self.projection,
            pq=pq,
        )


def _save_npy_chunked(path: Path, array: np.ndarray, chunk: int = 1 << 20) -> None:
    appender = _NpyAppender(path, array.dtype, array.shape[1:])
    for start in range(0, array.shape[0], chunk):
        appender.append(array[start : start + chunk])
    appender.close()


def _pq_sqnorms(codes: torch.Tensor, codebooks: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """||reconstruction||^2 of every PQ-coded entry (sum over sub-spaces of the centroid norms)."""
    centroid_norms = codebooks.pow(2).sum(-1)  # (m, ksub)
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=codes.device)
    sub = torch.arange(codes.shape[1], device=codes.device)
    for start in range(0, codes.shape[0], chunk):
        c = codes[start : start + chunk].long()
        out[start : start + c.shape[0]] = centroid_norms[sub, c].sum(-1)
    return out


def pq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Reconstructs `(n, m * dsub)` float32 keys from PQ ``codes`` `(n, m)` and ``codebooks`` `(m, ksub, dsub)`."""
    sub = torch.arange(codes.shape[1], device=codes.device)
    return codebooks[sub, codes.long()].reshape(codes.shape[0], -1)


def _pq_search(q, codes, codebooks, key_bias, k, chunk: int = 1 << 18):
    """Exact search over the PQ reconstructions (= faiss IndexPQ's asymmetric distances), decoded chunk by chunk."""
    best_scores = best_ids = None
    for start in range(0, codes.shape[0], chunk):
        keys = pq_decode(codes[start : start + chunk], codebooks)
        kk = min(k, keys.shape[0])
        scores, ids = exact_topk(q, keys, kk, key_bias=key_bias[start : start + keys.shape[0]])
        ids = ids + start
        if best_scores is None:
            best_scores, best_ids = scores, ids
        else:
            scores, order = torch.cat([best_scores, scores], 1).topk(min(k, best_scores.shape[1] + kk), dim=1)
            best_scores, best_ids = scores, torch.cat([best_ids, ids], 1).gather(1, order)
    recon = pq_decode(codes[best_ids.reshape(-1)], codebooks).reshape(*best_ids.shape, -1)
    sqdist = (q.unsqueeze(1) - recon).pow(2).sum(-1)
    sqdist, order = sqdist.sort(dim=1)
    return sqdist, best_ids.gather(1, order)


def merge_datastores(
    directories: Sequence[str | os.PathLike], save_directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Concatenates saved datastores (same key dim) into one at ``save_directory``, streaming, in the given order."""
    stores = [KNNDatastore.from_pretrained(d, load_index=False) for d in directories]
    dims = {s.key_dim for s in stores}
    if len(dims) != 1:
        raise ValueError(f"cannot merge datastores of key dims {sorted(dims)}")
    with_counts = any(s.counts is not None for s in stores)
    writer = KNNDatastoreWriter(save_directory, dims.pop(), with_counts=with_counts)
    try:
        for store in stores:
            step = 1 << 20
            for start in range(0, len(store), step):
                sl = slice(start, start + step)
                counts = None
                if with_counts:
                    counts = store.counts[sl] if store.counts is not None else np.ones(len(store.values[sl]), np.int32)
                writer.add(store.keys[sl], store.values[sl], store.provenance[sl], counts)
        meta = dict(metadata if metadata is not None else stores[0].metadata)
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _batch_tensors(batch, tokenizer, is_enc_dec, pretokenized, src_col, tgt_col, text_col, max_length, pad_id):
    """Returns (model inputs, target ids (-100 = not stored)) for one batch of examples."""
    trunc = {"truncation": max_length is not None, "max_length": max_length}
    if pretokenized:
        ids = [list(x) for x in batch["input_ids"]]
        input_ids = _pad(ids, pad_id)
        attention = _pad([list(x) for x in batch["attention_mask"]], 0) if "attention_mask" in batch else None
        if attention is None:
            attention = _pad([[1] * len(x) for x in ids], 0)
        labels = _pad([list(x) for x in batch["labels"]], -100) if "labels" in batch else None
    elif is_enc_dec:
        enc = tokenizer(list(batch[src_col]), text_target=list(batch[tgt_col]), **trunc)
        input_ids = _pad(enc["input_ids"], pad_id)
        attention = _pad(enc["attention_mask"], 0)
        labels = _pad(enc["labels"], -100)
    else:
        enc = tokenizer(list(batch[text_col]), **trunc)
        input_ids = _pad(enc["input_ids"], pad_id)
        attention = _pad(enc["attention_mask"], 0)
        labels = None
    if is_enc_dec:
        return {"input_ids": input_ids, "attention_mask": attention}, labels
    # Decoder-only: state t predicts token t + 1.
    targets = input_ids.masked_fill(attention == 0, -100)
    if labels is not None:
        targets = targets.masked_fill(labels == -100, -100)
    targets = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -100)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention}, targets


def _decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return prepare(labels=labels)
    config = model.config
    start = config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{type(model).__name__} has no decoder_start_token_id to shift the labels with")
    shifted = labels.new_full(labels.shape, config.pad_token_id if config.pad_token_id is not None else 0)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == -100, config.pad_token_id if config.pad_token_id is not None else 0)


@torch.no_grad()
def _build_shard(
    model,
    dataset,
    start,
    end,
    writer,
    tokenizer,
    is_enc_dec,
    pretokenized,
    src_col,
    tgt_col,
    text_col,
    batch_size,
    max_length,
    progress,
):
    from tqdm.auto import tqdm  # noqa: PLC0415

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    bar = tqdm(total=end - start, desc="kNN datastore", unit="ex", disable=not progress)
    try:
        with KNNQueryHook(model, capture="all") as hook:
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                batch = dataset[lo:hi]
                inputs, targets = _batch_tensors(
                    batch, tokenizer, is_enc_dec, pretokenized, src_col, tgt_col, text_col, max_length, pad_id
                )
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if is_enc_dec:
                    dec = _decoder_inputs(model, targets.to(device))
                    model(**inputs, decoder_input_ids=dec, use_cache=False)
                else:
                    model(**inputs, use_cache=False)
                states = hook.state  # (b, t, d)
                targets = targets.to(device)
                if states.shape[:2] != targets.shape:
                    raise RuntimeError(f"captured states {tuple(states.shape[:2])} != targets {tuple(targets.shape)}")
                mask = targets != -100
                rows, cols = mask.nonzero(as_tuple=True)
                keys = states[rows, cols]
                if not torch.isfinite(keys).all():
                    raise ValueError(f"the model produced non-finite hidden states for examples {lo}..{hi - 1}")
                provenance = torch.stack([rows + lo, cols], dim=1)
                writer.add(keys.float().cpu().numpy(), targets[rows, cols].cpu().numpy(), provenance.cpu().numpy())
                bar.update(hi - lo)
    finally:
        bar.close()
        model.train(was_training)


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
            On GPUs, NaN/inf queries are flagged on the device and checked (a host sync) every this many steps and on
            detach; on the CPU every step.

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
        self.hook: KNNQueryHook | None = None
        self.num_searches = 0
        self.num_skipped = 0
        self._consumed = 0
        self._last_len: int | None = None
        self._steps = 0
        self._nonfinite: torch.Tensor | None = None

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
        self.datastore._device_store_for(device)
        self.reset()
        return self

    def detach(self) -> None:
        """Removes the hook (and runs the pending NaN check)."""
        if self.hook is not None:
            self.hook.detach()
            self.hook = None
            self._check_finite()

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
        if exc_type is None:
            self._check_finite()

    def _check_finite(self) -> None:
        flag, self._nonfinite = self._nonfinite, None
        if flag is not None and bool(flag):
            raise ValueError("the model produced NaN/inf hidden states as kNN queries; the kNN output is invalid")

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
        store = self.datastore._device_store_for(scores.device)
        vocab = scores.shape[-1]
        max_value = int(self.datastore.metadata.get("max_value", -1))
        if max_value >= vocab:
            raise ValueError(f"datastore holds token id {max_value} but the scores have {vocab} columns")
        queries = state.to(scores.device)
        flag = ~torch.isfinite(queries).all()
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag
        self._steps += 1
        if scores.device.type == "cpu" or self._steps % self.check_finite_every == 0:
            self._check_finite()

        if self.skip_threshold is None:
            sqdist, ids = self.datastore.search(queries, self.k)
            self.num_searches += scores.shape[0]
            knn_logp = knn_log_probs(sqdist, ids, store.values, vocab, self.temperature, store.log_counts)
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
        sqdist, ids = self.datastore.search(queries[rows], self.k)
        knn_logp = knn_log_probs(sqdist, ids, store.values, vocab, self.temperature, store.log_counts)
        out = out.index_copy(0, rows, mix_log_probs(scores[rows], knn_logp, self.lmbda))
        return out.to(scores.dtype)


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
    >>> from hf_realm.knn_generation import KNNDatastore
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
                store = datastore._device_store_for(device)
                for s in range(0, gold.shape[0], 1024):
                    sqdist, ids = datastore.search(queries[s : s + 1024], k)
                    knn_logp = knn_log_probs(
                        sqdist, ids, store.values, lm_scores.shape[-1], temperature, store.log_counts
                    )
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
