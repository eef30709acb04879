"""Worker for tests/test_distributed_refresh.py: one sharded index refresh under `accelerate launch`."""

import json
import os
import sys

import datasets
import torch
from accelerate import PartialState

from hf_realm import RealmBlockIndex, RealmEmbedder
from hf_realm.callbacks import IndexRefreshCallback
from tests.conftest import tiny_realm_config  # the repository root is on PYTHONPATH (conftest.subprocess_env)


def build(num_blocks: int = 50):
    torch.manual_seed(0)
    embedder = RealmEmbedder(tiny_realm_config(pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    rows = [
        [2] + torch.randint(5, 99, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist() + [3]
        for _ in range(num_blocks)
    ]
    corpus = datasets.Dataset.from_dict({"input_ids": rows})
    return embedder, corpus


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)  # gloo: `accelerate launch --multi_gpu` on a machine without GPUs
    embedder, corpus = build()
    # the index starts from other embeddings; the refresh must replace them on every rank
    index = RealmBlockIndex(corpus, torch.zeros(len(corpus), 16).add_(0.5), backend="torch")
    embedded = []

    def count(module, args, kwargs):
        embedded.append(int(kwargs["input_ids"].shape[0]))

    embedder.register_forward_pre_hook(count, with_kwargs=True)
    callback = IndexRefreshCallback(index, refresh_steps=1, embed_kwargs={"show_progress": False, "batch_size": 8})
    assert callback.refresh(embedder, step=1)
    torch.save(index.embeddings, os.path.join(out_dir, f"embeddings_rank{state.process_index}.pt"))
    with open(os.path.join(out_dir, f"count_rank{state.process_index}.json"), "w") as f:
        json.dump({"blocks_embedded": sum(embedded), "world": state.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1])
