"""REALM tokenizer: transformers 5's BERT WordPiece tokenizer plus the 4.x methods REALM code calls
(`batch_encode_candidates`, `encode_plus`, `batch_encode_plus`, `build_inputs_with_special_tokens`,
`create_token_type_ids_from_sequences`, `get_special_tokens_mask` on ids without special tokens), and a `vocab.txt` on save so that 4.x's slow tokenizer reads it."""

from __future__ import annotations

import os

from transformers import BatchEncoding, BertTokenizer
from transformers.utils import PaddingStrategy, logging


logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt", "tokenizer_file": "tokenizer.json"}


class RealmTokenizer(BertTokenizer):
    r"""
    The REALM tokenizer: BERT's uncased WordPiece (backed by 🤗 tokenizers, as every tokenizer in transformers 5),
    with [`~RealmTokenizer.batch_encode_candidates`] to encode `(batch_size, num_candidates)` texts.

    4.x had a slow `RealmTokenizer` and a fast `RealmTokenizerFast`; transformers 5 has one tokenizer per model, so
    both names are this class and 4.x tokenizer files load into it.

    Example:

    ```python
    >>> from hf_realm import RealmTokenizer
    >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cat", "dog"]
    >>> tokenizer = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    >>> batch = tokenizer.batch_encode_candidates([["hello world", "cat"], ["dog", "hello"]], max_length=5)
    >>> batch["input_ids"]
    [[[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]], [[2, 8, 3, 0, 0], [2, 5, 3, 0, 0]]]
    ```
    """

    def batch_encode_candidates(self, text, **kwargs) -> BatchEncoding:
        r"""
        Encode a batch of candidate texts (or text pairs) shaped `(batch_size, num_candidates)`.

        Unlike `__call__`, every sequence is padded to `max_length` (which must be given) so that the candidates of
        each example stack into a `(batch_size, num_candidates, max_length)` tensor.

        Args:
            text (`list[list[str]]`):
                Texts, `(batch_size, num_candidates)`.
            text_pair (`list[list[str]]`, *optional*):
                Second texts, same shape.
            **kwargs:
                Keyword arguments of `__call__` (`max_length`, `truncation`, `return_tensors`, ...).

        Returns:
            [`BatchEncoding`]: `input_ids`, `attention_mask`, `token_type_ids`, each `(batch_size, num_candidates,
            max_length)`.
        """
        if kwargs.get("max_length") is None:
            raise ValueError("batch_encode_candidates needs `max_length` to stack the candidates into a batch")
        kwargs["padding"] = PaddingStrategy.MAX_LENGTH
        batch_text_pair = kwargs.pop("text_pair", None)
        return_tensors = kwargs.pop("return_tensors", None)
        if batch_text_pair is not None and len(batch_text_pair) != len(text):
            raise ValueError(f"text_pair has {len(batch_text_pair)} examples, text has {len(text)}")

        output_data = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for idx, candidate_text in enumerate(text):
            candidate_text_pair = batch_text_pair[idx] if batch_text_pair is not None else None
            encoded = super().__call__(candidate_text, candidate_text_pair, return_tensors=None, **kwargs)
            for key in output_data:
                if encoded.get(key) is not None:
                    output_data[key].append(encoded[key])
        output_data = {key: item for key, item in output_data.items() if len(item) != 0}
        return BatchEncoding(output_data, tensor_type=return_tensors)

    # --- 4.x methods that transformers 5 dropped; code written for 4.x calls them -------------------------------

    def encode_plus(self, text, text_pair=None, **kwargs) -> BatchEncoding:
        """Encode one text (or text pair), as 4.x's `encode_plus`: the same as `tokenizer(text, text_pair, ...)`."""
        if not isinstance(text, str) and not kwargs.get("is_split_into_words"):
            raise ValueError(f"encode_plus takes one text (str), got {type(text).__name__}; use batch_encode_plus")
        return self(text, text_pair=text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs) -> BatchEncoding:
        """Encode a batch of texts or of `(text, text_pair)` tuples, as 4.x's `batch_encode_plus`."""
        batch = list(batch_text_or_text_pairs)
        if batch and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in batch):
            if not kwargs.get("is_split_into_words") or isinstance(batch[0][0], (tuple, list)):
                return self([x[0] for x in batch], [x[1] for x in batch], **kwargs)
        return self(batch, **kwargs)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` from token ids, as 4.x's BERT tokenizers built them."""
        cls, sep = [self.cls_token_id], [self.sep_token_id]
        if token_ids_1 is None:
            return cls + list(token_ids_0) + sep
        return cls + list(token_ids_0) + sep + list(token_ids_1) + sep

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Token type ids of [`~RealmTokenizer.build_inputs_with_special_tokens`]: 0 for `[CLS] A [SEP]`, 1 for
        `B [SEP]`."""
        first = [0] * (len(token_ids_0) + 2)
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where [`~RealmTokenizer.build_inputs_with_special_tokens`] adds `[CLS]` / `[SEP]`, 0 on the tokens."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        first = [1] + [0] * len(token_ids_0) + [1]
        return first if token_ids_1 is None else first + [0] * len(token_ids_1) + [1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write `vocab.txt` (one token per line, in id order), the file 4.x's slow `RealmTokenizer` reads."""
        vocab = self.get_vocab()
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):  # a line number is an id: gaps cannot be written (tokenizer.json has all)
            logger.warning(f"not writing vocab.txt: the {len(ids)} vocabulary ids are not contiguous from 0")
            return ()
        by_id = sorted(vocab, key=vocab.__getitem__)
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in by_id))
        return (path,)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        # transformers 5 writes tokenizer.json only; 4.x's slow tokenizer (what 4.x's RealmRetriever loads) needs
        # vocab.txt too.
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return file_names + self.save_vocabulary(str(save_directory), filename_prefix)


class RealmTokenizerFast(RealmTokenizer):
    """Alias of [`RealmTokenizer`] under its 4.x fast name (transformers 5 tokenizers are all tokenizers-backed)."""


__all__ = ["VOCAB_FILES_NAMES", "RealmTokenizer", "RealmTokenizerFast"]
