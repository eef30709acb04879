#!/usr/bin/env python
"""How often REALM pretraining's masked spans can be found elsewhere: for every sentence of a corpus (as
`build_pretraining_examples` splits it) and every salient span in it, whether the span's text (lower-cased) occurs in
another block than the sentence's own (REALM drops that one from retrieval).

A string match is an upper bound on what retrieval can give: a common year or name may occur in a block that says
nothing about the sentence's fact.

    python examples/prepare_squad_open.py --output_dir data/squad_wiki --dev_fraction 0.1 \\
        --distractors ../shared/data/wikitext-2/valid.txt,../shared/data/wikitext-2/test.txt
    python benchmarks/span_overlap.py --corpus data/squad_wiki/corpus.jsonl --first_blocks 2067

Prints the shares and writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def main(argv=None) -> dict:
    import datasets

    from hf_realm.masking import find_salient_spans
    from hf_realm.pretraining_data import corpus_sentences

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus.jsonl with block_id and text")
    p.add_argument("--first_blocks", type=int, default=None, help="Also report sentences of blocks 0..N-1 alone.")
    p.add_argument("--output", default="outputs/span_overlap.json")
    args = p.parse_args(argv)
    with open(args.corpus) as f:
        docs = [json.loads(line) for line in f]
    corpus = datasets.Dataset.from_dict({"block_id": [d["block_id"] for d in docs], "text": [d["text"] for d in docs]})
    sentences = corpus_sentences(corpus)
    texts = [d["text"].lower() for d in docs]
    cache: dict[str, list[int]] = {}

    def blocks_with(span: str) -> list[int]:
        if span not in cache:
            cache[span] = [i for i, t in enumerate(texts) if span in t]
        return cache[span]

    counts = {"all": [0, 0, 0, 0], "first": [0, 0, 0, 0]}  # spans, found elsewhere, sentences, with one found
    for text, source in zip(sentences["text"], sentences["source_block_id"], strict=True):
        spans = find_salient_spans(text)
        if not spans:
            continue
        found = [any(b != source for b in blocks_with(text[s.start : s.end].lower())) for s in spans]
        groups = ["all"] + (["first"] if args.first_blocks and source < args.first_blocks else [])
        for group in groups:
            c = counts[group]
            c[0] += len(spans)
            c[1] += sum(found)
            c[2] += 1
            c[3] += any(found)
    result = {"corpus": args.corpus, "blocks": len(docs), "sentences": len(sentences)}
    for group, (spans, found, sents, any_found) in counts.items():
        if spans:
            result[group] = {
                "sentences_with_salient_spans": sents,
                "salient_spans": spans,
                "share_of_spans_in_another_block": found / spans,
                "share_of_sentences_with_such_a_span": any_found / sents,
            }
            print(f"{group:5s}: {sents:,} sentences, {spans:,} salient spans; in another block: {found / spans:.3f} of "
                  f"the spans, {any_found / sents:.3f} of the sentences have one")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
