"""GLUE benchmark metric (plus SNLI): the official metric(s) of each task, selected by config name.

An offline copy of the Hugging Face `glue` metric (``evaluate.load("glue", ...)`` needs the Hub), with
the same config names and outputs, plus an `snli` config (3-way accuracy, like MNLI). The computation
is delegated to scikit-learn and SciPy.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  note={In the Proceedings of ICLR.},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE, the General Language Understanding Evaluation benchmark (https://gluebenchmark.com/), is a
collection of resources for training, evaluating, and analyzing natural language understanding systems.
This module computes the metric(s) GLUE reports for one task (the config name).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (`int`), or predicted scores (`float`) for `stsb`.
    references: ground-truth class ids (`int`), or gold scores (`float`) for `stsb`.
Returns: depending on the config name:
    cola: {"matthews_correlation"}
    stsb: {"pearson", "spearmanr"}
    mrpc, qqp: {"accuracy", "f1"} (F1 of the positive class 1)
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans, snli: {"accuracy"}
Examples:
    >>> glue = evaluate.load("robustft/metrics/glue", "mrpc")
    >>> glue.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

_ACCURACY_CONFIGS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans", "snli")
_CONFIGS = ("cola", "stsb", "mrpc", "qqp", *_ACCURACY_CONFIGS)


def _accuracy(predictions, references):
    return float(accuracy_score(references, predictions))


def _acc_and_f1(predictions, references):
    # zero_division=0.0 gives the same value as sklearn's default ("warn") but without a warning per
    # evaluation when an early checkpoint never predicts the positive class.
    return {
        "accuracy": _accuracy(predictions, references),
        "f1": float(f1_score(references, predictions, zero_division=0.0)),
    }


def _pearson_and_spearman(predictions, references):
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE task metrics via scikit-learn/SciPy, shipped with robustft so that they load offline."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise KeyError(f"You should supply a configuration name selected in {list(_CONFIGS)}")
        # float64 for stsb (HF uses float32) so that the result equals scipy on the caller's float64 data;
        # and then no format="numpy", whose formatter would silently downcast floats to float32.
        is_regression = self.config_name == "stsb"
        dtype = "float64" if is_regression else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            format=None if is_regression else "numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return _pearson_and_spearman(predictions, references)
        if self.config_name in ("mrpc", "qqp"):
            return _acc_and_f1(predictions, references)
        if self.config_name in _ACCURACY_CONFIGS:
            return {"accuracy": _accuracy(predictions, references)}
        raise KeyError(f"You should supply a configuration name selected in {list(_CONFIGS)}")
