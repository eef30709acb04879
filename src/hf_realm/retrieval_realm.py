"""REALM retrieval: the block records, the corpus, its embeddings and the MIPS index.

`RealmRetriever` is the transformers 4.x class (same constructor, `__call__`, `from_pretrained`,
`save_pretrained`), with one change: block records are saved as Parquet (through `datasets`), and a 4.x pickled
`block_records.npy` loads only with an explicit opt-in (`allow_pickle=True`, or 4.x's `TRUST_REMOTE_CODE=True`
environment variable). `save_pretrained(..., legacy_npy=True)` also writes a `block_records.npy` that 4.x reads and
that needs no pickle (fixed-width bytes).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoTokenizer
from transformers.utils import logging


logger = logging.get_logger(__name__)

_REALM_BLOCK_RECORDS_FILENAME = "block_records.npy"  # 4.x: a pickled numpy object array of bytes
BLOCK_RECORDS_PARQUET = "block_records.parquet"
BLOCK_RECORDS_NPY = _REALM_BLOCK_RECORDS_FILENAME


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "y", "on", "t"}


def load_legacy_block_records(path: str, allow_pickle: bool | None = None) -> np.ndarray:
    """Load a 4.x `block_records.npy` (a pickle: it can run arbitrary code, so it needs an explicit opt-in).

    Args:
        path (`str`): Path of the `.npy` file.
        allow_pickle (`bool`, *optional*):
            Opt in to unpickling. When not given, the 4.x environment variable `TRUST_REMOTE_CODE=True` opts in.
    """
    if allow_pickle is None:
        allow_pickle = _truthy(os.environ.get("TRUST_REMOTE_CODE"))
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled numpy array (transformers 4.x REALM block records): unpickling can execute "
            "arbitrary code. If you trust its source, pass `allow_pickle=True` (or set the environment variable "
            "`TRUST_REMOTE_CODE=True` as in 4.x); then save it again with `save_pretrained` to get the safe Parquet "
            "format."
        )
    return np.load(path, allow_pickle=True)


def _save_block_records(block_records, path: str) -> None:
    import datasets

    texts = [b.decode() if isinstance(b, bytes) else str(b) for b in block_records]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(path)


def _load_block_records(path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return np.array([t.encode() for t in texts], dtype=object)


def _save_block_records_npy(block_records, path: str) -> None:
    """A 4.x-readable `block_records.npy` without pickle: fixed-width bytes (`S<longest record>`), which 4.x's
    `np.load(path, allow_pickle=True)` reads as well as `allow_pickle=False` does. Every record takes the width of the
    longest one on disk."""
    data = [b if isinstance(b, bytes) else str(b).encode() for b in block_records]
    # numpy's fixed-width bytes drop trailing NUL bytes: refuse rather than change a record.
    bad = next((i for i, b in enumerate(data) if b.endswith(b"\x00")), None)
    if bad is not None:
        raise ValueError(f"block record {bad} ends with a NUL byte, which a fixed-width .npy cannot keep")
    width = max((len(b) for b in data), default=1) or 1
    np.save(path, np.array(data, dtype=f"S{width}"), allow_pickle=False)


def _read_block_records_file(path: str, allow_pickle: bool | None) -> np.ndarray:
    """Parquet or `.npy`, told apart by their magic bytes (a Hub download may name either)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        return _load_block_records(path)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{path} is neither Parquet nor a numpy .npy file (starts with {magic!r})")
    try:
        return np.load(path, allow_pickle=False)  # fixed-width bytes: safe
    except ValueError:  # an object array: a 4.x pickle
        return load_legacy_block_records(path, allow_pickle)


class RealmRetriever:
    """
    The retriever of REALM: takes retrieved block ids, builds the reader inputs `[CLS] question [SEP] block [SEP]`,
    and finds the answers' positions in them.

    Args:
        block_records (`np.ndarray`):
            The evidence texts (`bytes` or `str`), indexed by block id.
        tokenizer ([`RealmTokenizer`]):
            Encodes the retrieved texts.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm import RealmRetriever, RealmTokenizer
    >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "is", "in", "france", "where", "?"]
    >>> tokenizer = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    >>> retriever = RealmRetriever(np.array([b"paris is in france", b"where is paris ?"], dtype=object), tokenizer)
    >>> question = tokenizer(["where is paris ?"]).input_ids
    >>> has_answers, starts, ends, inputs = retriever([0, 1], question, answer_ids=[[8]])
    >>> has_answers, starts, ends
    ([True, False], [[9], [-1]], [[9], [-1]])
    ```
    """

    def __init__(self, block_records, tokenizer):
        super().__init__()
        self.block_records = block_records
        self.tokenizer = tokenizer

    def __call__(self, retrieved_block_ids, question_input_ids, answer_ids, max_length=None, return_tensors="pt"):
        """`[CLS] question [SEP] block [SEP]` for each retrieved block (padded, truncated to `max_length` as the
        tokenizer does), and with `answer_ids` where the answers occur in the blocks.

        The question is decoded from `question_input_ids` and encoded again, as in 4.x. With a `[CLS] A [SEP] B [SEP]`
        tokenizer each block is tokenized once and kept (`cache_size` blocks at most), and the pairs are assembled
        from ids: the same inputs as tokenizing every pair, several times faster in a training loop (checked against
        the tokenizer for every tokenizer before it is used)."""
        ids = np.asarray(retrieved_block_ids).reshape(-1)
        question = self.tokenizer.decode(question_input_ids[0], skip_special_tokens=True)
        if return_tensors == "pt" and self._pair_template_ok():
            concat = self._assemble_pairs(ids, question, max_length)
            if concat is not None:
                if answer_ids is not None:
                    return self.block_has_answer(concat, answer_ids) + (concat,)
                return (None, None, None, concat)
        return self._tokenize_pairs(ids, question, answer_ids, max_length, return_tensors)

    cache_size: int = 200_000

    def _pair_template_ok(self) -> bool:
        """Whether this tokenizer writes a pair as `[CLS] A [SEP] B [SEP]` (types 0...0 1...1), pads and truncates on
        the right: then `_assemble_pairs` equals tokenizing the pairs. Checked once per tokenizer on a probe pair."""
        tok = self.tokenizer
        sides = (getattr(tok, "padding_side", "right"), getattr(tok, "truncation_side", "right"))
        if getattr(self, "_template_for", None) is tok and self._template_sides == sides:
            return self._template_is_bert
        ok = False
        try:
            if sides == ("right", "right"):
                a, b = "a", "b b"
                ia = tok(a, add_special_tokens=False)["input_ids"]
                ib = tok(b, add_special_tokens=False)["input_ids"]
                got = tok(a, b, return_special_tokens_mask=True, return_token_type_ids=True)
                cls, sep = tok.cls_token_id, tok.sep_token_id
                ok = (
                    cls is not None
                    and sep is not None
                    and list(got["input_ids"]) == [cls, *ia, sep, *ib, sep]
                    and list(got["token_type_ids"]) == [0] * (len(ia) + 2) + [1] * (len(ib) + 1)
                    and list(got["special_tokens_mask"]) == [1] + [0] * len(ia) + [1] + [0] * len(ib) + [1]
                )
        except Exception:  # any tokenizer that cannot answer the probe takes the tokenizer path
            ok = False
        self._template_for, self._template_sides, self._template_is_bert = tok, sides, ok
        self._block_cache = {}
        return ok

    def _block_token_ids(self, ids: np.ndarray) -> list[list[int]]:
        # keyed by id and checked against the record itself: records changed or replaced are tokenized again
        cache, records = self._block_cache, self.block_records
        missing = []
        for i in dict.fromkeys(int(i) for i in ids):
            hit = cache.get(i)
            if hit is None or hit[0] != records[i]:
                missing.append(i)
        if missing:
            if len(cache) + len(missing) > self.cache_size:
                cache.clear()
            texts = [self._text(records[i]) for i in missing]
            for i, tokens in zip(
                missing, self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"], strict=True
            ):
                cache[i] = (records[i], list(tokens))
        return [cache[int(i)][1] for i in ids]

    @staticmethod
    def _text(record) -> str:
        return record.decode() if isinstance(record, bytes) else str(record)

    def span_text(self, block_id: int, first_token: int, last_token: int, expected_ids=None) -> str | None:
        """The text of tokens `first_token..last_token` of block `block_id` as the block has it: case, accents,
        punctuation and spacing kept (`"Levi's Stadium"`, `"30,000"`, where decoding the uncased ids gives
        `"levi ' s stadium"` and `"30, 000"`). Takes a [`RealmForOpenQA`] output's `predicted_answer_spans` entry.

        Returns None when it cannot say for sure, so that the caller decodes the ids instead: the tokenizer gives no
        character offsets, the span is outside the block, or the block's tokens there are not `expected_ids` (the
        answer ids the reader read).

        Example:

        ```python
        >>> import numpy as np
        >>> from hf_realm import RealmRetriever, RealmTokenizer
        >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "at", "levi", "'", "s", "stadium", ","]
        >>> tokenizer = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
        >>> retriever = RealmRetriever(np.array([b"At Levi's Stadium,"], dtype=object), tokenizer)
        >>> retriever.span_text(0, 1, 4), tokenizer.decode([6, 7, 8, 9])
        ("Levi's Stadium", "levi ' s stadium")
        ```
        """
        if not getattr(self.tokenizer, "is_fast", False) or first_token < 0 or last_token < first_token:
            return None
        text = self._text(self.block_records[int(block_id)])
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        if last_token >= len(ids):
            return None
        if expected_ids is not None and list(ids[first_token : last_token + 1]) != [int(i) for i in expected_ids]:
            return None
        return text[offsets[first_token][0] : offsets[last_token][1]]

    def _assemble_pairs(self, ids: np.ndarray, question: str, max_length: int | None):
        """The reader inputs built from ids, or None when the tokenizer's truncation would cut the question too
        (longest-first truncation of a question longer than half the room: left to the tokenizer)."""
        import torch
        from transformers import BatchEncoding

        tok = self.tokenizer
        limit = max_length if max_length is not None else tok.model_max_length
        q = list(tok(question, add_special_tokens=False)["input_ids"])
        room = limit - 3  # [CLS], [SEP], [SEP]
        if len(q) > room // 2:
            return None
        blocks = [b[: room - len(q)] for b in self._block_token_ids(ids)]
        lengths = np.array([len(q) + len(b) + 3 for b in blocks], dtype=np.int64)
        width = int(lengths.max()) if len(blocks) else 0
        n = len(blocks)
        input_ids = np.full((n, width), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=np.int64)
        token_type_ids = np.zeros((n, width), dtype=np.int64)
        attention_mask = np.zeros((n, width), dtype=np.int64)
        special = np.ones((n, width), dtype=np.int64)  # padding counts as special, as the tokenizer says
        head = [tok.cls_token_id, *q, tok.sep_token_id]
        start = len(head)
        for row, block in enumerate(blocks):
            end = start + len(block)
            input_ids[row, :start] = head
            input_ids[row, start:end] = block
            input_ids[row, end] = tok.sep_token_id
            token_type_ids[row, start : end + 1] = 1
            attention_mask[row, : end + 1] = 1
            special[row, 1 : start - 1] = 0
            special[row, start:end] = 0
        return BatchEncoding(
            {
                "input_ids": torch.from_numpy(input_ids),
                "token_type_ids": torch.from_numpy(token_type_ids),
                "attention_mask": torch.from_numpy(attention_mask),
                "special_tokens_mask": torch.from_numpy(special),
            }
        )

    def _tokenize_pairs(self, ids, question, answer_ids, max_length, return_tensors):
        retrieved_blocks = np.take(self.block_records, indices=ids, axis=0)
        text = [question] * len(retrieved_blocks)
        text_pair = [b.decode() if isinstance(b, bytes) else str(b) for b in retrieved_blocks]
        concat_inputs = self.tokenizer(
            text, text_pair, padding=True, truncation=True, return_special_tokens_mask=True, max_length=max_length
        )
        concat_inputs_tensors = concat_inputs.convert_to_tensors(return_tensors)
        if answer_ids is not None:
            return self.block_has_answer(concat_inputs, answer_ids) + (concat_inputs_tensors,)
        return (None, None, None, concat_inputs_tensors)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *init_inputs,
        allow_pickle: bool | None = None,
        **kwargs,
    ) -> RealmRetriever:
        """Load block records (Parquet, or a 4.x pickle with opt-in) and the tokenizer from a directory or Hub repo.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Local directory or Hub repo id.
            allow_pickle (`bool`, *optional*):
                Allow loading a 4.x pickled `block_records.npy` (see [`load_legacy_block_records`]).
            kwargs: Passed to `hf_hub_download` and `AutoTokenizer.from_pretrained` (e.g. `revision`, `token`).
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            parquet = os.path.join(path, BLOCK_RECORDS_PARQUET)
            legacy = os.path.join(path, _REALM_BLOCK_RECORDS_FILENAME)
            if not os.path.isfile(parquet):
                parquet = None
            if not os.path.isfile(legacy):
                legacy = None
        else:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
            try:
                parquet, legacy = hf_hub_download(path, BLOCK_RECORDS_PARQUET, **hub_kwargs), None
            except EntryNotFoundError:
                parquet, legacy = None, hf_hub_download(path, _REALM_BLOCK_RECORDS_FILENAME, **hub_kwargs)
        if parquet is not None or legacy is not None:
            block_records = _read_block_records_file(parquet or legacy, allow_pickle)
        else:
            raise FileNotFoundError(
                f"{path} holds neither {BLOCK_RECORDS_PARQUET} nor a 4.x {_REALM_BLOCK_RECORDS_FILENAME}"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, *init_inputs, **kwargs)
        return cls(block_records, tokenizer)

    def save_pretrained(self, save_directory: str | os.PathLike, legacy_npy: bool = False) -> None:
        """Save the block records (Parquet) and the tokenizer (with the `vocab.txt` 4.x reads); the files appear only
        once all are written.

        Args:
            save_directory (`str` or `os.PathLike`): Directory to write to.
            legacy_npy (`bool`, *optional*, defaults to `False`):
                Also write `block_records.npy` as fixed-width bytes, so that transformers 4.x's `RealmRetriever`
                (which reads only that file) loads the directory; it needs no pickle to read.
        """
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-") as tmp:
            _save_block_records(self.block_records, os.path.join(tmp, BLOCK_RECORDS_PARQUET))
            if legacy_npy:
                _save_block_records_npy(self.block_records, os.path.join(tmp, _REALM_BLOCK_RECORDS_FILENAME))
            elif os.path.isfile(os.path.join(save_directory, _REALM_BLOCK_RECORDS_FILENAME)):
                logger.warning(
                    f"{save_directory} keeps an older {_REALM_BLOCK_RECORDS_FILENAME}, which transformers 4.x would "
                    "read instead of the new records: pass legacy_npy=True to rewrite it"
                )
            self.tokenizer.save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(save_directory, name))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload RealmRetriever", **kwargs) -> str:
        """Save to a temporary directory and upload it to the Hub repo `repo_id` (``token``, ``private``,
        ``revision``, ``path_in_repo`` as in `huggingface_hub`). Returns the commit URL."""
        from .hub_io import push_folder_to_hub

        return push_folder_to_hub(
            self.save_pretrained, repo_id, repo_type=kwargs.pop("repo_type", "model"), commit_message=commit_message,
            **kwargs,
        )  # fmt: skip

    def block_has_answer(self, concat_inputs, answer_ids):
        """Check whether the retrieved blocks contain an answer, and where (positions in the reader inputs)."""
        has_answers, start_pos, end_pos = [], [], []
        max_answers = 0
        sep = self.tokenizer.sep_token_id
        for input_id in concat_inputs.input_ids:
            input_id_list = input_id.tolist() if hasattr(input_id, "tolist") else list(input_id)
            # Answers are searched between the two [SEP] tokens (in the block, not the question).
            first_sep_idx = input_id_list.index(sep)
            second_sep_idx = first_sep_idx + 1 + input_id_list[first_sep_idx + 1 :].index(sep)
            start_pos.append([])
            end_pos.append([])
            for answer in answer_ids:
                answer = list(answer)
                for idx in range(first_sep_idx + 1, second_sep_idx):
                    if answer[0] == input_id_list[idx] and input_id_list[idx : idx + len(answer)] == answer:
                        start_pos[-1].append(idx)
                        end_pos[-1].append(idx + len(answer) - 1)
            if len(start_pos[-1]) == 0:
                has_answers.append(False)
            else:
                has_answers.append(True)
                max_answers = max(max_answers, len(start_pos[-1]))
        # Pad with -1 to max_answers.
        for starts, ends in zip(start_pos, end_pos, strict=True):
            if len(starts) < max_answers:
                starts += [-1] * (max_answers - len(starts))
                ends += [-1] * (max_answers - len(ends))
        return has_answers, start_pos, end_pos


__all__ = ["RealmRetriever", "load_legacy_block_records"]
