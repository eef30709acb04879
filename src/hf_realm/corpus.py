"""REALM's knowledge corpus: documents split into blocks, tokenized once; the token ids as flat arrays."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np


logger = logging.getLogger(__name__)

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
    >>> from hf_realm.corpus import build_corpus
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
    >>> from hf_realm.corpus import CorpusTokens
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
