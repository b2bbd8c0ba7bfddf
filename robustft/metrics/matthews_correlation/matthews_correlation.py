"""Matthews correlation coefficient (MCC), the official GLUE metric for CoLA.

An offline copy of the Hugging Face `matthews_correlation` metric (``evaluate.load`` of it needs the Hub);
the computation is delegated to :func:`sklearn.metrics.matthews_corrcoef`.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = """\
The Matthews correlation coefficient is a balanced measure of the quality of (binary or multiclass)
classifications, usable even when the classes are of very different sizes. It ranges from -1 (total
disagreement) through 0 (no better than chance, e.g. a constant prediction) to +1 (perfect prediction).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): Ground-truth class ids.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    matthews_correlation (`float`): in [-1, 1]; higher is better.

Examples:
    >>> mcc = evaluate.load("robustft/metrics/matthews_correlation")
    >>> mcc.compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])["matthews_correlation"]
    0.5384615384615384
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
class MatthewsCorrelation(evaluate.Metric):
    """MCC via scikit-learn, shipped with robustft so that it loads without network access."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"
            ],
            # numpy arrays (not Python lists) are handed to _compute: much faster for large eval sets.
            format="numpy",
        )

    def _compute(self, predictions, references, sample_weight=None):
        score = matthews_corrcoef(references, predictions, sample_weight=sample_weight)
        return {"matthews_correlation": float(score)}
