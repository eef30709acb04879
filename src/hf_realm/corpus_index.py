"""REALM's knowledge corpus and its maximum inner product search (MIPS) index.

- [`build_corpus`]: documents (anything `datasets` loads, with an optional title) split greedily into blocks of at most
  ``block_seq_len`` wordpieces, ``[CLS] title [SEP] body [SEP]``, tokenized once; stable ``block_id`` / ``doc_id``.
- [`CorpusTokens`]: the corpus' token ids as flat numpy arrays, the form the hot paths (embedding, candidate
  re-embedding) read.
- [`embed_corpus`]: doc embeddings with a [`RealmEmbedder`]: length-bucketed batches, bf16 autocast on GPU,
  `torch.inference_mode`, pinned asynchronous host-to-device copies, sharded across processes under `accelerate`.
- [`RealmBlockIndex`]: corpus + embeddings + a search backend behind one API, ``search(query_embeddings, k) -> (scores,
  block_ids)``: faiss `IndexFlatIP` (through `datasets`' FAISS integration), faiss index-factory strings (IVF, HNSW,
  IVF-PQ) with recall measured against exact search, faiss-gpu, and an exact torch GPU backend
  ([`hf_realm.search.exact_topk`], fused Triton kernel). `save_pretrained` / `from_pretrained` / `push_to_hub`, and an
  import of transformers 4.x `RealmForOpenQA` checkpoints (``block_emb`` + ``block_records.npy``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .search import exact_topk


logger = logging.getLogger(__name__)

INDEX_CONFIG_NAME = "index_config.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
CORPUS_DIR = "corpus"
FAISS_INDEX_NAME = "faiss.index"
FORMAT_VERSION = 1
_FAISS_INDEX_NAME_IN_DATASET = "embeddings"
_BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")


# ----------------------------------------------------------------------------------------------------------------------
# faiss (optional)
# ----------------------------------------------------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "this index backend needs faiss: `pip install faiss-cpu` (or `pip install hf_realm[faiss]`; "
            "`faiss-gpu-cu12` for GPU indexes), or use backend='torch' (exact search in torch, no faiss)"
        ) from err
    return faiss


def _faiss_available() -> bool:
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def _faiss_gpu_available() -> bool:
    try:
        faiss = _import_faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Corpus: documents -> blocks
# ----------------------------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def _to_dataset(documents, text_column: str):
    import datasets

    if isinstance(documents, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {list(documents)}: pass one split, e.g. documents['train']")
    if isinstance(documents, datasets.Dataset):
        return documents
    if isinstance(documents, dict):
        return datasets.Dataset.from_dict(documents)
    if isinstance(documents, (list, tuple)):
        if all(isinstance(d, str) for d in documents):
            return datasets.Dataset.from_dict({text_column: list(documents)})
        if all(isinstance(d, dict) for d in documents):
            return datasets.Dataset.from_list(list(documents))
    raise TypeError(
        "documents must be a datasets.Dataset, a dict of columns, a list of dicts or a list of strings, "
        f"got {type(documents).__name__}"
    )


def _split_points(offsets: list[tuple[int, int]], word_starts: list[bool], text: str, budget: int) -> list[int]:
    """Greedy block boundaries (token positions) for one document body: each block takes as many tokens as fit in
    ``budget``, cut after the last sentence end in its second half, else before the last word start, else hard."""
    n = len(offsets)
    cuts = [0]
    start = 0
    while n - start > budget:
        end = start + budget
        cut = None
        for i in range(end, start + budget // 2, -1):  # cut before token i
            if _SENTENCE_END.search(text[offsets[i - 1][0] : offsets[i - 1][1]]) and word_starts[i]:
                cut = i
                break
        if cut is None:
            for i in range(end, start, -1):
                if word_starts[i]:
                    cut = i
                    break
        if cut is None or cut <= start:
            cut = end
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts


def _make_blocks(batch, indices, *, tokenizer, block_seq_len, text_column, title_column, doc_id_column, split):
    texts = batch[text_column]
    titles = batch[title_column] if title_column is not None else [None] * len(texts)
    doc_ids = batch[doc_id_column] if doc_id_column is not None else indices
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    bodies = tokenizer(
        [t if t is not None else "" for t in texts], add_special_tokens=False, return_offsets_mapping=True
    )
    title_ids = tokenizer([t or "" for t in titles], add_special_tokens=False)["input_ids"]
    out = {"doc_id": [], "title": [], "text": [], "input_ids": [], "token_type_start": [], "num_truncated": []}
    for row, (text, title, doc_id) in enumerate(zip(texts, titles, doc_ids, strict=True)):
        text = text or ""
        ids = bodies["input_ids"][row]
        offsets = bodies["offset_mapping"][row]
        if not ids:
            continue  # a document without body text gives no block
        tids = title_ids[row][: block_seq_len // 2] if title else []
        head = [cls] + tids + [sep] if tids else [cls]
        budget = block_seq_len - len(head) - 1
        if budget < 1:
            raise ValueError(f"block_seq_len={block_seq_len} leaves no room for body tokens after the title")
        word_ids = bodies.word_ids(row)
        word_starts = [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(ids))] + [True]
        cuts = _split_points(offsets, word_starts, text, budget) if split else [0, min(len(ids), budget)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            out["doc_id"].append(int(doc_id))
            out["title"].append(title or "")
            out["text"].append(text[offsets[a][0] : offsets[b - 1][1]])
            out["input_ids"].append(head + ids[a:b] + [sep])
            out["token_type_start"].append(len(head) if tids else b - a + 2)
            out["num_truncated"].append(0 if split else len(ids) - (b - a))
    return out


def build_corpus(
    documents,
    tokenizer,
    *,
    block_seq_len: int = 288,
    text_column: str = "text",
    title_column: str | None = "title",
    doc_id_column: str | None = "doc_id",
    split_documents: bool | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Split documents into REALM blocks and tokenize them once.

    Each document is cut greedily into blocks of at most ``block_seq_len`` wordpieces in the form
    ``[CLS] title [SEP] body [SEP]`` (``[CLS] body [SEP]`` without a title), as REALM splits Wikipedia into 288-wordpiece
    blocks: a block takes as many body tokens as fit, ending at the last sentence end in its second half, else at a word
    boundary. Documents without body text give no block.

    Args:
        documents (`datasets.Dataset`, `dict`, `list[dict]` or `list[str]`):
            One row per document (a `text` column and optionally `title` / `doc_id`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            A fast (tokenizers-backed) BERT-style tokenizer with `[CLS]` and `[SEP]`.
        block_seq_len (`int`, *optional*, defaults to 288):
            Most wordpieces per block, special tokens included.
        text_column / title_column / doc_id_column (`str`, *optional*):
            Column names; missing title / doc_id columns are allowed (doc ids are then the row numbers).
        split_documents (`bool`, *optional*):
            `False` treats every row as one block (too-long rows are truncated, with a warning) and keeps an existing
            `block_id` column, which must then be `0..n-1` in order (e.g. the generated world's corpus, whose gold
            block ids must survive). Defaults to `False` when the input has a `block_id` column, else `True`.
        num_proc (`int`, *optional*): Processes for `datasets.Dataset.map`.

    Returns:
        `datasets.Dataset`: one row per block, in block-id order, with columns `block_id` (int64), `doc_id` (int64),
        `title`, `text` (the block's own text span of the document), `input_ids` (int32 token ids, special tokens
        included) and `token_type_start` (position from which `token_type_ids` are 1: the body after a title; the length
        of the block when it has no title).

    Example:

    ```python
    >>> from hf_realm.corpus_index import build_corpus
    >>> from transformers import BertTokenizer
    >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "is", "in", "france", ".", "city"]
    >>> tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    >>> corpus = build_corpus([{"title": "paris", "text": "paris is in france. paris is a city."}], tokenizer,
    ...                       block_seq_len=10)
    >>> list(corpus["text"]), corpus["input_ids"][0]
    (['paris is in france.', 'paris is a city.'], [2, 5, 3, 5, 6, 7, 8, 9, 3])
    ```
    """
    import datasets

    if block_seq_len < 4:
        raise ValueError(f"block_seq_len must be at least 4, got {block_seq_len}")
    if getattr(tokenizer, "cls_token_id", None) is None or getattr(tokenizer, "sep_token_id", None) is None:
        raise ValueError("the tokenizer needs [CLS] and [SEP] tokens (a BERT-style tokenizer)")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_corpus needs a fast (tokenizers-backed) tokenizer for offsets and word ids")
    ds = _to_dataset(documents, text_column)
    if len(ds) == 0:
        raise ValueError("the corpus is empty: no documents")
    if text_column not in ds.column_names:
        raise ValueError(f"no text column {text_column!r} in the documents (columns: {ds.column_names})")
    if title_column is not None and title_column not in ds.column_names:
        title_column = None
    if doc_id_column is not None and doc_id_column not in ds.column_names:
        doc_id_column = None
    has_block_ids = "block_id" in ds.column_names
    if split_documents is None:
        split_documents = not has_block_ids
    if has_block_ids and not split_documents:
        block_ids = np.asarray(ds["block_id"])
        if not np.array_equal(block_ids, np.arange(len(ds))):
            raise ValueError("the input's block_id column must be 0..n-1 in row order to be kept as block ids")
    if has_block_ids and split_documents:
        logger.warning("split_documents=True: the input's block_id column is replaced by new block ids")

    features = datasets.Features(
        {
            "doc_id": datasets.Value("int64"),
            "title": datasets.Value("string"),
            "text": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "token_type_start": datasets.Value("int32"),
            "num_truncated": datasets.Value("int32"),
        }
    )
    blocks = ds.map(
        _make_blocks,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc,
        desc="Splitting documents into blocks",
        fn_kwargs={
            "tokenizer": tokenizer,
            "block_seq_len": block_seq_len,
            "text_column": text_column,
            "title_column": title_column,
            "doc_id_column": doc_id_column,
            "split": split_documents,
        },
    )
    if len(blocks) == 0:
        raise ValueError("the corpus is empty: no document has body text")
    if not split_documents and len(blocks) != len(ds):
        raise ValueError(
            f"{len(ds) - len(blocks)} rows have no body text; with split_documents=False each row must be a block"
        )
    truncated = int(np.count_nonzero(np.asarray(blocks["num_truncated"])))
    if truncated:
        logger.warning(f"{truncated} blocks were longer than block_seq_len={block_seq_len} and were truncated")
    blocks = blocks.remove_columns("num_truncated")
    blocks = blocks.add_column("block_id", np.arange(len(blocks), dtype=np.int64))
    return blocks.select_columns(["block_id", "doc_id", "title", "text", "input_ids", "token_type_start"])


# ----------------------------------------------------------------------------------------------------------------------
# Token arrays and batching
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CorpusTokens:
    """A corpus' token ids as flat numpy arrays (built once from the `input_ids` column, zero Python per block).

    Args:
        values (`np.ndarray`): All blocks' token ids concatenated (uint16 when the vocabulary allows, else int32).
        offsets (`np.ndarray` of shape `(num_blocks + 1,)`): Block ``i`` is ``values[offsets[i]:offsets[i + 1]]``.
        token_type_start (`np.ndarray` of shape `(num_blocks,)`): Position from which token type ids are 1.

    Example:

    ```python
    >>> import datasets
    >>> from hf_realm.corpus_index import CorpusTokens
    >>> tokens = CorpusTokens.from_dataset(datasets.Dataset.from_dict(
    ...     {"input_ids": [[2, 7, 3, 9, 3], [2, 8, 3]], "token_type_start": [3, 3]}))
    >>> batch = tokens.batch([1, 0])
    >>> batch["input_ids"].tolist(), batch["token_type_ids"].tolist()
    ([[2, 8, 3, 0, 0], [2, 7, 3, 9, 3]], [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]])
    ```
    """

    values: np.ndarray
    offsets: np.ndarray
    token_type_start: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_dataset(cls, corpus, column: str = "input_ids") -> CorpusTokens:
        if column not in corpus.column_names:
            raise ValueError(
                f"the corpus has no {column!r} column (columns: {corpus.column_names}); build it with build_corpus"
            )
        import pyarrow.compute as pc

        if corpus._indices is not None:
            corpus = corpus.flatten_indices()
        chunks = corpus.data.column(column).chunks
        # uint16 halves the memory of a Wikipedia-size corpus (3.8G token ids) when the vocabulary fits.
        small = all(
            len(c.values) == 0 or (pc.min(c.values).as_py() >= 0 and pc.max(c.values).as_py() < 1 << 16)
            for c in chunks
        )
        dtype = np.uint16 if small else np.int32
        values, offsets, base = [], [np.zeros(1, dtype=np.int64)], 0
        for chunk in chunks:
            chunk_offsets = chunk.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            flat = chunk.values.to_numpy(zero_copy_only=False)[chunk_offsets[0] : chunk_offsets[-1]]
            values.append(flat.astype(dtype))
            offsets.append(chunk_offsets[1:] - chunk_offsets[0] + base)
            base += chunk_offsets[-1] - chunk_offsets[0]
        values = np.concatenate(values) if values else np.zeros(0, dtype=dtype)
        offsets = np.concatenate(offsets)
        if "token_type_start" in corpus.column_names:
            tts = np.asarray(corpus.data.column("token_type_start").to_numpy(), dtype=np.int32)
        else:
            tts = np.diff(offsets).astype(np.int32)  # all zeros
        return cls(values=values, offsets=offsets, token_type_start=tts)

    def batch(
        self, block_ids, pad_token_id: int = 0, pad_to_multiple_of: int | None = None, max_length: int | None = None
    ) -> dict[str, np.ndarray]:
        """Padded `input_ids`, `attention_mask`, `token_type_ids` (int64 numpy) of ``block_ids``, in that order."""
        block_ids = np.asarray(block_ids, dtype=np.int64)
        starts = self.offsets[block_ids]
        lengths = self.offsets[block_ids + 1] - starts
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        width = int(lengths.max()) if len(lengths) else 0
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        cols = np.arange(width)
        valid = cols[None, :] < lengths[:, None]
        pos = np.minimum(starts[:, None] + cols[None, :], max(len(self.values) - 1, 0))
        input_ids = np.where(valid, self.values[pos], pad_token_id).astype(np.int64)
        token_type = (cols[None, :] >= self.token_type_start[block_ids][:, None]) & valid
        return {
            "input_ids": input_ids,
            "attention_mask": valid.astype(np.int64),
            "token_type_ids": token_type.astype(np.int64),
        }


# ----------------------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------------------


def shard_range(num_items: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """The contiguous block-id range ``[start, end)`` that process ``process_index`` of ``num_processes`` embeds (sizes
    differ by at most one, larger shards first, as `numpy.array_split`)."""
    base, extra = divmod(num_items, num_processes)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def _process_state(accelerator):
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _projected(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "projected_score", None) is not None:
        return output.projected_score
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(
        f"the embedder returned {type(output).__name__}; expected a tensor or an output with projected_score"
    )


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def embed_corpus(
    embedder,
    corpus,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = "auto",
    output_dtype: torch.dtype = torch.float32,
    output_device: str | torch.device | None = "cpu",
    accelerator=None,
    gather: bool = True,
    pad_to_multiple_of: int | None = 8,
    prefetch: int = 4,
    show_progress: bool = True,
) -> torch.Tensor:
    """Doc embeddings of every block of ``corpus``, in block-id order: the hot path of REALM's index refresh.

    Blocks are sorted by length and batched (each batch padded to its own longest block; batches without padding are run
    without an attention mask so SDPA can take its fastest kernel); token ids are read from flat arrays
    ([`CorpusTokens`]), never re-tokenized; batches are built on a background thread into pinned memory and copied to
    the device asynchronously; the forward runs under `torch.inference_mode` with bf16 autocast on CUDA; results are
    written to a preallocated device buffer at their block ids, so they do not depend on the batch order. The embedder
    is put in eval mode for the call and restored after.

    Under `accelerate` (or any initialised `torch.distributed`) process ``r`` of ``W`` embeds the contiguous block range
    [`shard_range`]``(num_blocks, r, W)``; with ``gather=True`` every process receives the whole matrix, else its shard.

    Args:
        embedder (`torch.nn.Module`):
            A [`RealmEmbedder`] (or any module called as ``embedder(input_ids=, attention_mask=, token_type_ids=)`` that
            returns a tensor or an output with ``projected_score``).
        corpus (`datasets.Dataset` or [`CorpusTokens`]):
            Blocks from [`build_corpus`] (an `input_ids` column, optionally `token_type_start`).
        batch_size (`int`, *optional*, defaults to 512): Blocks per forward.
        device (`str` or `torch.device`, *optional*): Where to run; defaults to the embedder's device.
        dtype (`torch.dtype` or `"auto"`, *optional*, defaults to `"auto"`):
            Compute dtype; `"auto"` is bf16 on CUDA and none (the model's dtype) elsewhere; `None` disables it. On CUDA
            a bf16/fp16 dtype runs a copy of the embedder cast to it (faster than autocast over fp32 weights).
        output_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Dtype of the returned embeddings.
        output_device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the result goes; `None` keeps it on the compute device (e.g. for the torch GPU search backend).
        accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): Process layout.
        gather (`bool`, *optional*, defaults to `True`): Gather all shards on every process.
        pad_to_multiple_of (`int`, *optional*, defaults to 8): Round each batch's length up (tensor-core friendly).
        prefetch (`int`, *optional*, defaults to 4): Batches prepared ahead by the loader thread.
        show_progress (`bool`, *optional*, defaults to `True`): A tqdm bar on the main process.

    Returns:
        `torch.Tensor` of shape `(num_blocks, proj_size)` (or `(shard_size, proj_size)` when ``gather=False``).

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm import RealmConfig, RealmEmbedder
    >>> from hf_realm.corpus_index import embed_corpus
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16)
    >>> embedder = RealmEmbedder(config)
    >>> corpus = datasets.Dataset.from_dict({"input_ids": [[2, 10, 11, 3], [2, 12, 3]]})
    >>> embeddings = embed_corpus(embedder, corpus, batch_size=2, show_progress=False)
    >>> embeddings.shape
    torch.Size([2, 16])
    ```
    """
    from tqdm.auto import tqdm

    tokens = corpus if isinstance(corpus, CorpusTokens) else CorpusTokens.from_dataset(corpus)
    num_blocks = len(tokens)
    if num_blocks == 0:
        raise ValueError("the corpus is empty: nothing to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _process_state(accelerator)
    start, end = shard_range(num_blocks, rank, world)
    device = torch.device(device) if device is not None else _module_device(embedder)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = getattr(embedder, "config", None)
    pad_id = getattr(config, "pad_token_id", None) or 0
    max_positions = getattr(config, "max_position_embeddings", None)

    lengths = tokens.lengths[start:end]
    if max_positions is not None and len(lengths) and lengths.max() > max_positions:
        raise ValueError(
            f"a block has {int(lengths.max())} tokens > the embedder's max_position_embeddings={max_positions}"
        )
    order = start + np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory shows at once
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pin = device.type == "cuda"

    def produce(q: queue.Queue, stop: threading.Event):
        try:
            for ids in batches:
                if stop.is_set():
                    return
                arrays = tokens.batch(ids, pad_id, pad_to_multiple_of)
                padded = not arrays["attention_mask"].all()
                item = {k: torch.from_numpy(v) for k, v in arrays.items()}
                item["block_ids"] = torch.from_numpy(ids - start)
                if not padded:
                    del item["attention_mask"]
                if pin:
                    item = {k: v.pin_memory() for k, v in item.items()}
                q.put(item)
        except BaseException as err:  # surfaced in the consumer
            q.put(err)
        q.put(None)

    was_training = getattr(embedder, "training", False)
    if hasattr(embedder, "eval"):
        embedder.eval()
    runner, autocast_dtype = embedder, dtype
    params = list(embedder.parameters()) if hasattr(embedder, "parameters") else []
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and params and params[0].dtype != dtype:
        # A low-precision copy of the weights runs ~2x faster than autocast over fp32 weights (no per-op casts,
        # layer norms and residuals in bf16 too); it costs one copy of the embedder (~0.25 GB for BERT-base).
        runner = copy.deepcopy(embedder).to(dtype)
        autocast_dtype = None
    loader_queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    loader = threading.Thread(target=produce, args=(loader_queue, stop), daemon=True)
    loader.start()
    out = None
    bar = tqdm(total=end - start, desc="Embedding blocks", unit="block", disable=not show_progress or rank != 0)
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None),
        ):
            while True:
                item = loader_queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                item = {k: v.to(device, non_blocking=True) for k, v in item.items()}
                block_ids = item.pop("block_ids")
                emb = _projected(runner(**item))
                if out is None:
                    out = torch.empty(end - start, emb.shape[-1], dtype=output_dtype, device=device)
                out.index_copy_(0, block_ids, emb.to(output_dtype))
                bar.update(len(block_ids))
    finally:
        stop.set()
        while loader.is_alive():  # unblock the loader if it waits on a full queue
            try:
                loader_queue.get_nowait()
            except queue.Empty:
                loader.join(timeout=0.05)
        bar.close()
        if hasattr(embedder, "train"):
            embedder.train(was_training)
    if out is None:  # this process had an empty shard
        dim = getattr(config, "retriever_proj_size", None)
        if dim is None:
            raise ValueError("empty shard and no config.retriever_proj_size to size it")
        out = torch.empty(0, dim, dtype=output_dtype, device=device)

    if world > 1 and gather:
        out = _gather_shards(out, num_blocks, world)
    if output_device is not None:
        out = out.to(output_device)
    return out


def _gather_shards(local: torch.Tensor, num_blocks: int, world: int) -> torch.Tensor:
    from accelerate.utils import gather

    sizes = [shard_range(num_blocks, r, world) for r in range(world)]
    width = max(e - s for s, e in sizes)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    everything = gather(padded)
    return torch.cat([everything[r * width : r * width + (e - s)] for r, (s, e) in enumerate(sizes)])


def sharded_search(
    query_embeddings: torch.Tensor,
    local_keys: torch.Tensor,
    k: int,
    *,
    shard_start: int,
    accelerator=None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` over a key matrix split across processes, with a distributed top-k merge.

    Each process holds the rows ``[shard_start, shard_start + len(local_keys))`` (e.g. its [`embed_corpus`] shard with
    ``gather=False`` and [`shard_range`]) and the same queries; it searches its shard with
    [`~hf_realm.search.exact_topk`], all processes all-gather their ``(scores, global ids)`` and merge them with one
    ``topk``. Every process returns the same result, equal to an exact search over the whole matrix (up to ties).

    Args:
        query_embeddings (`torch.Tensor` of shape `(num_queries, dim)`): The same on every process.
        local_keys (`torch.Tensor` of shape `(shard_size, dim)`): This process' rows.
        k (`int`): Results per query, at most the total number of rows.
        shard_start (`int`): Global id of ``local_keys[0]``.
        accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): Process layout (default: the
            initialised `torch.distributed` group, or a single process).
        key_bias (`torch.Tensor` of shape `(shard_size,)`, *optional*): As in `exact_topk`.

    Returns:
        `(scores, ids)`: float32 and int64, `(num_queries, k)`, on the queries' device.
    """
    rank, world = _process_state(accelerator)
    q = query_embeddings.to(local_keys.device)
    num_local = local_keys.shape[0]
    local_k = min(k, num_local)
    scores = torch.full((q.shape[0], k), float("-inf"), dtype=torch.float32, device=q.device)
    ids = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    if local_k > 0:
        s, i = exact_topk(q, local_keys, local_k, key_bias=key_bias)
        scores[:, :local_k], ids[:, :local_k] = s, i + shard_start
    if world > 1:
        from accelerate.utils import gather

        scores = gather(scores).view(world, q.shape[0], k).permute(1, 0, 2).reshape(q.shape[0], world * k)
        ids = gather(ids).view(world, q.shape[0], k).permute(1, 0, 2).reshape(q.shape[0], world * k)
        scores, order = scores.topk(k, dim=1)
        ids = ids.gather(1, order)
    if bool((ids < 0).any()):
        raise ValueError(f"k={k} is larger than the total number of keys across processes")
    return scores.to(query_embeddings.device), ids.to(query_embeddings.device)


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
    >>> from hf_realm.corpus_index import embedder_fingerprint
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


def _embedder_name(embedder) -> str:
    config = getattr(embedder, "config", None)
    name = getattr(embedder, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or type(embedder).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Search backends
# ----------------------------------------------------------------------------------------------------------------------


class _TorchBackend:
    """Exact search with `exact_topk`: embeddings resident on ``device`` in ``dtype`` (fp16/bf16 on GPU)."""

    name = "torch"

    def __init__(self, embeddings: torch.Tensor, device=None, dtype=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.keys = embeddings.to(self.device, dtype).contiguous()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_topk(queries.to(self.device), self.keys, k)


class _FaissBackend:
    """A faiss index held by the corpus dataset (`datasets`' FAISS integration): flat inner product by default, any
    index-factory string (trained on a random sample) otherwise; optionally on GPU (faiss-gpu)."""

    def __init__(
        self,
        corpus,
        embeddings: np.ndarray | None,
        index_factory: str = "Flat",
        search_params: dict | None = None,
        gpu: int | None = None,
        train_size: int | None = None,
        faiss_index=None,
        seed: int = 0,
    ):
        faiss = _import_faiss()
        self.index_factory = index_factory
        self.name = "faiss-gpu" if gpu is not None else "faiss"
        if gpu is not None and not _faiss_gpu_available():
            raise ImportError(
                "backend='faiss-gpu' needs faiss with GPU support and a GPU: `pip install faiss-gpu-cu12`"
            )
        if faiss_index is None:
            dim = embeddings.shape[1]
            faiss_index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
            if not faiss_index.is_trained:
                rng = np.random.default_rng(seed)
                n_train = min(len(embeddings), train_size or 256 * 1024)
                sample = embeddings[np.sort(rng.choice(len(embeddings), n_train, replace=False))]
                faiss_index.train(np.ascontiguousarray(sample, dtype=np.float32))
        if gpu is not None:
            self._gpu_resources = faiss.StandardGpuResources()
            faiss_index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, faiss_index)
        self._apply_search_params(faiss_index, search_params or {}, gpu is not None)
        self.search_params = dict(search_params or {})
        if faiss_index.ntotal == 0:
            corpus.add_faiss_index_from_external_arrays(
                external_arrays=np.ascontiguousarray(embeddings, dtype=np.float32),
                index_name=_FAISS_INDEX_NAME_IN_DATASET,
                custom_index=faiss_index,
                batch_size=65536,
            )
        else:
            import datasets

            holder = datasets.search.FaissIndex(custom_index=faiss_index)
            corpus._indexes[_FAISS_INDEX_NAME_IN_DATASET] = holder
        self.faiss_index = corpus.get_index(_FAISS_INDEX_NAME_IN_DATASET)

    @staticmethod
    def _apply_search_params(index, params: dict, gpu: bool):
        if not params:
            return
        faiss = _import_faiss()
        space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
        for key, value in params.items():
            space.set_index_parameter(index, key, value)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        result = self.faiss_index.search_batch(q, k)
        scores = torch.from_numpy(np.asarray(result.total_scores, dtype=np.float32))
        ids = torch.from_numpy(np.asarray(result.total_indices, dtype=np.int64))
        scores[ids < 0] = float("-inf")  # faiss pads with -1 when an approximate index finds fewer than k
        return scores, ids

    def cpu_index(self):
        faiss = _import_faiss()
        index = self.faiss_index.faiss_index
        return faiss.index_gpu_to_cpu(index) if self.name == "faiss-gpu" else index


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


def _check_embeddings(embeddings, num_blocks: int | None) -> torch.Tensor:
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not torch.is_tensor(embeddings):
        raise TypeError(f"embeddings must be a torch.Tensor or numpy array, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be floating point (fp32, fp16 or bf16), got {embeddings.dtype}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (num_blocks, dim), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0:
        raise ValueError("the corpus is empty: no embeddings")
    if num_blocks is not None and embeddings.shape[0] != num_blocks:
        raise ValueError(f"{embeddings.shape[0]} embeddings != {num_blocks} blocks in the corpus")
    if not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        raise ValueError(f"embeddings contain NaN or inf ({bad} blocks)")
    return embeddings


class RealmBlockIndex:
    r"""
    REALM's knowledge corpus with its cached doc embeddings and a maximum inner product search over them.

    One API over several backends: ``search(query_embeddings, k) -> (scores, block_ids)``.

    - `"faiss"`: a faiss index built by `datasets`' FAISS integration on the corpus dataset (so
      ``index.corpus.get_nearest_examples_batch("embeddings", queries, k)`` works too). ``index_factory="Flat"`` (the
      default) is exact `IndexFlatIP`; any faiss index-factory string (``"IVF4096,Flat"``, ``"HNSW32"``,
      ``"IVF4096,PQ32"``) gives an approximate index, trained on a random sample, whose recall
      [`~RealmBlockIndex.evaluate_recall`] measures against exact search. ``search_params`` (e.g. ``{"nprobe": 32}``)
      are set through faiss' `ParameterSpace`.
    - `"faiss-gpu"`: the same on a GPU (needs `faiss-gpu-cu12`).
    - `"torch"`: exact search with [`~hf_realm.search.exact_topk`], the embeddings resident on ``device`` (fp16 on
      GPU; the fused Triton kernel when Triton is installed).
    - `"auto"` (default): `"torch"` when a GPU is present, else `"faiss"` (flat) when faiss is installed, else `"torch"`
      on the CPU.

    Scores are inner products (float32); block ids are int64 row numbers of ``corpus``. ``k`` larger than the number of
    blocks is an error (never clamped silently). An approximate faiss index that finds fewer than ``k`` blocks pads with
    id ``-1`` and score ``-inf``.

    Args:
        corpus (`datasets.Dataset`):
            Blocks in block-id order (from [`build_corpus`]; `text`, `title`, `doc_id`, `input_ids` columns are used
            when present).
        embeddings (`torch.Tensor` or `np.ndarray` of shape `(num_blocks, dim)`):
            Doc embeddings, row ``i`` for block ``i``.
        backend (`str`, *optional*, defaults to `"auto"`): See above.
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
        backend: str = "auto",
        index_factory: str = "Flat",
        search_params: dict | None = None,
        device: str | int | torch.device | None = None,
        search_dtype: torch.dtype | None = None,
        train_size: int | None = None,
        embedder_name: str | None = None,
        embedder_hash: str | None = None,
        _faiss_index=None,
    ):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if len(corpus) == 0:
            raise ValueError("the corpus is empty: no blocks")
        if corpus._indices is not None:
            corpus = corpus.flatten_indices()
        if backend == "auto":
            if torch.cuda.is_available():
                backend = "torch"
            elif _faiss_available():
                backend = "faiss"
            else:
                logger.info("faiss is not installed: exact search in torch on the CPU")
                backend = "torch"
        if backend == "torch" and index_factory != "Flat":
            raise ValueError(f"index_factory={index_factory!r} needs a faiss backend; the torch backend is exact")
        self.corpus = corpus
        self.backend_name = backend
        self.index_factory = index_factory
        self.search_params = dict(search_params or {})
        self.device = device
        self.search_dtype = search_dtype
        self.train_size = train_size
        self._tokens: CorpusTokens | None = None
        self._lock = threading.Lock()
        self._state = self._build_state(
            _check_embeddings(embeddings, len(corpus)), embedder_name, embedder_hash, _faiss_index
        )
        self._expose_faiss_index()

    # -- construction ---------------------------------------------------------------------------------------------

    def _build_state(self, embeddings, embedder_name, embedder_hash, faiss_index=None) -> _IndexState:
        if self.backend_name == "torch":
            backend = _TorchBackend(embeddings, self.device, self.search_dtype)
        else:
            gpu = None
            if self.backend_name == "faiss-gpu":
                gpu = int(self.device) if isinstance(self.device, int) else 0
            # A new dataset object per build: the old index keeps serving from the old one until the swap.
            backend = _FaissBackend(
                _without_indexes(self.corpus),
                embeddings.float().numpy() if faiss_index is None else None,
                self.index_factory,
                self.search_params,
                gpu,
                self.train_size,
                faiss_index,
            )
        return _IndexState(embeddings.cpu(), backend, embedder_name, embedder_hash, time.time())

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

    def _reference_keys(self) -> torch.Tensor:
        """The embeddings exactly as the serving backend holds them, in fp32 (the torch GPU backend stores fp16: its
        search is exact over the fp16 values)."""
        state = self._state
        if isinstance(state.backend, _TorchBackend):
            return state.backend.keys.float()
        return state.embeddings.float()

    def exact_search(self, query_embeddings, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in fp32 over the embeddings as the backend stores them (the reference for recall), on the torch
        backend's device or the CPU."""
        queries = self._check_queries(query_embeddings, k)
        keys = self._reference_keys()
        return exact_topk(queries.to(keys.device, torch.float32), keys, int(k), backend="torch")

    def evaluate_recall(self, query_embeddings, k: int, tie_tolerance: float = 1e-5) -> float:
        """recall@k against exact search: the fraction of returned blocks that belong to the exact top-``k``.

        A returned block counts when its exact score (float64) is at least the exact ``k``-th score minus
        ``tie_tolerance * max(1, |k-th score|)``: blocks whose scores tie the ``k``-th to within fp32 rounding may be
        returned by any exact search. Exact backends give 1.0; approximate faiss indexes give their measured recall.
        """
        queries = torch.as_tensor(query_embeddings)
        _, ids = self.search(queries, k)
        ref_scores, _ = self.exact_search(queries, k)
        keys = self._reference_keys().cpu().double()
        q = queries.detach().cpu().double()
        ids = ids.cpu()
        valid = ids >= 0
        got = (keys[ids.clamp(min=0)] * q[:, None, :]).sum(-1)
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
        embeddings = _check_embeddings(embeddings, self.num_blocks)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"new embedding dim {embeddings.shape[1]} != index dim {self.dim}")
        with self._lock:
            self._state = self._build_state(embeddings, embedder_name, embedder_hash)
            self._expose_faiss_index()

    def _expose_faiss_index(self) -> None:
        # `datasets`' own API on the corpus (get_nearest_examples_batch("embeddings", ...)) sees the serving index.
        backend = self._state.backend
        if isinstance(backend, _FaissBackend):
            self.corpus._indexes[_FAISS_INDEX_NAME_IN_DATASET] = backend.faiss_index
        else:
            self.corpus._indexes.pop(_FAISS_INDEX_NAME_IN_DATASET, None)

    def refresh(self, embedder, **embed_kwargs) -> float:
        """Re-embed the whole corpus with ``embedder`` ([`embed_corpus`], sharded under accelerate) and swap the result
        in ([`~RealmBlockIndex.update_embeddings`]). Returns the seconds it took."""
        start = time.perf_counter()
        embed_kwargs.setdefault("output_device", "cpu")
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
        (dim, metric, count, backend, embedder name and weights hash, hf_realm version, file sizes).

        Everything is written to a temporary sibling directory first, which then replaces ``save_directory`` by rename:
        an interrupted save leaves the previous index in place.
        """
        from safetensors.torch import save_file

        save_directory = os.path.abspath(os.fspath(save_directory))
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise NotADirectoryError(f"{save_directory} exists and is not a directory")
        state = self._state
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.tmp-", dir=parent)
        try:
            meta = self._metadata()
            _without_indexes(self.corpus).save_to_disk(os.path.join(tmp, CORPUS_DIR))
            save_file({"embeddings": state.embeddings.contiguous()}, os.path.join(tmp, EMBEDDINGS_NAME))
            files = [EMBEDDINGS_NAME]
            if isinstance(state.backend, _FaissBackend) and self.index_factory != "Flat":
                faiss = _import_faiss()
                faiss.write_index(state.backend.cpu_index(), os.path.join(tmp, FAISS_INDEX_NAME))
                files.append(FAISS_INDEX_NAME)
            meta["files"] = {name: os.path.getsize(os.path.join(tmp, name)) for name in files}
            with open(os.path.join(tmp, INDEX_CONFIG_NAME), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            _replace_dir(tmp, save_directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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

        Raises:
            `ValueError` when files are missing, truncated, or disagree on the number of blocks or the dimension.
        """
        from safetensors import safe_open

        path = os.fspath(path_or_repo_id)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                path,
                repo_type=repo_type,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=[f"{subfolder}/*"] if subfolder else None,
            )
        if subfolder:
            path = os.path.join(path, subfolder)
        config_path = os.path.join(path, INDEX_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"{path} has no {INDEX_CONFIG_NAME}: not a RealmBlockIndex directory")
        with open(config_path) as f:
            meta = json.load(f)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"index format {meta['format_version']} is newer than this hf_realm ({FORMAT_VERSION})")
        count, dim = int(meta["count"]), int(meta["dim"])
        for name, size in meta.get("files", {}).items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise ValueError(f"{file} is missing")
            if os.path.getsize(file) != size:
                raise ValueError(f"{file} is truncated or altered: {os.path.getsize(file)} bytes, expected {size}")
        if embedder is not None:
            _check_embedder(embedder, dim, meta.get("embedder_hash"))

        try:
            with safe_open(os.path.join(path, EMBEDDINGS_NAME), framework="pt") as f:
                embeddings = f.get_tensor("embeddings")
        except Exception as err:
            raise ValueError(f"cannot read {os.path.join(path, EMBEDDINGS_NAME)}: {err}") from err
        if tuple(embeddings.shape) != (count, dim):
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}, index_config.json says ({count}, {dim})"
            )
        import datasets

        corpus = datasets.load_from_disk(os.path.join(path, CORPUS_DIR))
        if len(corpus) != count:
            raise ValueError(f"the corpus has {len(corpus)} blocks but the index holds {count}: from another corpus?")

        faiss_index = None
        faiss_file = os.path.join(path, FAISS_INDEX_NAME)
        backend = backend or meta["backend"]
        if backend in ("faiss", "faiss-gpu") and os.path.isfile(faiss_file):
            faiss = _import_faiss()
            faiss_index = faiss.read_index(faiss_file)
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
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "index")
            self.save_pretrained(folder)
            result = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                path_in_repo=path_in_repo,
                repo_type=repo_type,
                commit_message=commit_message,
                revision=revision,
            )
        return getattr(result, "commit_url", str(result))

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
        from .retrieval_realm import load_legacy_block_records

        checkpoint = os.fspath(checkpoint)
        ckpt_dir = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
        if block_records is None:
            block_records = os.path.join(ckpt_dir, "block_records.npy")
        if isinstance(block_records, (str, os.PathLike)):
            if not os.path.isfile(block_records):
                raise FileNotFoundError(f"no block records at {block_records}")
            block_records = load_legacy_block_records(os.fspath(block_records), allow_pickle)
        texts = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in block_records]
        block_emb, embedder_state = _read_legacy_weights(checkpoint)
        if block_emb.dim() != 2:
            raise ValueError(f"block_emb must be 2-d, got shape {tuple(block_emb.shape)}")
        if block_emb.shape[0] != len(texts):
            raise ValueError(f"block_emb has {block_emb.shape[0]} rows but there are {len(texts)} block records")
        if tokenizer is None and os.path.isdir(ckpt_dir) and _has_tokenizer_files(ckpt_dir):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        import datasets

        corpus = datasets.Dataset.from_dict(
            {
                "block_id": np.arange(len(texts), dtype=np.int64),
                "doc_id": np.arange(len(texts), dtype=np.int64),
                "title": [""] * len(texts),
                "text": texts,
            }
        )
        if tokenizer is not None:
            corpus = build_corpus(
                corpus, tokenizer, block_seq_len=block_seq_len, split_documents=False, num_proc=num_proc
            )
        return cls(
            corpus,
            block_emb.to(embeddings_dtype),
            embedder_name=os.path.basename(os.path.normpath(checkpoint)) or checkpoint,
            embedder_hash=embedder_fingerprint(embedder_state) if embedder_state else None,
            **index_kwargs,
        )


def _without_indexes(dataset):
    """A new `Dataset` object over the same arrow table, with no search index attached."""
    import datasets

    return datasets.Dataset(dataset.data, info=dataset.info.copy(), split=dataset.split)


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.txt"))


def _read_legacy_weights(checkpoint: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``block_emb`` and the ``embedder.*`` weights (prefix removed) of a 4.x `RealmForOpenQA` checkpoint."""
    if os.path.isdir(checkpoint):
        candidates = [
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ]
        files = [os.path.join(checkpoint, n) for n in candidates if os.path.isfile(os.path.join(checkpoint, n))]
        if not files:
            raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin (or sharded index) in {checkpoint}")
        file = files[0]
    else:
        file = checkpoint
    if file.endswith(".index.json"):
        with open(file) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted({os.path.join(os.path.dirname(file), s) for s in weight_map.values()})
    else:
        shards = [file]
    block_emb, embedder = None, {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if key == "block_emb":
                        block_emb = f.get_tensor(key)
                    elif key.startswith("embedder."):
                        embedder[key[len("embedder.") :]] = f.get_tensor(key)
        else:
            try:  # memory-mapped: only block_emb and the embedder are read from a multi-GB checkpoint
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a pre-zipfile (torch < 1.6) file cannot be memory-mapped
                state = torch.load(shard, map_location="cpu", weights_only=True)
            for key, value in state.items():
                if key == "block_emb":
                    block_emb = value
                elif key.startswith("embedder."):
                    embedder[key[len("embedder.") :]] = value
    if block_emb is None:
        raise ValueError(f"{checkpoint} has no `block_emb` buffer: not a 4.x RealmForOpenQA checkpoint")
    return block_emb.float().clone(), embedder


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


def _replace_dir(src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` is renamed aside first and removed only after
    the new one is in place (a crash in between leaves it at ``<dst>.old-*``)."""
    if os.path.isdir(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rmdir(old)
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


__all__ = [
    "CorpusTokens",
    "RealmBlockIndex",
    "build_corpus",
    "embed_corpus",
    "embedder_fingerprint",
    "shard_range",
    "sharded_search",
]
