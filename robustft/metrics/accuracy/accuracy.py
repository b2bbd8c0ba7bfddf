"""Accuracy metric: the fraction of predictions equal to their reference.

An offline copy of the Hugging Face `accuracy` metric (``evaluate.load("accuracy")`` needs the Hub);
the computation is delegated to :func:`sklearn.metrics.accuracy_score`.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): Ground-truth class ids.
    normalize (`bool`): If False, return the number of correct predictions instead of the fraction.
        Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    accuracy (`float`): in [0, 1] (or a count when `normalize=False`); higher is better.

Examples:
    >>> accuracy = evaluate.load("robustft/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy via scikit-learn, shipped with robustft so that it loads without network access."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
            # numpy arrays (not Python lists) are handed to _compute: much faster for large eval sets.
            format="numpy",
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
