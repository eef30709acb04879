"""Two gloo processes start a retriever projection from different block samples: process 0's result reaches both.

python tests/scripts/projection_broadcast_worker.py PORT OUT_DIR
"""

import os
import sys

import datasets
import numpy as np
import torch
import torch.distributed as dist


def setup(seed: int):
    from hf_realm import RealmConfig, RealmEmbedder

    torch.manual_seed(0)  # the same encoder on every process
    config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, retriever_proj_size=6, retriever_pooling="mean")  # fmt: skip
    embedder = RealmEmbedder(config).eval()
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(5, 99, size=int(rng.integers(3, 12))).tolist(), 3] for _ in range(60)]
    return embedder, datasets.Dataset.from_dict({"input_ids": rows})


def run(rank: int, world: int, port: int, out: str) -> None:
    from hf_realm import init_retriever_projection

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    embedder, corpus = setup(0)
    init_retriever_projection(embedder, corpus, max_blocks=20, seed=rank, show_progress=False)  # other samples
    torch.save(embedder.cls.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
