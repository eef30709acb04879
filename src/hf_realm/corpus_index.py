"""REALM's knowledge corpus with its cached doc embeddings and a maximum inner product search (MIPS) over them.

[`RealmBlockIndex`]: a corpus (from [`~hf_realm.corpus.build_corpus`]) + its embeddings (from
[`~hf_realm.embedding.embed_corpus`]) + a search backend of `hf_realm.search` behind one API, ``search(query_embeddings,
k) -> (scores, block_ids)``; the one refresh path ([`RealmBlockIndex.refresh`]); `save_pretrained` / `from_pretrained`
/ `push_to_hub` through `hf_realm.hub_io`; and an import of transformers 4.x `RealmForOpenQA` checkpoints
(`hf_realm.legacy_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from . import hub_io
from .checks import check_block_ids, check_embeddings
from .corpus import CorpusTokens, build_corpus
from .embedding import _embedder_name, embed_corpus
from .fingerprint import embedder_fingerprint
from .search import (
    BackendConfig,
    FaissBackend,
    FaissSearchConfig,
    TorchBackend,
    TorchSearchConfig,
    import_faiss,
    shard_range,
    sharded_search,
)
from .search.backends import config_from_options


logger = logging.getLogger(__name__)

INDEX_CONFIG_NAME = "index_config.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
CORPUS_DIR = "corpus"
FAISS_INDEX_NAME = "faiss.index"
FORMAT_VERSION = 1
# Everything an index save writes, and `refresh_state.json`, which `IndexRefreshCallback` adds beside it.
INDEX_KIND = hub_io.DirectoryKind(
    "RealmBlockIndex",
    INDEX_CONFIG_NAME,
    frozenset({INDEX_CONFIG_NAME, EMBEDDINGS_NAME, CORPUS_DIR, FAISS_INDEX_NAME, "refresh_state.json"}),
    hint="index",
)
_DATASETS_INDEX_NAME = "embeddings"  # the name of the faiss index attached to `index.corpus` for `datasets`' own API


@dataclass
class _IndexState:
    embeddings: torch.Tensor
    backend: object
    embedder_name: str | None
    embedder_hash: str | None
    built_at: float


# ----------------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------------


class RealmBlockIndex:
    r"""
    REALM's knowledge corpus with its cached doc embeddings and a maximum inner product search over them.

    One API over the search backends of [`hf_realm.search`]: ``search(query_embeddings, k) -> (scores, block_ids)``.
    ``backend`` is a backend config ([`~hf_realm.search.TorchSearchConfig`],
    [`~hf_realm.search.FaissSearchConfig`], ...) or one of these names, which map onto them:

    - `"faiss"`: a faiss index ([`~hf_realm.search.FaissSearchConfig`]), also attached to the corpus dataset through
      `datasets`' public FAISS API (so ``index.corpus.get_nearest_examples_batch("embeddings", queries, k)`` works
      too). ``index_factory="Flat"`` (the default) is exact `IndexFlatIP`; any faiss index-factory string
      (``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``) gives an approximate index, trained on a random sample,
      whose recall [`~RealmBlockIndex.evaluate_recall`] measures against exact search. ``search_params`` (e.g.
      ``{"nprobe": 32}``) are set through faiss' `ParameterSpace`.
    - `"faiss-gpu"`: the same on a GPU (needs `faiss-gpu-cu12`).
    - `"torch"`: exact search ([`~hf_realm.search.TorchSearchConfig`]), the embeddings resident on ``device`` (fp16
      on GPU; the fused Triton kernel when Triton is installed). *Exact* means: the ids and order of a float64 search
      over the fp32 embeddings (ties by the smaller block id), whatever the storage dtype: the candidates of the fp16
      pass are rescored in float64 from the fp32 embeddings (see `hf_realm.search.rescore`).
    - `"auto"` (default): `"torch"` when a GPU is present, else `"faiss"` (flat) when faiss is installed, else `"torch"`
      on the CPU.

    Scores are inner products (float32); block ids are int64 row numbers of ``corpus``. ``k`` larger than the number of
    blocks is an error (never clamped silently). An approximate faiss index that finds fewer than ``k`` blocks pads with
    id ``-1`` and score ``-inf``.

    Args:
        corpus (`datasets.Dataset`):
            Blocks in block-id order (from [`build_corpus`]; `text`, `title`, `doc_id`, `input_ids` columns are used
            when present). A `block_id` column must be `0..n-1` in row order (duplicates or gaps raise).
        embeddings (`torch.Tensor` or `np.ndarray` of shape `(num_blocks, dim)`):
            Doc embeddings, row ``i`` for block ``i``.
        backend (`str` or [`~hf_realm.search.BackendConfig`], *optional*, defaults to `"auto"`): See above. With a
            config object, the options below stay unset (they are the config's fields).
        index_factory (`str`, *optional*, defaults to `"Flat"`): faiss index-factory string (faiss backends).
        search_params (`dict`, *optional*): faiss search-time parameters (`nprobe`, `efSearch`, ...).
        device (`str`, `int` or `torch.device`, *optional*):
            Torch backend: where the embeddings live (default: CUDA if available). faiss-gpu: the GPU id (default 0).
        search_dtype (`torch.dtype`, *optional*): Torch backend dtype (default fp16 on GPU, fp32 on CPU).
        train_size (`int`, *optional*): Vectors sampled to train an approximate faiss index (default 262,144).
        embedder_name (`str`, *optional*) and embedder_hash (`str`, *optional*):
            Which embedder produced the embeddings (see [`embedder_fingerprint`]), kept in the saved metadata.

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm.corpus_index import RealmBlockIndex
    >>> corpus = datasets.Dataset.from_dict({"text": ["paris is in france", "rome is in italy", "berlin"]})
    >>> index = RealmBlockIndex(corpus, torch.eye(3), backend="torch")
    >>> scores, block_ids = index.search(torch.tensor([[0.1, 0.9, 0.0]]), k=2)
    >>> block_ids.tolist(), index.get_blocks(block_ids[0])["text"]
    ([[1, 0]], ['rome is in italy', 'paris is in france'])
    ```
    """

    def __init__(
        self,
        corpus,
        embeddings: torch.Tensor | np.ndarray,
        *,
        backend: str | BackendConfig = "auto",
        index_factory: str = "Flat",
        search_params: dict | None = None,
        device: str | int | torch.device | None = None,
        search_dtype: torch.dtype | None = None,
        train_size: int | None = None,
        embedder_name: str | None = None,
        embedder_hash: str | None = None,
        _faiss_index=None,
    ):
        self.search_config = config_from_options(
            backend, index_factory=index_factory, search_params=search_params, device=device,
            search_dtype=search_dtype, train_size=train_size,
        )  # fmt: skip
        if len(corpus) == 0:
            raise ValueError("the corpus is empty: no blocks")
        if corpus._indices is not None:
            corpus = corpus.flatten_indices()
        check_block_ids(corpus)
        self.corpus = corpus
        self.device = device
        self.search_dtype = search_dtype
        self.train_size = train_size
        self._tokens: CorpusTokens | None = None
        self._lock = threading.Lock()
        self._state = self._build_state(
            check_embeddings(embeddings, len(corpus)), embedder_name, embedder_hash, _faiss_index
        )
        self._expose_faiss_index()

    # -- construction ---------------------------------------------------------------------------------------------

    def _build_state(self, embeddings, embedder_name, embedder_hash, faiss_index=None) -> _IndexState:
        # The host copy is the source of truth: the torch backend rescores its fp16 candidates from it, the faiss
        # backend is built from it. A new backend per build: the old one keeps serving until the swap.
        embeddings = embeddings.cpu()
        backend = self.search_config.build(embeddings, metric="inner_product", state=faiss_index)
        return _IndexState(embeddings, backend, embedder_name, embedder_hash, time.time())

    @property
    def backend(self):
        """The serving [`~hf_realm.search.SearchBackend`] (replaced as a whole by each refresh)."""
        return self._state.backend

    @property
    def backend_name(self) -> str:
        """The backend's name: `"torch"`, `"faiss"`, `"faiss-gpu"` or a registered config's name."""
        config = self.search_config
        if isinstance(config, FaissSearchConfig) and config.gpu is not None:
            return "faiss-gpu"
        return config.name

    @property
    def index_factory(self) -> str:
        return getattr(self.search_config, "index_factory", "Flat")

    @property
    def search_params(self) -> dict:
        return dict(getattr(self.search_config, "search_params", None) or {})

    @classmethod
    def build(
        cls,
        corpus,
        embedder,
        *,
        batch_size: int = 512,
        embed_kwargs: dict | None = None,
        **index_kwargs,
    ) -> RealmBlockIndex:
        """Embed ``corpus`` with ``embedder`` ([`embed_corpus`]) and index it; the embedder's name and weights hash are
        recorded. ``index_kwargs`` go to the constructor (``backend``, ``index_factory``, ...)."""
        embeddings = embed_corpus(embedder, corpus, batch_size=batch_size, **(embed_kwargs or {}))
        return cls(
            corpus,
            embeddings,
            embedder_name=_embedder_name(embedder),
            embedder_hash=embedder_fingerprint(embedder),
            **index_kwargs,
        )

    # -- properties -----------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._state.embeddings.shape[0]

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def dim(self) -> int:
        return self._state.embeddings.shape[1]

    @property
    def embeddings(self) -> torch.Tensor:
        """The cached doc embeddings (CPU), row ``i`` for block ``i``."""
        return self._state.embeddings

    @property
    def embedder_hash(self) -> str | None:
        return self._state.embedder_hash

    @property
    def embedder_name(self) -> str | None:
        return self._state.embedder_name

    @property
    def built_at(self) -> float:
        """`time.time()` when the serving embeddings were swapped in."""
        return self._state.built_at

    @property
    def tokens(self) -> CorpusTokens:
        """The corpus' token ids as flat arrays (built on first use)."""
        if self._tokens is None:
            self._tokens = CorpusTokens.from_dataset(self.corpus)
        return self._tokens

    @property
    def doc_ids(self) -> np.ndarray:
        """`doc_id` of every block (to drop trivial retrievals); block ids when the corpus has no `doc_id` column."""
        if "doc_id" in self.corpus.column_names:
            return np.asarray(self.corpus.data.column("doc_id").to_numpy(), dtype=np.int64)
        return np.arange(self.num_blocks, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"RealmBlockIndex(num_blocks={self.num_blocks}, dim={self.dim}, backend={self.backend_name!r}, "
            f"index_factory={self.index_factory!r}, embedder_name={self.embedder_name!r})"
        )

    # -- search ---------------------------------------------------------------------------------------------------

    def _check_queries(self, query_embeddings, k: int) -> torch.Tensor:
        if isinstance(query_embeddings, np.ndarray):
            query_embeddings = torch.from_numpy(query_embeddings)
        if not torch.is_tensor(query_embeddings):
            raise TypeError(f"query embeddings must be a torch.Tensor or numpy array, got {type(query_embeddings)}")
        if not query_embeddings.is_floating_point():
            raise TypeError(f"query embeddings must be floating point, got {query_embeddings.dtype}")
        if query_embeddings.dim() != 2:
            raise ValueError(f"query embeddings must be (num_queries, dim), got shape {tuple(query_embeddings.shape)}")
        if query_embeddings.shape[1] != self.dim:
            raise ValueError(f"query dim {query_embeddings.shape[1]} != index dim {self.dim}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= self.num_blocks:
            raise ValueError(f"k must be in [1, {self.num_blocks}] (the number of blocks), got {k}")
        if not bool(torch.isfinite(query_embeddings).all()):
            raise ValueError("query embeddings contain NaN or inf")
        return query_embeddings

    def search(self, query_embeddings, k: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
        """The ``k`` blocks with the largest inner product per query, best first.

        Args:
            query_embeddings (`torch.Tensor` or `np.ndarray` of shape `(num_queries, dim)`): Floating point, finite.
            k (`int`): ``1 <= k <= num_blocks``.

        Returns:
            `(scores, block_ids)`: float32 and int64, `(num_queries, k)`; torch tensors on the queries' device for torch
            input, numpy arrays for numpy input.
        """
        as_numpy = isinstance(query_embeddings, np.ndarray)
        queries = self._check_queries(query_embeddings, k)
        if queries.shape[0] == 0:
            scores, ids = torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        else:
            state = self._state  # one read: a concurrent refresh swaps the whole state at once
            scores, ids = state.backend.search(queries, int(k))
        if as_numpy:
            return scores.cpu().numpy(), ids.cpu().numpy()
        return scores.to(queries.device), ids.to(queries.device)

    def exact_search(self, query_embeddings, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search (the reference for recall): the ids and order of a float64 search over the embeddings, scores
        rounded to float32. Runs on the serving backend when it is the exact torch backend, else on the CPU."""
        queries = self._check_queries(query_embeddings, k)
        backend = self._state.backend
        if not (isinstance(backend, TorchBackend) and backend.rescore):
            backend = TorchSearchConfig(device="cpu", dtype=torch.float32).build(self._state.embeddings.float())
        return backend.search(queries, int(k))

    def evaluate_recall(self, query_embeddings, k: int, tie_tolerance: float = 1e-5) -> float:
        """recall@k against exact search: the fraction of returned blocks that belong to the exact top-``k``.

        A returned block counts when its exact score (float64) is at least the exact ``k``-th score minus
        ``tie_tolerance * max(1, |k-th score|)``: blocks whose scores tie the ``k``-th to within fp32 rounding may be
        returned by any exact search. Exact backends give 1.0; approximate faiss indexes give their measured recall.
        """
        queries = torch.as_tensor(query_embeddings)
        _, ids = self.search(queries, k)
        ref_scores, _ = self.exact_search(queries, k)
        keys = self._state.embeddings
        q = queries.detach().cpu().double()
        ids = ids.cpu()
        valid = ids >= 0
        got = (keys[ids.clamp(min=0)].double() * q[:, None, :]).sum(-1)
        kth = ref_scores[:, -1].cpu().double()
        threshold = kth - tie_tolerance * kth.abs().clamp(min=1.0)
        hits = (got >= threshold[:, None]) & valid
        return float(hits.double().mean())

    # -- blocks ---------------------------------------------------------------------------------------------------

    def get_blocks(self, block_ids) -> dict[str, list]:
        """The corpus rows of ``block_ids`` (any shape is flattened), as a dict of columns in that order."""
        ids = np.asarray(torch.as_tensor(block_ids).cpu()).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise IndexError(f"block ids must be in [0, {self.num_blocks}), got range [{ids.min()}, {ids.max()}]")
        return self.corpus[ids.tolist()] if ids.size else {name: [] for name in self.corpus.column_names}

    def block_inputs(
        self, block_ids, *, pad_token_id: int = 0, max_length: int | None = None, device=None
    ) -> dict[str, torch.Tensor]:
        """Padded `input_ids` / `attention_mask` / `token_type_ids` of ``block_ids`` (shape `(*block_ids.shape, L)`),
        e.g. to re-embed retrieved candidates with the current doc encoder."""
        ids = torch.as_tensor(block_ids)
        shape = tuple(ids.shape)
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_blocks):
            raise IndexError(f"block ids must be in [0, {self.num_blocks}), got range [{flat.min()}, {flat.max()}]")
        arrays = self.tokens.batch(flat, pad_token_id, max_length=max_length)
        return {k: torch.from_numpy(v).reshape(*shape, -1).to(device or "cpu") for k, v in arrays.items()}

    # -- refresh --------------------------------------------------------------------------------------------------

    def update_embeddings(
        self, embeddings, *, embedder_name: str | None = None, embedder_hash: str | None = None
    ) -> None:
        """Swap in new embeddings (same corpus): the new search structure is built first, then replaces the old one in
        a single assignment; on any error the old index keeps serving unchanged."""
        embeddings = check_embeddings(embeddings, self.num_blocks)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"new embedding dim {embeddings.shape[1]} != index dim {self.dim}")
        with self._lock:
            self._state = self._build_state(embeddings, embedder_name, embedder_hash)
            self._expose_faiss_index()

    def _expose_faiss_index(self) -> None:
        # `datasets`' own API on the corpus (get_nearest_examples_batch("embeddings", ...)) sees the serving index,
        # attached through `datasets`' public API: adding no vectors to a `custom_index` wraps the filled index as is,
        # and replaces the previous one in a single assignment.
        backend = self._state.backend
        if isinstance(backend, FaissBackend):
            self.corpus.add_faiss_index_from_external_arrays(
                np.empty((0, backend.dim), dtype=np.float32), _DATASETS_INDEX_NAME, custom_index=backend.faiss_index
            )
        elif _DATASETS_INDEX_NAME in self.corpus.list_indexes():
            self.corpus.drop_index(_DATASETS_INDEX_NAME)

    def refresh(self, embedder, *, background: bool = False, **embed_kwargs) -> float | Future:
        """Re-embed the whole corpus with ``embedder`` ([`embed_corpus`]) and swap the result in
        ([`~RealmBlockIndex.update_embeddings`]): the one refresh path, which [`IndexRefreshCallback`] uses too.

        Args:
            embedder (`torch.nn.Module`): The current doc encoder.
            background (`bool`, *optional*, defaults to `False`):
                `False`: embed now (sharded over the processes under `accelerate`, gathered, so every process gets the
                same index), swap, and return the seconds it took. `True`: a frozen copy of ``embedder`` (taken now)
                embeds the corpus on a daemon thread while the caller goes on; each process embeds the whole corpus
                on its own (no collective calls off the main thread). The new embeddings are swapped in, in one
                assignment, as soon as they are ready; returns a `concurrent.futures.Future` whose result is the
                seconds it took, or the error that stopped it (then nothing was swapped in).
            embed_kwargs: Passed to [`embed_corpus`] (``batch_size``, ``dtype``, ``show_progress``, ...).

        On any error the old embeddings keep serving.
        """
        embed_kwargs.setdefault("output_device", "cpu")
        if not background:
            return self._refresh_now(embedder, embed_kwargs)
        # The copy freezes the doc encoder as it is now; training keeps updating the original.
        snapshot = copy.deepcopy(embedder).eval().requires_grad_(False)
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def work():
            try:
                future.set_result(self._refresh_now(snapshot, {**embed_kwargs, "shard": False}))
            except BaseException as err:  # reported through the future
                future.set_exception(err)

        threading.Thread(target=work, name="realm-index-refresh", daemon=True).start()
        return future

    def _refresh_now(self, embedder, embed_kwargs: dict) -> float:
        start = time.perf_counter()
        embeddings = embed_corpus(embedder, self.tokens, **embed_kwargs)
        self.update_embeddings(
            embeddings, embedder_name=_embedder_name(embedder), embedder_hash=embedder_fingerprint(embedder)
        )
        return time.perf_counter() - start

    # -- persistence ----------------------------------------------------------------------------------------------

    def _metadata(self) -> dict:
        from . import __version__

        state = self._state
        return {
            "format_version": FORMAT_VERSION,
            "count": self.num_blocks,
            "dim": self.dim,
            "metric": "inner_product",
            "backend": self.backend_name,
            "index_factory": self.index_factory,
            "search_params": self.search_params,
            "embeddings_dtype": str(state.embeddings.dtype).replace("torch.", ""),
            "embedder_name": state.embedder_name,
            "embedder_hash": state.embedder_hash,
            "hf_realm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.built_at)),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the index to ``save_directory``: `corpus/` (`datasets` arrow), `embeddings.safetensors`, `faiss.index`
        (trained approximate faiss indexes only; flat indexes are rebuilt from the embeddings) and `index_config.json`
        (dim, metric, count, backend, embedder name and weights hash, hf_realm version, and the size and SHA-256 of
        every file).

        ``save_directory`` must be new, empty or an earlier index save: a directory holding anything else (a model, a
        project) is refused before anything is written. The files are written to a temporary sibling directory that
        then replaces ``save_directory`` atomically (see `hf_realm.hub_io`): an interrupted save leaves the previous
        index in place.
        """
        from safetensors.torch import save_file

        state = self._state
        meta = self._metadata()

        def write(tmp):
            _without_indexes(self.corpus).save_to_disk(os.path.join(tmp, CORPUS_DIR))
            save_file({"embeddings": state.embeddings.contiguous()}, os.path.join(tmp, EMBEDDINGS_NAME))
            if self.index_factory != "Flat":
                state.backend.save(os.path.join(tmp, FAISS_INDEX_NAME))  # trained approximate indexes only
            return meta

        hub_io.save_directory(save_directory, INDEX_KIND, write)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        embedder=None,
        backend: str | None = None,
        device=None,
        search_params: dict | None = None,
        search_dtype: torch.dtype | None = None,
        repo_type: str = "dataset",
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        verify_hashes: bool = True,
    ) -> RealmBlockIndex:
        """Load an index written by [`~RealmBlockIndex.save_pretrained`] from a directory or a Hub repo.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): Local directory, or Hub repo id (downloaded with
                `snapshot_download`).
            embedder (`torch.nn.Module`, *optional*):
                The embedder that will query this index: a different weights hash warns; a different output size
                (`config.retriever_proj_size`) is an error.
            backend (`str`, *optional*): Override the saved backend (e.g. `"torch"` to search on a GPU).
            device, search_params, search_dtype: As in the constructor.
            repo_type, subfolder, revision, token, cache_dir: Hub options.
            verify_hashes (`bool`, *optional*, defaults to `True`):
                Check every file against the SHA-256 recorded at save (streamed, about 1.8 GB/s on one CPU core);
                `False` checks the sizes only.

        Raises:
            `ValueError` when files are missing, truncated, altered, named outside the directory, or disagree on the
            number of blocks or the dimension; `FileNotFoundError` for a path that is neither a directory nor a Hub
            repo.
        """
        from safetensors import safe_open

        path, root = hub_io.resolve(
            path_or_repo_id,
            INDEX_KIND,
            repo_type=repo_type,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
        )
        if not (path / INDEX_CONFIG_NAME).is_file():
            raise ValueError(f"{path} has no {INDEX_CONFIG_NAME}: not a RealmBlockIndex directory")
        meta = hub_io.read_config(path, INDEX_KIND, {"count": int, "dim": int, "backend": str})
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"index format {meta['format_version']} is newer than this hf_realm ({FORMAT_VERSION})")
        count, dim = meta["count"], meta["dim"]
        manifest = hub_io.Manifest(path, root, meta, INDEX_CONFIG_NAME)  # every recorded name stays inside `path`
        if embedder is not None:
            _check_embedder(embedder, dim, meta.get("embedder_hash"))

        embeddings_file = manifest.check(EMBEDDINGS_NAME, verify_hashes)
        try:
            with safe_open(str(embeddings_file), framework="pt") as f:
                embeddings = f.get_tensor("embeddings")
        except Exception as err:
            raise ValueError(f"cannot read {embeddings_file}: {err}") from err
        if tuple(embeddings.shape) != (count, dim):
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}, index_config.json says ({count}, {dim})"
            )
        import datasets

        # The corpus is read before its files are checked, so that a corpus from another index is reported as such;
        # `dataset_files` has already kept every name it reads inside `path`.
        corpus_files = hub_io.dataset_files(manifest, CORPUS_DIR)
        try:
            corpus = datasets.load_from_disk(str(manifest.path(CORPUS_DIR)))
        except Exception as err:
            for name in corpus_files:  # a truncated or altered file is named
                manifest.check(name, verify_hashes)
            arrow = ", ".join(str(manifest.path(name)) for name in corpus_files if name.endswith(".arrow"))
            raise ValueError(
                f"cannot read the corpus {arrow} "
                f"({type(err).__name__}: {err}); expected the `datasets` Arrow files written by "
                "RealmBlockIndex.save_pretrained (truncated?)"
            ) from err
        if len(corpus) != count:
            raise ValueError(f"the corpus has {len(corpus)} blocks but the index holds {count}: from another corpus?")
        for name in corpus_files:
            manifest.check(name, verify_hashes)
        manifest.check_all(verify_hashes)  # anything else recorded: the directory is as saved

        faiss_index = None
        backend = backend or meta["backend"]
        if backend in ("faiss", "faiss-gpu") and manifest.has(FAISS_INDEX_NAME):
            faiss_file = manifest.check(FAISS_INDEX_NAME, verify_hashes)
            faiss = import_faiss()
            try:
                faiss_index = faiss.read_index(str(faiss_file))
            except RuntimeError as err:
                raise ValueError(f"cannot read {faiss_file}: not a faiss index or truncated ({err})") from err
            if faiss_index.ntotal != count or faiss_index.d != dim:
                raise ValueError(
                    f"{faiss_file} holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, expected {count} x {dim}"
                )
        return cls(
            corpus,
            embeddings,
            backend=backend,
            index_factory=meta.get("index_factory", "Flat") if backend in ("faiss", "faiss-gpu") else "Flat",
            search_params=search_params if search_params is not None else meta.get("search_params"),
            device=device,
            search_dtype=search_dtype,
            embedder_name=meta.get("embedder_name"),
            embedder_hash=meta.get("embedder_hash"),
            _faiss_index=faiss_index,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        repo_type: str = "dataset",
        path_in_repo: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload REALM block index",
        revision: str | None = None,
    ) -> str:
        """Save to a temporary directory and upload it to the Hub repo ``repo_id`` (a dataset repo by default; pass
        ``repo_type="model", path_in_repo="index"`` to keep it beside a model). Returns the commit URL."""
        return hub_io.push_folder_to_hub(
            self.save_pretrained,
            repo_id,
            repo_type=repo_type,
            commit_message=commit_message,
            path_in_repo=path_in_repo,
            private=private,
            token=token,
            revision=revision,
        )

    # -- transformers 4.x import ----------------------------------------------------------------------------------

    @classmethod
    def from_legacy_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        block_records: str | os.PathLike | Sequence | None = None,
        *,
        tokenizer=None,
        allow_pickle: bool | None = None,
        block_seq_len: int = 288,
        embeddings_dtype: torch.dtype = torch.float32,
        num_proc: int | None = None,
        **index_kwargs,
    ) -> RealmBlockIndex:
        """Import a transformers 4.x `RealmForOpenQA` index: its ``block_emb`` buffer and its `block_records.npy`.

        `google/realm-orqa-*` checkpoints carry their 13.35M-block index as a 6.8 GB ``block_emb`` buffer inside the
        model and the block texts as a pickled numpy array; this turns them into a [`RealmBlockIndex`] that is saved and
        loaded on its own. The embedder hash is that of the checkpoint's ``embedder.*`` weights, so loading the index
        with the same embedder (under any key names) gives no warning.

        Args:
            checkpoint (`str` or `os.PathLike`):
                A 4.x checkpoint directory (`model.safetensors`, `pytorch_model.bin` or a sharded index of either) or
                one weights file.
            block_records (`str`, `os.PathLike` or sequence, *optional*):
                The `block_records.npy` path (default: in the checkpoint directory) or the texts themselves.
            tokenizer (*optional*):
                Tokenizes the blocks (`[CLS] text [SEP]`, truncated to ``block_seq_len``) so that the index can be
                refreshed and candidates re-embedded. Default: the tokenizer in the checkpoint directory, if any.
                Without one the corpus has text only (enough for a frozen index, e.g. ORQA fine-tuning).
            allow_pickle (`bool`, *optional*):
                `block_records.npy` is a pickle (it can execute code when loaded): pass `True` (or set 4.x's
                `TRUST_REMOTE_CODE=True`) if you trust its source.
            embeddings_dtype (`torch.dtype`, *optional*, defaults to fp32): Dtype to keep the embeddings in.
            index_kwargs: Passed to the constructor (``backend``, ...).
        """
        from .legacy_checkpoint import index_from_legacy_checkpoint

        return index_from_legacy_checkpoint(
            cls, checkpoint, block_records, tokenizer=tokenizer, allow_pickle=allow_pickle,
            block_seq_len=block_seq_len, embeddings_dtype=embeddings_dtype, num_proc=num_proc, **index_kwargs,
        )  # fmt: skip


def _without_indexes(dataset):
    """A new `Dataset` object over the same arrow table, with no search index attached."""
    import datasets

    return datasets.Dataset(dataset.data, info=dataset.info.copy(), split=dataset.split)


def _check_embedder(embedder, dim: int, saved_hash: str | None) -> None:
    config = getattr(embedder, "config", None)
    proj = getattr(config, "retriever_proj_size", None)
    if proj is not None and proj != dim:
        raise ValueError(f"the embedder's retriever_proj_size {proj} != index dim {dim}")
    if saved_hash is not None:
        current = embedder_fingerprint(embedder)
        if current != saved_hash:
            warnings.warn(
                f"the index was built by a different embedder (weights hash {saved_hash}, this embedder {current}): "
                "its embeddings are stale for this model; refresh the index (RealmBlockIndex.refresh) before relying "
                "on retrieval",
                UserWarning,
                stacklevel=3,
            )


__all__ = [
    "CorpusTokens",
    "RealmBlockIndex",
    "build_corpus",
    "embed_corpus",
    "embedder_fingerprint",
    "shard_range",
    "sharded_search",
]
