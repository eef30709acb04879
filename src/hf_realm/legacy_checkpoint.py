"""Import of a transformers 4.x `RealmForOpenQA` index (its ``block_emb`` buffer and `block_records.npy`) as a
[`RealmBlockIndex`]; see [`RealmBlockIndex.from_legacy_checkpoint`]."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .corpus import build_corpus
from .fingerprint import embedder_fingerprint


def index_from_legacy_checkpoint(cls, checkpoint: str | os.PathLike, block_records=None, *, tokenizer=None,
                                 allow_pickle: bool | None = None, block_seq_len: int = 288,
                                 embeddings_dtype: torch.dtype = torch.float32, num_proc=None, **index_kwargs):  # fmt: skip
    """The body of [`RealmBlockIndex.from_legacy_checkpoint`] (``cls`` is the index class to build)."""
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
        corpus = build_corpus(corpus, tokenizer, block_seq_len=block_seq_len, split_documents=False, num_proc=num_proc)
    return cls(
        corpus,
        block_emb.to(embeddings_dtype),
        embedder_name=os.path.basename(os.path.normpath(checkpoint)) or checkpoint,
        embedder_hash=embedder_fingerprint(embedder_state) if embedder_state else None,
        **index_kwargs,
    )


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
