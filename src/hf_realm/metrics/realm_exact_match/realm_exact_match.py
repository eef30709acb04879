"""Open-domain QA exact match (SQuAD normalisation) and DrQA regex match, packaged with hf_realm."""

import datasets
import evaluate

from hf_realm.metrics import exact_match, f1_score, regex_match


_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "EMNLP",
    year = "2016",
}
@inproceedings{chen-etal-2017-reading,
    title = "Reading {W}ikipedia to Answer Open-Domain Questions",
    author = "Chen, Danqi and Fisch, Adam and Weston, Jason and Bordes, Antoine",
    booktitle = "ACL",
    year = "2017",
}
"""

_DESCRIPTION = """\
Exact match for open-domain QA as REALM / ORQA / DrQA report it. With match="string" a prediction is right when it
equals one of the gold answers after SQuAD's official normalisation (lower case, no punctuation, no a/an/the, single
spaces); token F1 is reported too. With match="regex" (CuratedTREC) each reference is a regular expression, matched
case-insensitively at the start of the raw prediction, as DrQA's regex_match_score does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Predicted answers.
    references (`list` of `list` of `str`, or `list` of `str`): Gold answers (or patterns) per prediction.
    match (`str`, defaults to `"string"`): `"string"` or `"regex"`.
    normalize_regex_prediction (`bool`, defaults to `False`): Normalise the prediction before regex matching.
Returns:
    exact_match (`float`): Fraction of predictions that match, in [0, 1].
    f1 (`float`): Mean SQuAD token F1 (match="string" only).
Examples:
    >>> import evaluate
    >>> from hf_realm.metrics import metric_path
    >>> em = evaluate.load(metric_path("exact_match"))
    >>> em.compute(predictions=["The Broncos", "Paris"], references=[["Denver Broncos", "broncos"], ["Lyon"]])
    {'exact_match': 0.5, 'f1': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RealmExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/facebookresearch/DrQA", "https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references, match="string", normalize_regex_prediction=False):
        if match not in ("string", "regex"):
            raise ValueError(f"match must be 'string' or 'regex', got {match!r}")
        if not predictions:
            raise ValueError("no predictions")
        n = len(predictions)
        if match == "regex":
            hits = [
                regex_match(p, r, normalize=normalize_regex_prediction)
                for p, r in zip(predictions, references, strict=True)
            ]
            return {"exact_match": sum(hits) / n}
        return {
            "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
            "f1": sum(f1_score(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        }
