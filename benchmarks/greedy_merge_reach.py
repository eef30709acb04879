"""How far greedy merging (He et al. 2021) can shrink a kNN-MT datastore: the smallest retained fraction it reaches.

Greedy merging only merges an entry into a neighbour *of the same value*, so it stops once no entry has a same-value
entry among its `num_neighbors` nearest neighbours; more passes (neighbours searched again among what is left) and
more neighbours push that floor down. This prints and saves the floor for a grid of (neighbours, passes), on the
datastore of `knn_mt_experiment.py` for one domain.

    python benchmarks/greedy_merge_reach.py --model_dir <knn_mt model> --data_dir ../shared/data --domain it \\
        --grid 32x4,32x32,128x8,512x8 --output out/greedy_merge_reach_it.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_mt_experiment import DOMAINS, _pairs  # noqa: E402

from hf_realm import KNNDatastore  # noqa: E402
from hf_realm.knn_pruning import greedy_merge_sequence  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--domain", default="it", choices=sorted(DOMAINS))
    p.add_argument("--grid", default="32x4,32x32,128x8,512x8", help="neighbours x passes, comma-separated")
    p.add_argument("--work_dir", default="outputs/greedy_merge_reach")
    p.add_argument("--output", default="outputs/greedy_merge_reach.json")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        grid = [tuple(int(x) for x in g.split("x")) for g in args.grid.split(",")]
    except ValueError as err:
        raise ValueError(f"--grid: expected NEIGHBOURSxPASSES,..., got {args.grid!r}") from err
    import datasets
    from transformers import AutoTokenizer, MarianMTModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = MarianMTModel.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    (ds_base, ds_lines), _, _ = DOMAINS[args.domain]
    src, tgt = _pairs(Path(args.data_dir) / "multi_domain_deen", f"{ds_base}.de", f"{ds_base}.en", ds_lines)
    store = KNNDatastore.build(
        model, datasets.Dataset.from_dict({"s": src, "t": tgt}), Path(args.work_dir) / args.domain, tokenizer=tokenizer,
        source_column="s", target_column="t", batch_size=64, max_length=min(256, model.config.max_position_embeddings),
        progress=False,
    )  # fmt: skip
    rows = []
    print(
        f"{args.domain}: {len(store):,} entries\n\n| neighbours | passes | smallest fraction | seconds |\n|---:|---:|---:|---:|"
    )
    for neighbours, passes in grid:
        t0 = time.time()
        merges = greedy_merge_sequence(store, neighbours, max_passes=passes, device=device)
        rows.append({"neighbours": neighbours, "passes": passes, "min_fraction": 1 - len(merges) / len(store),
                     "seconds": time.time() - t0})  # fmt: skip
        print(f"| {neighbours} | {passes} | {rows[-1]['min_fraction']:.3f} | {rows[-1]['seconds']:.0f} |", flush=True)
    result = {"domain": args.domain, "entries": len(store), "device": str(device), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
