"""F1 metric: harmonic mean of precision and recall.

An offline copy of the Hugging Face `f1` metric (``evaluate.load("f1")`` needs the Hub);
the computation is delegated to :func:`sklearn.metrics.f1_score`.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = """\
The F1 score is the harmonic mean of precision and recall:
F1 = 2 * (precision * recall) / (precision + recall).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): Ground-truth class ids.
    labels (`list` of `int`): Labels to include when `average != 'binary'` and their order when
        `average=None`. Defaults to None (all labels present, sorted).
    pos_label (`int`): The positive class when `average='binary'`. Defaults to 1.
    average (`str` or None): 'binary' (default), 'micro', 'macro', 'weighted', or None for per-class scores.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
    zero_division (`"warn"`, 0.0, 1.0 or nan): Value returned when precision or recall is undefined
        (e.g. no positive predictions). Defaults to 0.0: the value of sklearn's and HF's default "warn",
        without a warning at every evaluation of an early checkpoint that never predicts the positive class.

Returns:
    f1 (`float`, or an array of per-class floats when `average=None`): in [0, 1]; higher is better.

Examples:
    >>> f1 = evaluate.load("robustft/metrics/f1")
    >>> f1.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0])
    {'f1': 0.5}
    >>> f1.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 2, 1, 0, 0, 1], average="macro")["f1"]
    0.26666666666666666
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
class F1(evaluate.Metric):
    """F1 via scikit-learn, shipped with robustft so that it loads without network access."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
            # numpy arrays (not Python lists) are handed to _compute: much faster for large eval sets.
            format="numpy",
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division=0.0,
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        # Same convention as HF's f1: a float for averaged scores, an array of per-class scores otherwise.
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score)}
