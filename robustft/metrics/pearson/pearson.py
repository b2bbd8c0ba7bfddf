"""Pearson correlation coefficient, one of the two GLUE metrics for STS-B.

An offline copy of the Hugging Face `pearsonr` metric (``evaluate.load("pearsonr")`` needs the Hub);
the computation is delegated to :func:`scipy.stats.pearsonr`. Named `pearson`, the key GLUE reports
(HF's `glue` metric and run_glue.py: `pearson`, `spearmanr`), since a robustft metric module returns its
own name as the key. SciPy is called as pearsonr(predictions, references), the order HF's `glue` uses.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr

_DESCRIPTION = """\
Pearson's r measures the linear relationship between predictions and references. It ranges from -1
(perfect negative linear relationship) to +1 (perfect positive one); 0 means no linear relationship.
It is undefined (nan) when either input is constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted scores.
    references (`list` of `float`): Ground-truth scores.
    return_pvalue (`bool`): If True, also return the two-sided p-value. Defaults to False.

Returns:
    pearson (`float`): in [-1, 1]; higher is better.
    p-value (`float`): only when `return_pvalue=True`.

Examples:
    >>> pearson = evaluate.load("robustft/metrics/pearson")
    >>> round(pearson.compute(predictions=[10, 9, 2.5, 6, 4], references=[1, 2, 3, 4, 5])["pearson"], 2)
    -0.74
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
class Pearson(evaluate.Metric):
    """Pearson's r via SciPy, shipped with robustft so that it loads without network access."""

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
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = pearsonr(np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64))
        if return_pvalue:
            return {"pearson": float(result[0]), "p-value": float(result[1])}
        return {"pearson": float(result[0])}
