"""Doc embeddings of a corpus with a REALM embedder, batched and sharded across processes."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .corpus import CorpusTokens
from .search.sharded import gather_shards, process_layout, shard_range


# ----------------------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------------------


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


class _LengthBucketedBatches(torch.utils.data.Dataset):
    """Item ``i`` is batch ``i`` of a length-sorted block order, padded to its own longest block (a `DataLoader` with
    ``batch_size=None`` serves the batches as they are)."""

    def __init__(self, tokens: CorpusTokens, batches: list[np.ndarray], start: int, pad_id: int, multiple: int | None):
        self.tokens, self.batches, self.start, self.pad_id, self.multiple = tokens, batches, start, pad_id, multiple

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.batches[i]
        arrays = self.tokens.batch(ids, self.pad_id, self.multiple)
        if arrays["attention_mask"].all():  # no padding: no mask, so SDPA can take its fastest kernel
            del arrays["attention_mask"]
        item = {k: torch.from_numpy(v) for k, v in arrays.items()}
        item["block_ids"] = torch.from_numpy(ids - self.start)
        return item


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
    shard: bool = True,
    pad_to_multiple_of: int | None = 8,
    num_workers: int = 0,
    prefetch: int = 4,
    show_progress: bool = True,
) -> torch.Tensor:
    """Doc embeddings of every block of ``corpus``, in block-id order: the hot path of REALM's index refresh.

    Blocks are sorted by length and batched (each batch padded to its own longest block; batches without padding are run
    without an attention mask so SDPA can take its fastest kernel); token ids are read from flat arrays
    ([`CorpusTokens`]), never re-tokenized; a `torch.utils.data.DataLoader` serves the batches (in pinned memory on
    CUDA, copied to the device asynchronously); the forward runs under `torch.inference_mode` with bf16 on CUDA;
    results are written to a preallocated device buffer at their block ids, so they do not depend on the batch order.
    The embedder is put in eval mode for the call and restored after. The returned tensor is complete when the call
    returns (the copy to ``output_device`` is a blocking one).

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
        shard (`bool`, *optional*, defaults to `True`):
            `False`: this process embeds every block and makes no collective call (for a background thread).
        pad_to_multiple_of (`int`, *optional*, defaults to 8): Round each batch's length up (tensor-core friendly).
        num_workers (`int`, *optional*, defaults to 0):
            `DataLoader` worker processes building the batches; 0 builds them in this process, which keeps up with the
            GPU (the forward is asynchronous) unless the blocks are very short.
        prefetch (`int`, *optional*, defaults to 4): Batches prepared ahead by each worker (with ``num_workers > 0``).
        show_progress (`bool`, *optional*, defaults to `True`): A tqdm bar on the main process.

    Returns:
        `torch.Tensor` of shape `(num_blocks, proj_size)` (or `(shard_size, proj_size)` when ``gather=False``).

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm import RealmConfig, RealmEmbedder
    >>> from hf_realm.embedding import embed_corpus
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
    rank, world = process_layout(accelerator) if shard else (0, 1)
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
    loader = torch.utils.data.DataLoader(
        _LengthBucketedBatches(tokens, batches, start, pad_id, pad_to_multiple_of),
        batch_size=None,  # the dataset's items are whole batches
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )

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
    out = None
    bar = tqdm(total=end - start, desc="Embedding blocks", unit="block", disable=not show_progress or rank != 0)
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None),
        ):
            for item in loader:
                item = {k: v.to(device, non_blocking=True) for k, v in item.items()}  # from pinned memory on CUDA
                block_ids = item.pop("block_ids")
                emb = _projected(runner(**item))
                if out is None:
                    out = torch.empty(end - start, emb.shape[-1], dtype=output_dtype, device=device)
                out.index_copy_(0, block_ids, emb.to(output_dtype))
                bar.update(len(block_ids))
    finally:
        bar.close()
        if hasattr(embedder, "train"):
            embedder.train(was_training)
    if out is None:  # this process had an empty shard
        dim = getattr(config, "retriever_proj_size", None)
        if dim is None:
            raise ValueError("empty shard and no config.retriever_proj_size to size it")
        out = torch.empty(0, dim, dtype=output_dtype, device=device)

    if world > 1 and gather:
        out = gather_shards(out, num_blocks, world)
    if output_device is not None:
        # A blocking copy on purpose: callers use the result at once (the torch search backend copies it straight back
        # to the GPU); a non_blocking device-to-host copy would hand them memory the copy has not filled yet.
        out = out.to(output_device, non_blocking=False)
    return out


def _embedder_name(embedder) -> str:
    config = getattr(embedder, "config", None)
    name = getattr(embedder, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or type(embedder).__name__


# ----------------------------------------------------------------------------------------------------------------------
# The retriever projection's start from a corpus
# ----------------------------------------------------------------------------------------------------------------------


class _Pooled(torch.nn.Module):
    """A [`RealmEmbedder`] up to its pooling: returns what its projection would be given (for `embed_corpus`)."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder, self.config = embedder, embedder.config

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None):
        out = self.embedder.realm(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.embedder.pooled_output(out, attention_mask)


@torch.no_grad()
def init_retriever_projection(
    embedder,
    corpus,
    *,
    max_blocks: int = 8192,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict:
    """Starts the retriever projection of ``embedder`` from the corpus: its rows become the top principal directions
    of the pooled block vectors (centred, so the bias subtracts their mean) and its layer norm the identity.

    A projection drawn at random scrambles the inner products of a pretrained encoder: from all-MiniLM-L6-v2 on
    SQuAD-open, the gold paragraph is in the top 5 for 58% of the test questions with [CLS] pooling and a random
    projection, for 66% with [CLS] pooling and this start, and for 78% with mean pooling and this start (82% for the
    encoder's own 384-d embeddings); see `benchmarks/retriever_start.py`. ICT and fine-tuning then start from there.

    Under an initialised `torch.distributed` (e.g. `accelerate launch`) every process fits the projection and process
    0's result is broadcast to all, so every process's tower starts the same.

    Args:
        embedder ([`RealmEmbedder`], or a model holding `embedder` / `query_embedder`): The tower(s) to start; the
            encoder and pooling (`config.retriever_pooling`) are used as they are.
        corpus (`datasets.Dataset` or [`CorpusTokens`]): Blocks from [`build_corpus`].
        max_blocks (`int`, *optional*, defaults to 8192): Blocks sampled (without replacement, ``seed``) to fit on.
        batch_size, device, show_progress: As in [`embed_corpus`].

    Returns:
        `dict` with `num_blocks` (fitted on) and `explained_variance` (share of the pooled vectors' variance the
        projection keeps).

    Example:

    ```python
    >>> import datasets, torch
    >>> from hf_realm import RealmConfig, RealmEmbedder, init_retriever_projection
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=4, retriever_pooling="mean")
    >>> embedder = RealmEmbedder(config)
    >>> corpus = datasets.Dataset.from_dict({"input_ids": [[2, 10 + i, 11 + i % 7, 3] for i in range(40)]})
    >>> stats = init_retriever_projection(embedder, corpus, show_progress=False)
    >>> stats["num_blocks"], 0 < stats["explained_variance"] <= 1
    (40, True)
    ```
    """
    towers = [embedder] if hasattr(embedder, "cls") and hasattr(embedder, "realm") else []
    if not towers:  # a model holding embedders: RealmForInverseClozeTask, RealmForMaskedLM, RealmForOpenQA, a scorer
        seen = set()
        for name in ("embedder", "query_embedder"):
            tower = getattr(embedder, name, None)
            if tower is not None and id(tower) not in seen:
                towers.append(tower)
                seen.add(id(tower))
    if not towers:
        raise TypeError(f"expected a RealmEmbedder or a model with an `embedder`, got {type(embedder).__name__}")
    tokens = corpus if isinstance(corpus, CorpusTokens) else CorpusTokens.from_dataset(corpus)
    stats = {}
    for tower in towers:
        stats = _init_projection(tower, tokens, max_blocks, batch_size, seed, device, show_progress)
    return stats


def _init_projection(embedder, tokens, max_blocks, batch_size, seed, device, show_progress) -> dict:
    dense = embedder.cls.dense
    dim = dense.out_features
    if len(tokens) <= dim:
        raise ValueError(
            f"the projection to {dim} dimensions needs more than {dim} blocks to fit its start on, got {len(tokens)}"
        )
    if max_blocks <= dim:
        raise ValueError(f"max_blocks must be > retriever_proj_size={dim}, got {max_blocks}")
    if dense.in_features < dim:
        raise ValueError(
            f"retriever_proj_size={dim} is wider than the pooled vectors ({dense.in_features}): principal directions "
            f"give at most {dense.in_features}; use --init_projection random or a smaller projection"
        )
    ids = np.arange(len(tokens))
    if len(ids) > max_blocks:
        ids = np.sort(np.random.default_rng(seed).choice(len(ids), size=max_blocks, replace=False))
        pieces = [tokens.values[tokens.offsets[i] : tokens.offsets[i + 1]] for i in ids]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        tokens = CorpusTokens(values=np.concatenate(pieces), offsets=offsets,
                              token_type_start=tokens.token_type_start[ids])  # fmt: skip
    pooled_embedder = _Pooled(embedder).train(embedder.training)  # embed_corpus restores this mode on the embedder
    home = _module_device(embedder)
    if device is not None and torch.device(device) != home:
        embedder.to(device)  # for the fit only
    try:
        pooled = embed_corpus(pooled_embedder, tokens, batch_size=batch_size, device=device, shard=False,
                              show_progress=show_progress)  # fmt: skip
    finally:
        embedder.to(home)
    x = pooled.to(torch.float64)
    mean = x.mean(dim=0)
    _, singular, vt = torch.linalg.svd(x - mean, full_matrices=False)
    directions = vt[:dim]  # (dim, hidden), orthonormal rows
    dense.weight.copy_(directions.to(dense.weight))
    dense.bias.copy_((-directions @ mean).to(dense.bias))
    norm = embedder.cls.LayerNorm
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    _broadcast_from_main([dense.weight, dense.bias, norm.weight, norm.bias])
    variance = singular.square()
    return {"num_blocks": len(ids), "explained_variance": float(variance[:dim].sum() / variance.sum())}


def _broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Under an initialised `torch.distributed` with several processes, gives every process process 0's values (each
    process fits the projection itself; floating-point differences between devices must not start towers apart)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for tensor in tensors:
        buffer = tensor.detach().to(device).contiguous()
        dist.broadcast(buffer, src=0)
        tensor.copy_(buffer.to(tensor))
