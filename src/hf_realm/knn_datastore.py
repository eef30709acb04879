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

    knn_datastore.json   metadata: count, key dim, dtypes, model and tokenizer fingerprints, compression, history,
                         and the size and SHA-256 of every other file (`files`, `sha256`), checked at load
    keys.npy             (num_entries, key_dim) float16       (absent when keys are product-quantised)
    values.npy           (num_entries,) int32                   next-token ids
    provenance.npy       (num_entries, 2) int64                 (example id, target position) of every entry
    counts.npy           (num_entries,) int32, optional         merge counts (greedy merging), used as weights
    projection.npz       optional                               PCA of the keys: queries are projected the same way
    pq.npz               optional                               product quantisation codes and codebooks
    index.faiss          optional                               a trained faiss index (IVF-PQ / flat)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import hub_io
from .checks import _validate_keys
from .fingerprint import _fingerprints_match, model_fingerprint, tokenizer_fingerprint
from .knn_build import (
    DATASTORE_CONFIG_NAME,
    DATASTORE_KIND,
    FORMAT_VERSION,
    _save_npy_chunked,
    _to_numpy,
)
from .search import (
    BackendConfig,
    FaissBackend,
    IVFBackend,
    PQBackend,
    PQCodes,
    PQSearchConfig,
    TorchBackend,
    TorchSearchConfig,
    backend_config,
    pq_decode,
)
from .search.ivf import self_recall, tune_nprobe


logger = logging.getLogger(__name__)


_INDEX_TYPES = ("auto", "torch", "faiss-flat", "faiss-ivfpq", "torch-ivf")

AUTO_IVF_MIN_KEYS = 1 << 25
"""Above this many keys (~33.5M), `build_index("auto")` on a GPU searches with the IVF union scan instead of the exact
search. On the H200 (128-d fp16 keys, 128 queries a step) the exact search took 1.57 ms at 10M keys and 11.9 ms at
100M, the union scan at nprobe 8 2.51 ms and 4.36 ms: the two cross between those sizes (interpolated, near 30M)."""

AUTO_TARGET_RECALL = 0.95
"""The recall@16 that `build_index("auto")` tunes ``nprobe`` to when it chooses the IVF search (see `tune_nprobe`)."""


# ----------------------------------------------------------------------------------------------------------------------
# The datastore.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _DeviceTables:
    """What the kNN maths reads besides the search (values, merge counts, the query projection), moved once to one
    device. The keys live in the search backend."""

    device: torch.device
    values: torch.Tensor  # (n,) int32
    log_counts: torch.Tensor | None  # (n,) fp32
    projection_bias: torch.Tensor | None
    projection_matrix: torch.Tensor | None


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
    >>> from hf_realm.knn_datastore import KNNDatastore
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
        _keys_checked: bool = False,
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
                with np.errstate(over="ignore"):  # overflow to inf is refused below, naming the row
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
        _validate_keys(None if _keys_checked else self.keys, self.pq, self.projection)
        self.metadata = dict(metadata or {})
        self.metadata["num_entries"] = n
        self.metadata["key_dim"] = self.key_dim
        self.metadata["input_dim"] = self.input_dim
        self.metadata["max_value"] = int(self.values.max()) if n else -1
        self.metadata["has_counts"] = self.counts is not None
        self._tables: _DeviceTables | None = None
        # The search: a config (a device-less torch / pq config follows the queries' device) and the backend built
        # from it (rebuilt on another device for those; built once for faiss, whose trained index is saved).
        self.search_config: BackendConfig = PQSearchConfig() if self.pq is not None else TorchSearchConfig()
        self._backend = None
        self._backend_device: torch.device | None = None
        self.index_type = "torch"
        self.index_options: dict[str, Any] = {}
        self.index_recall: dict[str, Any] | None = None  # what build_index measured of an approximate search

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
        """Writes the datastore to ``save_directory``, which must be new, empty or an earlier datastore save (anything
        else is refused before anything is written). The files go to a temporary sibling directory, then
        `knn_datastore.json` (with the size and SHA-256 of every file), then the directory replaces
        ``save_directory`` atomically (`hf_realm.hub_io`)."""
        writer_meta = dict(self.metadata)

        def write(tmp: Path) -> dict:
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
            if isinstance(self._backend, FaissBackend) and self._backend.save(str(tmp / "index.faiss")):
                writer_meta["index"] = {
                    "type": self.index_type,
                    **self.index_options,
                    "config": self.search_config.to_dict(),
                }
            writer_meta.update(
                format_version=FORMAT_VERSION,
                key_dtype="float16" if self.keys is not None else "pq",
                value_dtype="int32",
            )
            return writer_meta

        save_directory = hub_io.save_directory(save_directory, DATASTORE_KIND, write)
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
        verify_hashes: bool = True,
        _keys_checked: bool = False,
    ) -> KNNDatastore:
        """Loads a datastore from a local directory or a Hub repository (arrays memory-mapped by default).

        Every file is checked against the size and SHA-256 recorded at save (``verify_hashes=False``: sizes only, for
        a trusted multi-GB store; hashing streams at about 1.8 GB/s on one CPU core); files named outside the
        directory, truncated, altered or unreadable files raise a `ValueError` naming the file. The keys are then
        scanned for NaN / inf (``_keys_checked``, private: a build loading the store it has just written and checked
        row by row skips the scan)."""
        path, root = hub_io.resolve(
            path_or_repo_id, DATASTORE_KIND, repo_type=repo_type, revision=revision, token=token
        )
        if not (path / DATASTORE_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a kNN datastore: no {DATASTORE_CONFIG_NAME} in it")
        meta = hub_io.read_config(path, DATASTORE_KIND, {"num_entries": int, "key_dim": int})
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"datastore format {meta['format_version']} is newer than this library's {FORMAT_VERSION}"
            )
        manifest = hub_io.Manifest(path, root, meta, DATASTORE_CONFIG_NAME)
        manifest.check_all(verify_hashes)
        n, dim = meta["num_entries"], meta["key_dim"]
        mode = "r" if mmap else None

        def load(name, shape, required=True):
            if not manifest.has(name):
                if required:
                    raise FileNotFoundError(f"{path / name} is missing from the datastore")
                return None
            file = manifest.check(name, verify_hash=False)
            try:
                array = np.load(file, mmap_mode=mode)
            except (ValueError, OSError, EOFError) as err:
                raise ValueError(
                    f"{file} is truncated or corrupt ({err}); rebuild or re-download the datastore"
                ) from err
            if array.shape != shape:
                raise ValueError(f"{file} holds shape {array.shape}, expected {shape} from {DATASTORE_CONFIG_NAME}")
            return array

        def load_npz(name, keys):
            file = manifest.check(name, verify_hash=False)
            try:
                with np.load(file) as z:
                    return {key: z[key] for key in keys}
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
                raise ValueError(
                    f"{file} is truncated or corrupt ({type(err).__name__}: {err}); expected a numpy .npz with arrays "
                    f"{list(keys)}"
                ) from err

        pq = load_npz("pq.npz", ("codes", "codebooks")) if manifest.has("pq.npz") else None
        keys = None if pq is not None else load("keys.npy", (n, dim))
        values = load("values.npy", (n,))
        provenance = load("provenance.npy", (n, 2))
        counts = load("counts.npy", (n,), required=bool(meta.get("has_counts")))
        projection = load_npz("projection.npz", ("matrix", "bias")) if manifest.has("projection.npz") else None
        meta = {k: v for k, v in meta.items() if k not in ("files", "sha256")}  # the manifest is of the saved files
        store = cls(keys, values, provenance, counts, meta, projection=projection, pq=pq, _keys_checked=_keys_checked)
        if load_index and manifest.has("index.faiss"):
            faiss_file = manifest.check("index.faiss", verify_hash=False)
            try:
                store._load_index(faiss_file, meta.get("index", {}))
            except RuntimeError as err:
                raise ValueError(f"cannot read {faiss_file}: not a faiss index or truncated ({err})") from err
        return store

    def push_to_hub(
        self,
        repo_id: str,
        repo_type: str = "dataset",
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload kNN datastore",
        _folder: Path | None = None,
    ) -> str:
        """Uploads the datastore to the Hub (a dataset repository by default). Returns the commit URL."""
        return hub_io.push_folder_to_hub(
            self.save_pretrained,
            repo_id,
            repo_type=repo_type,
            commit_message=commit_message,
            private=private,
            token=token,
            folder=_folder,
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
        self, index_type: str | BackendConfig = "auto", device: str | torch.device | None = None, **options
    ) -> KNNDatastore:
        """Chooses (and for faiss, trains) the search structure.

        Args:
            index_type (`str` or [`~hf_realm.search.BackendConfig`], *optional*, defaults to `"auto"`):
                A search backend config, or a name mapped onto one by [`hf_realm.search.backend_config`]:
                `"torch"`: exact search on ``device`` (keys in fp16 on the GPU, fp32 on the CPU; exact either way: the
                candidates are rescored in float64 from the fp16 keys, see `hf_realm.search.rescore`).
                `"faiss-flat"`: exact faiss search on the CPU. `"faiss-ivfpq"`: approximate, for large stores.
                `"torch-ivf"`: approximate, inverted lists over the keys on ``device`` with exact re-ranking
                ([`~hf_realm.search.IVFSearchConfig`]).
                `"auto"`: on a GPU whose free memory holds the keys (80% of it), `"torch"` up to
                [`AUTO_IVF_MIN_KEYS`] (~33.5M) entries and `"torch-ivf"` with ``scan="union"`` above, its ``nprobe``
                tuned from 8 to a recall@16 of [`AUTO_TARGET_RECALL`] (0.95); on the CPU `"torch"` up to 2M entries;
                `"faiss-ivfpq"` otherwise. Product-quantised stores are searched over their codes (`"torch"` /
                `"auto"`, [`~hf_realm.search.PQSearchConfig`]). When the search is `"torch-ivf"` its recall is
                measured and kept in ``index_recall`` (and logged).
            device (`str` or `torch.device`, *optional*):
                Device of the torch search (default: CUDA when available).
            options:
                faiss-ivfpq: `nlist` (default `4 * sqrt(n)`), `m` (sub-quantisers, default `key_dim / 8`), `nbits`
                (8), `nprobe` (32), `rerank` (re-score `rerank * k` candidates exactly from the stored keys; 0 = off,
                default 4), `train_size` (entries used to train, default 256 * nlist).
                torch-ivf: the fields of [`~hf_realm.search.IVFSearchConfig`] (`nlist`, `nprobe`, `rerank`, ...), and
                `target_recall`: double `nprobe` until the recall@16 of 256 stored keys used as queries (own entry
                left out; [`~hf_realm.search.ivf.self_recall`]) reaches it, up to 128 lists (default: no tuning;
                the recall is measured either way).

        Example (an IVF search tuned to a recall, on the CPU):

        ```python
        >>> import numpy as np
        >>> from hf_realm import KNNDatastore
        >>> rng = np.random.default_rng(0)
        >>> centres = rng.normal(size=(50, 16)) * 4
        >>> keys = (centres[rng.integers(0, 50, 5000)] + rng.normal(size=(5000, 16))).astype(np.float16)
        >>> store = KNNDatastore(keys=keys, values=rng.integers(0, 100, 5000).astype(np.int32))
        >>> store = store.build_index("torch-ivf", device="cpu", nlist=50, nprobe=1, target_recall=0.95)
        >>> store.index_recall["recall"] >= 0.95
        True
        ```
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        options = dict(options)
        target_recall = options.pop("target_recall", None)
        if isinstance(index_type, BackendConfig):
            if target_recall is not None and index_type.name != "torch-ivf":
                raise ValueError(f"target_recall applies to a torch-ivf search, got {index_type.name!r}")
            config, name, options = backend_config(index_type, **options), index_type.name, {}
        else:
            if index_type not in _INDEX_TYPES:
                raise ValueError(
                    f"index_type must be one of {_INDEX_TYPES} or a search backend config, got {index_type!r}"
                )
            name = _auto_index_name(self, device) if index_type == "auto" else index_type
            if self.pq is not None and name != "torch":
                raise ValueError(f"a product-quantised datastore is searched with index_type='torch', got {name!r}")
            if target_recall is not None and name != "torch-ivf":
                raise ValueError(f"target_recall applies to index_type='torch-ivf', got {name!r}")
            if name == "faiss-ivfpq":
                options.setdefault("rerank", 4)
            if name == "torch-ivf":
                options.setdefault("device", device)
                if index_type == "auto":
                    options.setdefault("scan", "union")
                    options.setdefault("nprobe", 8)
                    target_recall = AUTO_TARGET_RECALL if target_recall is None else target_recall
            config = self._config_from_name(name, options)
        if self.pq is not None and not isinstance(config, PQSearchConfig):
            raise ValueError(
                f"a product-quantised datastore is searched over its codes (PQSearchConfig), got {name!r}"
            )
        self.index_type, self.index_options = name, options
        self.search_config = config
        self._backend = self._backend_device = None
        self.index_recall = None
        if not _follows_queries(config):
            self._backend = config.build(self._search_keys(), metric="l2")
        if isinstance(self._backend, IVFBackend) and len(self) > 1:
            self._measure_ivf_recall(target_recall)
        self.to(device, keys_on_device=_follows_queries(config))
        return self

    def _measure_ivf_recall(self, target: float | None) -> None:
        """Measures (and with a ``target``, tunes ``nprobe`` for) the IVF search's recall, keeps it in
        ``index_recall`` and logs it."""
        backend = self._backend
        if target is not None:
            found = tune_nprobe(backend, target=target, k=16)
            self.search_config = backend.config
            self.index_options = {**self.index_options, "nprobe": backend.nprobe}
        else:
            found = {"nprobe": backend.nprobe, "recall": self_recall(backend, k=16), "k": 16, "target": None}
        found["k"] = min(16, len(self) - 1)
        found["queries"] = min(256, len(self))
        found["measured_on"] = "stored keys as queries, each one's own entry left out"
        self.index_recall = found
        level = logging.WARNING if target is not None and found["recall"] < target else logging.INFO
        logger.log(level, "torch-ivf search: %d lists, nprobe %d, recall@%d %.3f against exact search (%d stored keys "
                   "as queries)%s", backend.nlist, backend.nprobe, found["k"], found["recall"], found["queries"],
                   f"; below the target {target} at the largest nprobe tried" if level == logging.WARNING else "")  # fmt: skip

    def _config_from_name(self, name: str, options: dict) -> BackendConfig:
        if self.pq is not None and name == "torch":
            return PQSearchConfig()
        return backend_config(name, num_keys=len(self), dim=self.key_dim, **options)

    def _load_index(self, file: Path, index_meta: dict) -> None:
        """Reuses a saved faiss index (``index_meta``: the ``index`` entry of the metadata)."""
        index_meta = dict(index_meta)
        config = index_meta.pop("config", None)
        self.index_type = index_meta.pop("type", "faiss-ivfpq")
        self.index_options = index_meta
        self.search_config = backend_config(config) if config else self._config_from_name(self.index_type, index_meta)
        self._backend = self.search_config.build(self._search_keys(), metric="l2", state=str(file))
        self._backend_device = None

    def _search_keys(self):
        return PQCodes(self.pq["codes"], self.pq["codebooks"]) if self.pq is not None else self.keys

    def _search_backend(self, device: torch.device):
        if self._backend is None or (_follows_queries(self.search_config) and self._backend_device != device):
            config = self.search_config
            if _follows_queries(config):
                config = dataclasses.replace(config, device=device)
            self._backend = config.build(self._search_keys(), metric="l2")
            self._backend_device = device
        return self._backend

    def to(self, device: str | torch.device, keys_on_device: bool = True) -> KNNDatastore:
        """Moves the search structures (keys or PQ codes, key norms, values, counts) to ``device``; a no-op when
        already there. A faiss index stays where it was built; ``keys_on_device=False`` moves only the tables."""
        device = _as_device(device)
        if self._tables is None or self._tables.device != device:
            values = torch.from_numpy(np.array(self.values)).to(device)
            log_counts = None
            if self.counts is not None:
                log_counts = torch.from_numpy(self.counts.astype(np.float32)).to(device).log()
            bias = matrix = None
            if self.projection is not None:
                bias = torch.from_numpy(self.projection["bias"]).to(device)
                matrix = torch.from_numpy(self.projection["matrix"]).to(device)
            self._tables = _DeviceTables(device, values, log_counts, bias, matrix)
        if keys_on_device and _follows_queries(self.search_config):
            self._search_backend(device)
        return self

    def _tables_for(self, device: torch.device) -> _DeviceTables:
        device = _as_device(device)
        if self._tables is None or self._tables.device != device:
            self.to(device, keys_on_device=False)
        return self._tables

    def lookup_tables(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values, log_counts)`` of all entries on ``device`` (int32 next tokens; float32 log merge counts, `None`
        without counts): what [`~hf_realm.knn_generation.knn_log_probs`] indexes with the ids of a search. Moved once
        and cached."""
        tables = self._tables_for(device)
        return tables.values, tables.log_counts

    def reconstruct(self, start: int, stop: int, device: str | torch.device | None = None) -> torch.Tensor:
        """Keys ``start .. stop - 1`` in key space as float32 on ``device`` (decoded for product-quantised stores)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"entries [{start}, {stop}) out of range for {len(self)} entries")
        device = _as_device(device or "cpu")
        if self.pq is not None:
            codes = torch.from_numpy(np.asarray(self.pq["codes"][start:stop])).to(device)
            return pq_decode(codes, torch.from_numpy(self.pq["codebooks"]).to(device))
        return torch.from_numpy(np.asarray(self.keys[start:stop], dtype=np.float32)).to(device)

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """Maps model states (`input_dim`) to key space (`key_dim`), float32."""
        queries = queries.float()
        if queries.shape[-1] != self.input_dim:
            raise ValueError(f"query dim {queries.shape[-1]} != datastore input dim {self.input_dim}")
        tables = self._tables_for(queries.device)
        if tables.projection_matrix is not None:
            queries = torch.addmm(tables.projection_bias, queries, tables.projection_matrix)
        return queries

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        projected: bool = False,
        check_finite: bool = True,
        check_found: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest entries of every query, by squared L2 distance.

        Args:
            queries (`torch.Tensor` of shape `(num_queries, input_dim)`):
                Model states (any float dtype, any device; results come back on the same device).
            k (`int`):
                Neighbours per query, `1 <= k <= len(self)`.
            projected (`bool`, *optional*, defaults to `False`):
                Whether ``queries`` are already in key space (see [`KNNDatastore.project`]).
            check_finite (`bool`, *optional*, defaults to `True`):
                Raise on NaN/inf queries (a host sync on GPUs). [`KNNLogitsProcessor`] turns it off: it flags them on
                the device and checks every few steps.
            check_found (`bool`, *optional*, defaults to `True`):
                Raise when an approximate index finds fewer than ``k`` entries for a query (a host sync on GPUs).
                With `False` such slots hold id `-1`: [`KNNLogitsProcessor`] flags them on the device and raises at its
                next check.

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: squared distances (float32, ascending) and entry ids (int64), each
            `(num_queries, k)`. With the torch index (and over PQ codes) the search is exact: the ids and order of a
            float64 search over the stored keys (ties by the smaller id), distances computed in float64 and rounded
            to float32, on the GPU too (fp16 candidates are rescored). An approximate faiss index that finds fewer
            than ``k`` entries raises.
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the datastore size), got {k}")
        if queries.dim() != 2:
            raise ValueError(f"queries must be 2-d (num_queries, dim), got shape {tuple(queries.shape)}")
        if check_finite:
            rows_ok = torch.isfinite(queries).all(dim=1)
            if not bool(rows_ok.all()):
                bad = (~rows_ok).nonzero()[:, 0]
                raise ValueError(
                    f"{bad.numel()} of {queries.shape[0]} queries hold NaN or inf, the first is row {int(bad[0])}"
                )
        q = queries.float() if projected else self.project(queries)
        if q.shape[-1] != self.key_dim:
            raise ValueError(f"query dim {q.shape[-1]} != datastore key dim {self.key_dim}")
        backend = self._search_backend(_as_device(q.device))
        sqdist, ids = backend.search(q, int(k))
        if check_found and _may_miss(backend) and bool((ids < 0).any()):
            raise self._missing_error(q.device, k)
        return sqdist.to(q.device), ids.to(q.device)

    def _may_miss(self, device: torch.device) -> bool:
        """Whether the index searched on ``device`` is approximate (may find fewer than ``k`` entries)."""
        return _may_miss(self._search_backend(_as_device(device)))

    def _missing_error(self, device: torch.device, k: int) -> RuntimeError:
        backend = self._search_backend(_as_device(device))
        nprobe = getattr(backend, "nprobe", None)
        if nprobe is None:
            nprobe = (getattr(backend.config, "search_params", None) or {}).get("nprobe")
        return RuntimeError(
            f"the {type(backend).__name__} index returned fewer than {k} neighbours for some queries; raise nprobe "
            f"(now {nprobe}) or lower k"
        )

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
        dataset, whole batches of ``batch_size`` rows, into its own directory and the main process merges them in
        order; all ranks return the merged store. Each batch holds the rows the one-process build batches
        together, so on the same device, dtype and thread count the keys are that build's to the bit.

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
        >>> from hf_realm.knn_datastore import KNNDatastore
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
        >>> data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6]]})
        >>> store = KNNDatastore.build(model, data, tempfile.mkdtemp() + "/ds", progress=False)
        >>> len(store), store.values.tolist()
        (4, [2, 3, 4, 6])
        ```
        """
        from .knn_build import build_datastore

        return build_datastore(
            cls, model, dataset, save_directory, tokenizer=tokenizer, source_column=source_column,
            target_column=target_column, text_column=text_column, batch_size=batch_size, max_length=max_length,
            accelerator=accelerator, model_name_or_path=model_name_or_path, progress=progress,
        )  # fmt: skip

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


def _may_miss(backend) -> bool:
    return not isinstance(backend, (TorchBackend, PQBackend))  # exact backends always find k


def _as_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _follows_queries(config: BackendConfig) -> bool:
    """Whether the backend is built on the queries' device (a torch / pq config without a device of its own)."""
    return isinstance(config, (TorchSearchConfig, PQSearchConfig)) and config.device is None


def _auto_index_name(store: KNNDatastore, device: torch.device) -> str:
    """What `"auto"` searches ``store`` with on ``device`` (see [`auto_index_name`])."""
    if store.pq is not None:
        return "torch"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return auto_index_name(len(store), store.keys.nbytes, device.type, free)


def auto_index_name(num_keys: int, key_bytes: int, device_type: str, free_bytes: int | None = None) -> str:
    """The search `build_index("auto")` chooses for ``num_keys`` fp16 keys of ``key_bytes`` on a ``device_type``
    device with ``free_bytes`` free: on a GPU the keys must fit in 80% of its free memory, then `"torch"` (exact) up
    to [`AUTO_IVF_MIN_KEYS`] keys and `"torch-ivf"` above; on the CPU `"torch"` up to 2M keys; else `"faiss-ivfpq"`.

    Example:

    ```python
    >>> from hf_realm.knn_datastore import auto_index_name
    >>> auto_index_name(10_000_000, 10_000_000 * 256, "cuda", free_bytes=100 * 2**30)
    'torch'
    >>> auto_index_name(100_000_000, 100_000_000 * 256, "cuda", free_bytes=100 * 2**30)
    'torch-ivf'
    >>> auto_index_name(3_000_000, 3_000_000 * 256, "cpu")
    'faiss-ivfpq'
    ```
    """
    if device_type == "cuda":
        if free_bytes is None or key_bytes >= 0.8 * free_bytes:
            return "faiss-ivfpq"
        return "torch-ivf" if num_keys > AUTO_IVF_MIN_KEYS else "torch"
    return "torch" if num_keys <= 2_000_000 else "faiss-ivfpq"
