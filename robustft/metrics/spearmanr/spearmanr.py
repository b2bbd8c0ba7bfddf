"""Spearman rank correlation coefficient, one of the two GLUE metrics for STS-B.

An offline copy of the Hugging Face `spearmanr` metric (``evaluate.load("spearmanr")`` needs the Hub);
the computation is delegated to :func:`scipy.stats.spearmanr`.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import spearmanr

_DESCRIPTION = """\
Spearman's rho is the Pearson correlation of the ranks of predictions and references: it measures how
well their relationship is described by a monotonic function. It ranges from -1 to +1; 0 means no
monotonic relationship. It is undefined (nan) when either input is constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted scores.
    references (`list` of `float`): Ground-truth scores.
    return_pvalue (`bool`): If True, also return the two-sided p-value. Defaults to False.

Returns:
    spearmanr (`float`): in [-1, 1]; higher is better.
    spearmanr_pvalue (`float`): only when `return_pvalue=True`.

Examples:
    >>> spearman = evaluate.load("robustft/metrics/spearmanr")
    >>> spearman.compute(references=[1, 2, 3, 4, 5], predictions=[10, 9, 2.5, 6, 4])
    {'spearmanr': -0.7}
"""

_CITATION = """\
@article{2020SciPy-NMeth,
  author  = {Virtanen, Pauli and others},
  title   = {{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python},
  journal = {Nature Methods},
  year    = {2020},
  volume  = {17},
  pages   = {261--272}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
    """Spearman's rho via SciPy, shipped with robustft so that it loads without network access."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 (HF uses float32) so that the result equals scipy on the caller's float64 data.
            # No format="numpy": datasets' numpy formatter would silently downcast floats to float32.
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=[
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html"
            ],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = spearmanr(
            np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        )
        if return_pvalue:
            return {"spearmanr": float(result[0]), "spearmanr_pvalue": float(result[1])}
        return {"spearmanr": float(result[0])}
