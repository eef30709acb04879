"""REALM pretraining on your own text: the knowledge corpus and the sentences to mask, from files, Hub datasets or
Python objects, checked (files, columns, spans) before any training starts."""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from .masking import NoSalientSpanWarning, find_salient_spans, find_word_spans, split_sentences


logger = logging.getLogger(__name__)

__all__ = [
    "build_pretraining_examples",
    "corpus_sentences",
    "load_text_dataset",
    "train_wordpiece_tokenizer",
]

# `datasets` builders by file suffix, as transformers' run_mlm.py maps them
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_text_dataset(
    path_or_name: str,
    *,
    config_name: str | None = None,
    split: str = "train",
    columns: Sequence[str] = ("text",),
    optional_columns: Sequence[str] = (),
    what: str = "data",
):
    """Load one split of a dataset from a file (json, jsonl, csv, parquet or txt, through `datasets`) or a dataset
    name (a local `datasets` folder or a Hub id), and check that it has rows and the given columns.

    Args:
        path_or_name (`str`): A file path, or a dataset name for `datasets.load_dataset`.
        config_name (`str`, *optional*): The dataset's configuration (names only).
        split (`str`, *optional*, defaults to `"train"`): The split to load (names only; a file is one split).
        columns (`Sequence[str]`, *optional*, defaults to `("text",)`): Columns that must be present.
        optional_columns (`Sequence[str]`, *optional*): Columns that may be present; `None` entries are skipped.
        what (`str`, *optional*, defaults to `"data"`): What the data is for, named in errors (e.g. `"corpus"`).

    Returns:
        `datasets.Dataset`: the rows, with the required and present optional columns only.

    Raises:
        `FileNotFoundError`: a path that does not exist (anything with a file suffix or a path separator is a path).
        `ValueError`: an unknown file type, a missing column (the message lists the columns there are) or no rows.
    """
    import datasets

    suffix = os.path.splitext(path_or_name)[1].lower()
    is_path = os.path.exists(path_or_name) or suffix in _BUILDERS or os.sep in path_or_name
    if is_path:
        if not os.path.isfile(path_or_name):
            raise FileNotFoundError(f"{what} file {path_or_name!r} does not exist")
        if suffix not in _BUILDERS:
            raise ValueError(
                f"{what} file {path_or_name!r}: unknown type {suffix!r}, expected one of {sorted(_BUILDERS)}"
            )
        if os.path.getsize(path_or_name) == 0:
            raise ValueError(f"{what} file {path_or_name!r} has no rows (it is empty)")
        data = datasets.load_dataset(_BUILDERS[suffix], data_files=path_or_name, split="train")
    else:
        data = datasets.load_dataset(path_or_name, config_name, split=split)
    source = f"{what} {'file' if is_path else 'dataset'} {path_or_name!r}"
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ValueError(
            f"{source} has no column {missing[0]!r}; its columns are {data.column_names} (choose the column with the "
            "matching --*_column argument)"
        )
    if len(data) == 0:
        raise ValueError(f"{source} has no rows")
    keep = list(columns) + [c for c in optional_columns if c is not None and c in data.column_names]
    return data.select_columns(list(dict.fromkeys(keep)))


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 8000, model_max_length: int = 512):
    """Train a lower-casing BERT WordPiece tokenizer on ``texts`` (what small towers trained from scratch read).

    Args:
        texts (`Iterable[str]`): The training text (e.g. the corpus and the pretraining sentences).
        vocab_size (`int`, *optional*, defaults to 8000): Largest vocabulary (special tokens and every character
            seen are always in it).
        model_max_length (`int`, *optional*, defaults to 512): The tokenizer's truncation length.

    Returns:
        A fast `transformers` `BertTokenizer`.

    Example:

    ```python
    >>> from hf_realm.pretraining_data import train_wordpiece_tokenizer
    >>> tokenizer = train_wordpiece_tokenizer(["Ada Lovelace was born in London in 1815."] * 3, vocab_size=200)
    >>> tokenizer.tokenize("Ada was born in 1815.")
    ['ada', 'was', 'born', 'in', '1815', '.']
    ```
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return BertTokenizer(
        vocab=OrderedDict((token, i) for i, (token, _) in enumerate(vocab)),
        do_lower_case=True,
        model_max_length=model_max_length,
    )


def corpus_sentences(corpus, min_words: int = 4):
    """The sentences of every corpus block (split at `.`, `!` or `?`), each with the block it came from in
    ``source_block_id``, REALM's pretraining text when the masked sentences and the knowledge corpus are the same
    (X = Z: the model then drops each sentence's own block from its candidates, the trivial retrieval).

    Args:
        corpus (`datasets.Dataset`): Blocks with `block_id` and `text` (as [`build_corpus`] returns).
        min_words (`int`, *optional*, defaults to 4): Sentences with fewer words (headings, fragments, runs of
            punctuation) are skipped; a word holds a letter or digit.

    Returns:
        `datasets.Dataset` with columns `text` and `source_block_id`.
    """
    import datasets

    texts, sources = [], []
    for block_id, text in zip(corpus["block_id"], corpus["text"], strict=True):
        for sentence in split_sentences(text or ""):
            if len(find_word_spans(sentence)) >= min_words:
                texts.append(sentence)
                sources.append(int(block_id))
    return datasets.Dataset.from_dict(
        {"text": texts, "source_block_id": sources},
        features=datasets.Features({"text": datasets.Value("string"), "source_block_id": datasets.Value("int64")}),
    )


def _as_dataset(sentences, text_column: str):
    import datasets

    if isinstance(sentences, datasets.Dataset):
        return sentences
    if isinstance(sentences, dict):
        return datasets.Dataset.from_dict(sentences)
    if isinstance(sentences, (list, tuple)) and all(isinstance(s, str) for s in sentences):
        return datasets.Dataset.from_dict({text_column: list(sentences)})
    if isinstance(sentences, (list, tuple)) and all(isinstance(s, dict) for s in sentences):
        return datasets.Dataset.from_list(list(sentences))
    raise TypeError(
        "sentences must be a datasets.Dataset, a dict of columns, a list of dicts or a list of strings, got "
        f"{type(sentences).__name__}"
    )


def _kept_ends(texts: list[str], tokenizer, max_length: int) -> list[int]:
    """The last character each text keeps after truncation to ``max_length`` tokens."""
    enc = tokenizer(
        texts, truncation=True, max_length=max_length, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    return [
        max((b for (a, b), s in zip(offsets, special, strict=True) if b > a and not s), default=0)
        for offsets, special in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
    ]


def build_pretraining_examples(
    corpus,
    sentences=None,
    *,
    text_column: str = "text",
    span_column: str = "span",
    gold_block_column: str = "gold_block_id",
    source_block_column: str = "source_block_id",
    tokenizer: Any = None,
    max_length: int | None = None,
    require_span: bool = False,
    min_words: int = 4,
    name: str | None = None,
):
    r"""
    The Dataset that [`DataCollatorForSalientSpanMasking`] and [`RealmForMaskedLM`] train on, from your own text.

    Each row is one sentence to mask: `text`, `span_start`/`span_end` (the character span to mask; -1 when the
    collator should pick a salient span each time it sees the row), `source_block_id` (the corpus block the sentence
    was taken from, dropped from its retrieval candidates; -1 for none) and, when the input has it,
    `gold_block_id` (the block that holds the answer, for recall@k).

    - `sentences=None`: the sentences of the corpus itself ([`corpus_sentences`]), each with its own block as
      `source_block_id`, as REALM pretrains on Wikipedia with Wikipedia as the knowledge corpus.
    - Otherwise a `datasets.Dataset`, a dict of columns, a list of dicts or a list of strings. A row may carry
      a `span` (the exact substring to mask, a cloze; its first occurrence is masked), or `span_start`/`span_end`
      character offsets; rows without get salient span masking.

    Everything is checked here, before training: a missing text column, empty data, an empty text, a span not found
    in its text or cut off by truncation (with `tokenizer` and `max_length`), a gold block id outside the corpus,
    and, with `require_span=True` (held-out evaluation data), a row with neither a span nor a salient span (a date,
    number or capitalised name) raise a `ValueError` naming the row. Training rows without a salient span get a
    random span instead: one [`~hf_realm.masking.NoSalientSpanWarning`] says how many.

    Args:
        corpus (`datasets.Dataset`): The knowledge corpus from [`build_corpus`] (`block_id`, `text`, ...).
        sentences (*optional*): The sentences to mask (see above).
        text_column (`str`, *optional*, defaults to `"text"`), span_column (`str`, *optional*, defaults to
            `"span"`), gold_block_column (`str`, *optional*, defaults to `"gold_block_id"`), source_block_column
            (`str`, *optional*, defaults to `"source_block_id"`): Input column names.
        tokenizer (*optional*), max_length (`int`, *optional*): The collator's tokenizer and truncation: spans
            that truncation would cut off are errors (given) or not eligible (searched).
        require_span (`bool`, *optional*, defaults to `False`): Every row must have a span to mask.
        min_words (`int`, *optional*, defaults to 4): Shortest corpus sentence kept when `sentences` is `None`.
        name (`str`, *optional*): What to call the data in errors (e.g. the file name).

    Returns:
        `datasets.Dataset` with `text`, `span_start`, `span_end`, `source_block_id` and, when given,
        `gold_block_id`.

    Example:

    ```python
    >>> from hf_realm import build_corpus, build_pretraining_examples, train_wordpiece_tokenizer
    >>> docs = [{"title": "Ada", "text": "Ada was born in London in 1815. She worked with Babbage."},
    ...         {"title": "Alan", "text": "Alan was born in London in 1912. He worked in Manchester."}]
    >>> tokenizer = train_wordpiece_tokenizer([d["text"] for d in docs], vocab_size=200)
    >>> corpus = build_corpus(docs, tokenizer, block_seq_len=32)
    >>> examples = build_pretraining_examples(corpus, [{"text": "Ada was born in 1815.", "span": "1815"},
    ...                                                 {"text": "Alan worked in Manchester."}])
    >>> examples[0]["span_start"], examples[0]["span_end"], examples[1]["span_start"]
    (16, 20, -1)
    >>> own = build_pretraining_examples(corpus)  # the corpus's own sentences, own block dropped at retrieval
    >>> own[0]
    {'text': 'Ada was born in London in 1815.', 'span_start': -1, 'span_end': -1, 'source_block_id': 0}
    ```
    """
    import datasets

    if sentences is None:
        data = corpus_sentences(corpus, min_words=min_words)
        text_column, name = "text", name or "the corpus's own sentences"
        if len(data) == 0:
            raise ValueError(f"the corpus has no sentence of at least {min_words} words to mask")
    else:
        data = _as_dataset(sentences, text_column)
        name = name or "sentences"
    if text_column not in data.column_names:
        raise ValueError(f"{name} has no column {text_column!r}; its columns are {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"{name} has no rows")
    columns = data.column_names
    texts = list(data[text_column])
    spans = list(data[span_column]) if span_column in columns else [None] * len(data)
    given_start = list(data["span_start"]) if "span_start" in columns else [None] * len(data)
    given_end = list(data["span_end"]) if "span_end" in columns else [None] * len(data)
    sources = list(data[source_block_column]) if source_block_column in columns else [None] * len(data)
    golds = list(data[gold_block_column]) if gold_block_column in columns else None
    kept = _kept_ends(texts, tokenizer, max_length) if tokenizer is not None and max_length else None
    num_blocks = len(corpus)

    out = {"text": [], "span_start": [], "span_end": [], "source_block_id": []}
    no_salient = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}, row {i}: the {text_column!r} column is empty ({text!r})")
        start = end = -1
        if spans[i] not in (None, ""):
            start = text.find(spans[i])
            if start < 0:
                raise ValueError(f"{name}, row {i}: span {spans[i]!r} is not in its text {text!r}")
            end = start + len(spans[i])
        elif given_start[i] is not None and given_end[i] is not None and given_start[i] >= 0:
            start, end = int(given_start[i]), int(given_end[i])
            if not 0 <= start < end <= len(text):
                raise ValueError(f"{name}, row {i}: span_start/span_end ({start}, {end}) outside its text {text!r}")
        limit = len(text) if kept is None else kept[i]
        if start >= 0 and end > limit:
            raise ValueError(
                f"{name}, row {i}: the span to mask {text[start:end]!r} ends at character {end}, after the last one "
                f"kept by truncation to max_length={max_length} tokens ({limit}); shorten the text"
            )
        if start < 0 and not any(w.end <= limit for w in find_word_spans(text)):
            # the collator could not even fall back to a random span: it would fail in the middle of training
            raise ValueError(
                f"{name}, row {i}: nothing to mask in {text!r}: no word (letters or digits) within the first "
                f"{max_length or 'all'} tokens"
            )
        if start < 0 and not any(s.end <= limit for s in find_salient_spans(text)):
            if require_span:
                raise ValueError(
                    f"{name}, row {i}: nothing to mask in {text!r}: give a {span_column!r} column (the substring to "
                    "mask) or make sure each text holds a date, number or capitalised name"
                )
            no_salient.append(i)
        if golds is not None and not 0 <= int(golds[i]) < num_blocks:
            raise ValueError(
                f"{name}, row {i}: {gold_block_column} {golds[i]} is not a block of the corpus (0..{num_blocks - 1})"
            )
        out["text"].append(text)
        out["span_start"].append(start)
        out["span_end"].append(end)
        out["source_block_id"].append(-1 if sources[i] is None else int(sources[i]))
    features = {
        "text": datasets.Value("string"),
        "span_start": datasets.Value("int64"),
        "span_end": datasets.Value("int64"),
        "source_block_id": datasets.Value("int64"),
    }
    if golds is not None:
        out["gold_block_id"] = [int(g) for g in golds]
        features["gold_block_id"] = datasets.Value("int64")
    if no_salient:
        warnings.warn(
            f"{len(no_salient)} of {len(texts)} rows of {name} have no salient span (date, number or capitalised "
            f"name) and no given span, e.g. row {no_salient[0]}: {texts[no_salient[0]][:60]!r}; they get a random "
            "span each time instead",
            NoSalientSpanWarning,
            stacklevel=2,
        )
    return datasets.Dataset.from_dict(out, features=datasets.Features(features))
