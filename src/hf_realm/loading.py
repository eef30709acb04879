"""How REALM checkpoints load: one part of a composite checkpoint, and the index / retriever saved beside a model.

A REALM model saved by `save_pretrained` may hold several sub-models (`RealmForMaskedLM`: the doc embedder, a
separate query embedder, the knowledge-augmented encoder; `RealmForOpenQA`: the query embedder and the reader), and
the objects it searches (`index/`, the retriever's block records). Loading a part class on such a checkpoint (what
`AutoModel` does) used to match no weight name and return a randomly initialised model; here it loads the part's
weights when that part is unambiguous and raises an error naming what to load otherwise.
"""

from __future__ import annotations

import os

from transformers.utils import logging


logger = logging.get_logger(__name__)

# Sub-models of the composite REALM classes: attribute (= saved sub-directory, for the classes that write them and
# = weight-name prefix in the root checkpoint) -> class name.
COMPOSITE_PARTS = {
    "RealmForMaskedLM": {
        "embedder": "RealmEmbedder",
        "query_embedder": "RealmEmbedder",
        "encoder": "RealmKnowledgeAugEncoder",
    },
    "RealmForInverseClozeTask": {"embedder": "RealmEmbedder", "query_embedder": "RealmEmbedder"},
    "RealmForOpenQA": {"embedder": "RealmEmbedder", "reader": "RealmReader"},
}
REALM_CLASSES = {
    "RealmEmbedder",
    "RealmScorer",
    "RealmKnowledgeAugEncoder",
    "RealmReader",
    "RealmForOpenQA",
    "RealmForMaskedLM",
    "RealmForInverseClozeTask",
}
# Weight-name prefixes of every part in a root checkpoint, so that the parts not being loaded are dropped quietly.
OTHER_PART = "_other_realm_part"
_ALL_PREFIXES = ("embedder", "query_embedder", "encoder", "reader", "block_emb")
_AUTO_CLASS = {
    "RealmEmbedder": "AutoModel",
    "RealmKnowledgeAugEncoder": "AutoModelForMaskedLM",
    "RealmForMaskedLM": "AutoModelForMaskedLM",
    "RealmForOpenQA": "AutoModelForQuestionAnswering",
}
INDEX_DIR = "index"


def _describe(name: str, path: str) -> str:
    auto = _AUTO_CLASS.get(name)
    return f"{name}.from_pretrained({path!r})" + (f" (or {auto})" if auto else "")


def _part_list(path: str, arch: str) -> str:
    local = os.path.isdir(path)
    items = []
    for sub, part in COMPOSITE_PARTS.get(arch, {}).items():
        if local and os.path.isfile(os.path.join(path, sub, "config.json")):
            items.append(f"{os.path.join(path, sub)} ({part})")
    return "; its parts, each loadable on its own: " + ", ".join(items) if items else ""


def checkpoint_part(cls_name: str, path: str, architectures, share_embedders: bool) -> str | None:
    """The weight-name prefix to load a `cls_name` from a checkpoint saved as `architectures[0]`: `None` when the
    checkpoint is a `cls_name` (or not a known REALM class); raises `ValueError` saying what to load when the
    checkpoint is another REALM model and not one unambiguous part of it."""
    arch = (architectures or [None])[0]
    if arch is None or arch == cls_name or arch not in REALM_CLASSES or cls_name not in REALM_CLASSES:
        return None
    parts = [sub for sub, part in COMPOSITE_PARTS.get(arch, {}).items() if part == cls_name]
    if share_embedders and "query_embedder" in parts:
        parts.remove("query_embedder")  # one embedder serves queries and documents
    if len(parts) == 1:
        return parts[0]
    if len(parts) > 1:
        raise ValueError(
            f"{path} holds a {arch} with separate {' and '.join(parts)} (config.json architectures {architectures}): "
            f"which {cls_name} to load is ambiguous. Load one of {', '.join(os.path.join(path, p) for p in parts)}, "
            f"or the whole model with {_describe(arch, path)}{_part_list(path, arch)}."
        )
    raise ValueError(
        f"{path} holds a {arch} (config.json architectures {architectures}), expected a {cls_name}: loading it as "
        f"{cls_name} would leave every weight randomly initialised. Load it with {_describe(arch, path)}"
        f"{_part_list(path, arch)}."
    )


def part_key_mapping(part: str) -> dict[str, str]:
    """`from_pretrained(key_mapping=...)` that loads the weights under `part.` and sets the other parts aside (their
    names match `RealmPreTrainedModel._keys_to_ignore_on_load_unexpected`, so they are not reported)."""
    others = "|".join(p for p in _ALL_PREFIXES if p != part)
    return {rf"^{part}\.": "", rf"^({others})\b": rf"{OTHER_PART}.\1"}


def restore_attachments(model, path: str, subfolder: str | None, attached: dict) -> None:
    """Attach what was saved beside the model in the local directory `path`, unless the caller passed it: the corpus
    index (`index/`, written by `RealmForMaskedLM.save_pretrained` and `examples/finetune_openqa.py`) and, for
    `RealmForOpenQA`, the retriever (block records and tokenizer)."""
    directory = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(directory):
        return  # a Hub repo: the index is a dataset repo of its own (`RealmBlockIndex.from_pretrained`)
    index_dir = os.path.join(directory, INDEX_DIR)
    if (
        "index" not in attached
        and hasattr(model, "index")
        and os.path.isfile(os.path.join(index_dir, "index_config.json"))
    ):
        from .corpus_index import RealmBlockIndex

        model.index = RealmBlockIndex.from_pretrained(index_dir)
        logger.info(f"restored the corpus index ({len(model.index)} blocks) from {index_dir}")
    if "retriever" not in attached and hasattr(model, "retriever"):
        from .retrieval_realm import BLOCK_RECORDS_NPY, BLOCK_RECORDS_PARQUET, RealmRetriever

        names = (BLOCK_RECORDS_PARQUET, BLOCK_RECORDS_NPY)
        if any(os.path.isfile(os.path.join(directory, name)) for name in names):
            try:
                model.retriever = RealmRetriever.from_pretrained(directory)
            except ValueError as err:  # a 4.x pickle without opt-in: the caller passes the retriever
                logger.warning(f"the retriever in {directory} was not restored: {err}")
            else:
                logger.info(f"restored the retriever ({len(model.retriever.block_records)} blocks) from {directory}")


__all__ = []


ADAPTER_MARKER_NAME = "hf_realm_adapter.json"
"""Written beside a peft adapter's files by the examples: the REALM class the adapter was trained on."""


def check_adapter_target(cls_name: str, path, kwargs: dict) -> None:
    """Refuses to apply a peft adapter trained on one REALM class to another (the Auto classes would load the base
    named in the adapter config, then apply LoRA weights whose module names do not match it, leaving a model that is
    silently not the trained one). ``path`` is what `from_pretrained` was given; transformers' Auto classes pass the
    adapter's own directory in ``adapter_kwargs["_adapter_model_path"]``."""
    import json

    adapter_dir = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")
    if (
        adapter_dir is None
        and path is not None
        and os.path.isfile(os.path.join(os.fspath(path), "adapter_config.json"))
    ):
        adapter_dir = os.fspath(path)
    if adapter_dir is None or not os.path.isdir(os.fspath(adapter_dir)):
        return
    marker = os.path.join(os.fspath(adapter_dir), ADAPTER_MARKER_NAME)
    if not os.path.isfile(marker):
        return
    with open(marker) as f:
        info = json.load(f)
    trained_on = info.get("model_class")
    if trained_on and trained_on != cls_name:
        raise ValueError(
            f"{adapter_dir} is a LoRA adapter trained on {trained_on}, not {cls_name}: applied to {cls_name} its "
            f"weights would not match the model. {info.get('hint', '')}".rstrip()
        )
