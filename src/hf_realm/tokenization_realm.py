"""REALM tokenizer: transformers 5's BERT WordPiece tokenizer plus 4.x's `batch_encode_candidates`."""

from __future__ import annotations

from transformers import BatchEncoding, BertTokenizer
from transformers.utils import PaddingStrategy


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


class RealmTokenizerFast(RealmTokenizer):
    """Alias of [`RealmTokenizer`] under its 4.x fast name (transformers 5 tokenizers are all tokenizers-backed)."""


__all__ = ["RealmTokenizer", "RealmTokenizerFast"]
