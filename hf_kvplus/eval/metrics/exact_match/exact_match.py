"""Exact match, shipped with hf_kvplus so it loads offline: ``evaluate.load(path_to_this_folder)``.

The score is the share of predictions equal to their reference after stripping surrounding
whitespace (``evaluate.load("exact_match")`` would fetch a script from the Hub at run time).
"""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference, surrounding whitespace ignored."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]`): expected answers.
Returns:
    exact_match (`float`): between 0 and 1.
Example:
    >>> metric = evaluate.load(folder)
    >>> metric.compute(predictions=["71432", "1"], references=["71432", "2"])
    {'exact_match': 0.5}
"""


class ExactMatch(evaluate.Metric):
    """Exact string match after ``strip()``."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"exact_match": 0.0}
        matches = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / len(matches)}
