"""The retrieval protocols a REALM model searches through.

The models (`modeling_realm.py`) know nothing of faiss, `datasets` or the search backends: they receive an index object
and call it through these documented protocols. [`RealmBlockIndex`] implements both; any object with the same members
works (a test double, an index served by another process).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BlockIndex(Protocol):
    """What [`RealmForOpenQA`] needs from its corpus index.

    - ``num_blocks`` (`int`): blocks in the corpus; block ids are ``0 .. num_blocks - 1``, the same rows as the
      retriever's block records.
    - ``dim`` (`int`): embedding size (the model's ``retriever_proj_size``).
    - ``embeddings`` (`torch.Tensor` of shape `(num_blocks, dim)`): the cached (frozen) doc embeddings; the model
      computes the retrieval logits of the retrieved blocks from them, so that gradients reach the query embedder.
    - ``search(query_embeddings, k) -> (scores, block_ids)``: the ``k`` blocks with the largest inner product per
      query, best first (float32 and int64, `(num_queries, k)`, torch in, torch out); ``1 <= k <= num_blocks``. An
      approximate index that finds fewer than ``k`` blocks returns id ``-1`` for the missing ones (the model refuses
      them rather than read a wrong block).

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm import RealmBlockIndex
    >>> from hf_realm.retrieval import BlockIndex
    >>> corpus = datasets.Dataset.from_dict({"text": ["a", "b"]})
    >>> isinstance(RealmBlockIndex(corpus, torch.eye(2), backend="torch"), BlockIndex)
    True
    ```
    """

    @property
    def num_blocks(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def embeddings(self) -> torch.Tensor: ...

    def search(self, query_embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class CandidateIndex(Protocol):
    """What [`RealmForMaskedLM`] needs from its corpus index: ``search`` (as in [`BlockIndex`]) and
    ``block_inputs(block_ids) -> dict`` (padded `input_ids` / `attention_mask` / `token_type_ids` of the blocks, shape
    `(*block_ids.shape, length)`, to re-embed the candidates with the current doc encoder)."""

    def search(self, query_embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def block_inputs(self, block_ids) -> dict[str, torch.Tensor]: ...


def missing_members(obj, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty when it implements it)."""
    names = [n for n in vars(protocol) if not n.startswith("_")]
    return [n for n in names if not hasattr(obj, n)]


__all__ = ["BlockIndex", "CandidateIndex", "missing_members"]
