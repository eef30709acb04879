"""Data collator for REALM pretraining: salient span masking (or random span / random token masking) and padding."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .masking import MASKING_STRATEGIES, SalientSpanMasker, char_span_to_token_positions


__all__ = ["DataCollatorForSalientSpanMasking"]


@dataclass
class DataCollatorForSalientSpanMasking:
    r"""Masks one salient span per example (REALM), pads the batch and builds MLM labels.

    Like `transformers`' ``DataCollatorForLanguageModeling``, but the masked positions are all the wordpieces of ONE
    span chosen per example: a date, number or named entity (``strategy="salient"``), a random run of whole words
    (``"random_span"``), or BERT-style independent random tokens (``"random_token"``, each non-special token with
    probability ``mlm_probability``, at least one per example). Every masked position becomes ``[MASK]``; labels hold
    the original ids there and -100 everywhere else (padding included).

    Examples may be

    - **raw text**: ``{"text": ...}``; the collator tokenizes the batch (``max_length`` truncation) with a fast
      tokenizer to get character offsets;
    - **pre-tokenized**: ``{"input_ids": ..., "offset_mapping": ..., "text": ...}`` (offsets as returned by
      ``tokenizer(..., return_offsets_mapping=True)``; ``attention_mask``/``token_type_ids`` are used when present).
      ``random_token`` needs neither offsets nor text.

    An example may name its span itself with character offsets in ``span_start``/``span_end`` (as the generated
    world's pretraining sentences do): with ``strategy="salient"`` that span is masked and no search is done. A given
    span that truncation cut off raises a `ValueError`; searched spans are only taken among those that survive
    truncation, and a text with none falls back to a random span with a
    :class:`~hf_realm.masking.NoSalientSpanWarning`.

    Integer columns named in ``passthrough_columns`` (by default ``gold_block_id``, ``block_id``,
    ``source_block_id``) are kept as tensors of shape ``(batch,)``: REALM needs the source block to drop trivial
    retrievals and the gold block for recall. With `Trainer`, set ``remove_unused_columns=False`` (or give the model
    these arguments) so they reach the collator.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): A fast tokenizer (character offsets are needed).
        strategy (`str`, *optional*, defaults to `"salient"`): ``"salient"``, ``"random_span"`` or ``"random_token"``.
        ner (`Callable`, *optional*): A `transformers` token-classification pipeline used for named entities instead
            of the capitalised-span heuristic (see :func:`hf_realm.masking.spans_from_ner`).
        include (`Sequence[str]`, *optional*, defaults to `("date", "number", "entity")`): Salient span sources.
        max_length (`int`, *optional*): Truncate raw text to this many tokens (special tokens included).
        mlm_probability (`float`, *optional*, defaults to 0.15): Token masking rate of ``"random_token"``.
        max_span_words (`int`, *optional*, defaults to 3): Longest random span (fallback and ``"random_span"``).
        pad_to_multiple_of (`int`, *optional*): Pad the batch length up to a multiple of this.
        text_column (`str`, *optional*, defaults to `"text"`), span_start_column (`str`, *optional*, defaults to
            `"span_start"`), span_end_column (`str`, *optional*, defaults to `"span_end"`): Column names.
        passthrough_columns (`Sequence[str]`, *optional*): Integer columns copied to the batch when every example
            has them.
        seed (`int`, *optional*): Seed of the collator's random generator. Each dataloader worker holds its own
            copy, so with ``num_workers > 1`` workers repeat each other's choices; leave ``None`` there.

    Example:

    ```python
    >>> from hf_realm.world import KnowledgeWorld
    >>> from hf_realm.data_collator import DataCollatorForSalientSpanMasking
    >>> world = KnowledgeWorld(num_entities=20, seed=0)
    >>> tokenizer = world.tokenizer()
    >>> collator = DataCollatorForSalientSpanMasking(tokenizer, seed=0)
    >>> batch = collator([world.pretraining()["train"][0], world.pretraining()["train"][1]])
    >>> sorted(batch)
    ['attention_mask', 'gold_block_id', 'input_ids', 'labels', 'token_type_ids']
    >>> bool(((batch["labels"] != -100) == (batch["input_ids"] == tokenizer.mask_token_id)).all())
    True
    ```
    """

    tokenizer: Any
    strategy: str = "salient"
    ner: Callable[[str], Any] | None = None
    include: Sequence[str] = ("date", "number", "entity")
    max_length: int | None = None
    mlm_probability: float = 0.15
    max_span_words: int = 3
    pad_to_multiple_of: int | None = None
    text_column: str = "text"
    span_start_column: str = "span_start"
    span_end_column: str = "span_end"
    passthrough_columns: Sequence[str] = ("gold_block_id", "block_id", "source_block_id")
    seed: int | None = None
    masker: SalientSpanMasker = field(init=False, repr=False)

    def __post_init__(self):
        if self.strategy not in MASKING_STRATEGIES:
            raise ValueError(f"strategy must be one of {MASKING_STRATEGIES}, got {self.strategy!r}")
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a mask token and a pad token for masked language modelling")
        if self.strategy != "random_token" and not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("span masking needs character offsets: use a fast (tokenizers-backed) tokenizer")
        self.masker = SalientSpanMasker(
            strategy="salient" if self.strategy == "random_token" else self.strategy,
            ner=self.ner,
            include=self.include,
            max_span_words=self.max_span_words,
            seed=self.seed,
        )
        # independent stream for random_token, so the span stream does not depend on the strategy mix
        self.token_rng = random.Random(None if self.seed is None else self.seed + 1)

    # -----------------------------------------------------------------------------------------------------------------

    def _encode(self, examples: Sequence[dict]) -> list[dict]:
        """Token ids, offsets, special-token mask and optional segment ids per example."""
        if all("input_ids" in e for e in examples):
            encoded = []
            for e in examples:
                ids = list(e["input_ids"])
                if self.max_length is not None and len(ids) > self.max_length:
                    raise ValueError(
                        f"pre-tokenized example has {len(ids)} tokens > max_length {self.max_length}; "
                        "truncate when tokenizing"
                    )
                offsets = e.get("offset_mapping")
                if offsets is None and self.strategy != "random_token":
                    raise ValueError(
                        f"strategy {self.strategy!r} on pre-tokenized examples needs an 'offset_mapping' column "
                        "(tokenize with return_offsets_mapping=True) and the text"
                    )
                if offsets is not None and len(offsets) != len(ids):
                    raise ValueError(f"offset_mapping has {len(offsets)} entries != {len(ids)} input_ids")
                special = e.get("special_tokens_mask")
                if special is None:
                    special = self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                encoded.append(
                    {
                        "input_ids": ids,
                        "offsets": [tuple(o) for o in offsets] if offsets is not None else None,
                        "special": list(special),
                        "attention_mask": list(e.get("attention_mask", [1] * len(ids))),
                        "token_type_ids": list(e["token_type_ids"]) if "token_type_ids" in e else None,
                    }
                )
            return encoded
        if not all(self.text_column in e for e in examples):
            raise ValueError(
                f"examples need either 'input_ids' or a {self.text_column!r} column, got columns {sorted(examples[0])}"
            )
        texts = [e[self.text_column] for e in examples]
        batch = self.tokenizer(
            texts,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        out = []
        for i in range(len(texts)):
            out.append(
                {
                    "input_ids": list(batch["input_ids"][i]),
                    "offsets": [tuple(o) for o in batch["offset_mapping"][i]],
                    "special": list(batch["special_tokens_mask"][i]),
                    "attention_mask": list(batch["attention_mask"][i]),
                    "token_type_ids": list(batch["token_type_ids"][i]) if "token_type_ids" in batch else None,
                }
            )
        return out

    def _span_positions(self, example: dict, enc: dict) -> list[int]:
        offsets, special = enc["offsets"], enc["special"]
        kept_end = max((b for (a, b), s in zip(offsets, special, strict=True) if b > a and not s), default=0)
        start = example.get(self.span_start_column)
        end = example.get(self.span_end_column)
        given = self.strategy == "salient" and start is not None and end is not None and start >= 0
        if given:
            if not 0 <= start < end:
                raise ValueError(f"given span must satisfy 0 <= span_start < span_end, got ({start}, {end})")
            if end > kept_end:
                raise ValueError(
                    f"given span ({start}, {end}) ends after the last kept character {kept_end}: the mask would be "
                    f"longer than the tokenized query (max_length {self.max_length}); raise max_length or shorten "
                    "the text"
                )
            span_start, span_end = start, end
        else:
            text = example.get(self.text_column)
            if text is None:
                raise ValueError(
                    f"strategy {self.strategy!r} needs the {self.text_column!r} column (or span_start/span_end)"
                )
            span = self.masker.choose_span(text, allowed_end=kept_end)
            if span is None:
                raise ValueError(f"nothing to mask: the text {text[:60]!r} has no word within the kept tokens")
            span_start, span_end = span.start, span.end
        positions = char_span_to_token_positions(offsets, span_start, span_end, special)
        if not positions:
            raise ValueError(f"span ({span_start}, {span_end}) covers no token (offsets {offsets[:8]}...)")
        return positions

    def _token_positions(self, enc: dict) -> list[int]:
        candidates = [i for i, s in enumerate(enc["special"]) if not s and enc["attention_mask"][i]]
        if not candidates:
            raise ValueError("example has no non-special token to mask")
        positions = [i for i in candidates if self.token_rng.random() < self.mlm_probability]
        return positions or [self.token_rng.choice(candidates)]

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        encoded = self._encode(examples)
        rows = []
        for example, enc in zip(examples, encoded, strict=True):
            if self.strategy == "random_token":
                positions = self._token_positions(enc)
            else:
                positions = self._span_positions(example, enc)
            ids = list(enc["input_ids"])
            labels = [-100] * len(ids)
            for p in positions:
                labels[p] = ids[p]
                ids[p] = self.tokenizer.mask_token_id
            rows.append((ids, labels, enc))

        length = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = getattr(self.tokenizer, "padding_side", "right") == "left"

        def pad(seq, value):
            fill = [value] * (length - len(seq))
            return fill + list(seq) if left else list(seq) + fill

        batch = {
            "input_ids": torch.tensor([pad(ids, self.tokenizer.pad_token_id) for ids, _, _ in rows]),
            "attention_mask": torch.tensor([pad(enc["attention_mask"], 0) for _, _, enc in rows]),
            "labels": torch.tensor([pad(labels, -100) for _, labels, _ in rows]),
        }
        if all(enc["token_type_ids"] is not None for _, _, enc in rows):
            batch["token_type_ids"] = torch.tensor([pad(enc["token_type_ids"], 0) for _, _, enc in rows])
        for column in self.passthrough_columns:
            if all(column in e and e[column] is not None for e in examples):
                batch[column] = torch.tensor([int(e[column]) for e in examples], dtype=torch.long)
        return batch
