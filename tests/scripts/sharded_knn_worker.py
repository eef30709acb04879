"""Worker for tests/test_sharded_search.py: a kNN datastore split over the processes of `accelerate launch` (gloo),
searched directly and inside `generate()`, and a datastore built by both processes (each its shard of the data,
merged by the main one); each rank writes what it got."""

import json
import sys

import torch
from accelerate import PartialState
from transformers import LogitsProcessorList

from hf_realm import KNNDatastore, KNNLogitsProcessor
from hf_realm.search import ShardedSearchConfig, TorchSearchConfig
from tests.conftest import tiny_marian  # the repository root is on PYTHONPATH
from tests.test_knn_generation import EOS, PAD, random_pairs, random_store, tiny_gpt2


def run(store, out: dict, prefix: str) -> None:
    queries = torch.randn(12, 32, generator=torch.Generator().manual_seed(7))
    sqdist, ids = store.search(queries, 10)
    out[f"{prefix}ids"], out[f"{prefix}sqdist"] = ids.tolist(), sqdist.tolist()
    model = tiny_gpt2()
    proc = KNNLogitsProcessor(store, k=4, lmbda=0.5, temperature=4.0)
    with torch.no_grad(), proc.attach(model, check_weights=False):
        generated = model.generate(
            torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=6, do_sample=False, pad_token_id=PAD,
            eos_token_id=EOS, logits_processor=LogitsProcessorList([proc]),
        )  # fmt: skip
    out[f"{prefix}generated"] = generated.tolist()


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)  # gloo: `accelerate launch --multi_gpu` on a machine without GPUs
    store = random_store(n=301)
    store.build_index(ShardedSearchConfig(inner=TorchSearchConfig(device="cpu")), device="cpu")
    backend = store._search_backend(torch.device("cpu"))
    out = {"rank": state.process_index, "world": state.num_processes}
    out["shard"] = [backend.shard_start, backend.shard_end]
    out["inner_keys"] = backend.inner.num_keys
    run(store, out, "")
    built = KNNDatastore.build(tiny_marian(), random_pairs(9, seed=11), f"{out_dir}/built", batch_size=4,
                               accelerator=state, progress=False)  # fmt: skip
    out["built"] = {"keys": built.keys.astype("float32").tolist(), "values": built.values.tolist(),
                    "provenance": built.provenance.tolist()}  # fmt: skip
    with open(f"{out_dir}/rank{state.process_index}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
