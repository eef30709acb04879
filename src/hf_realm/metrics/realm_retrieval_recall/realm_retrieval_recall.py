"""Top-k retrieval recall for REALM / open-domain QA, packaged with hf_realm."""

import datasets
import evaluate

from hf_realm.metrics import DEFAULT_RECALL_KS, answer_hits, gold_block_hits, recall_at_k


_CITATION = """\
@inproceedings{chen-etal-2017-reading,
    title = "Reading {W}ikipedia to Answer Open-Domain Questions",
    author = "Chen, Danqi and Fisch, Adam and Weston, Jason and Bordes, Antoine",
    booktitle = "ACL",
    year = "2017",
}
@inproceedings{guu2020realm,
    title = "{REALM}: Retrieval-Augmented Language Model Pre-Training",
    author = "Guu, Kelvin and Lee, Kenton and Tung, Zora and Pasupat, Panupong and Chang, Ming-Wei",
    booktitle = "ICML",
    year = "2020",
}
"""

_DESCRIPTION = """\
Top-k retrieval recall: the fraction of queries with a relevant block among the first k retrieved. Two input forms:
retrieved block ids (ranked) against one gold block id per query (gold-block recall), or retrieved block texts
(ranked) against the query's answers (answer recall, DrQA's has_answer: the answer's tokens occur in the block after
NFD normalisation, uncased; or, with match="regex", the pattern is found in the block).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`, or `list` of `list` of `str`): Ranked retrieved block ids or texts.
    references (`list` of `int`, or `list` of `list` of `str`): Gold block id, or gold answers, per query.
    ks (`list` of `int`, defaults to `[1, 5, 20, 100]`): Cut-offs; those above the longest retrieved list are
        left out.
    match (`str`, defaults to `"string"`): For texts: `"string"` or `"regex"`.
Returns:
    `recall@k` (`float`) for each k, in [0, 1].
Examples:
    >>> import evaluate
    >>> from hf_realm.metrics import metric_path
    >>> recall = evaluate.load(metric_path("retrieval_recall"))
    >>> recall.compute(predictions=[[4, 2, 7], [1, 3, 5]], references=[2, 9], ks=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RealmRetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
            ],
            reference_urls=["https://github.com/facebookresearch/DrQA"],
        )

    def _compute(self, predictions, references, ks=DEFAULT_RECALL_KS, match="string"):
        if not predictions:
            raise ValueError("no predictions")
        if isinstance(references[0], int):
            hits = gold_block_hits(predictions, references)
        else:
            hits = answer_hits(predictions, references, match=match)
        return recall_at_k(hits, ks)
