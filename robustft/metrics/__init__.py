"""Offline GLUE/SNLI metrics.

``evaluate.load("accuracy")`` (or ``"glue"``) fetches the metric script from the Hugging Face Hub, which
compute nodes cannot reach. So robustft ships its own `evaluate` metric modules, one folder per metric
(``<METRICS_DIR>/<name>/<name>.py``, computed with scikit-learn/SciPy), and loads them by absolute path.

Loading a metric by an absolute local path never touches the network in `evaluate` (no Hub lookup, no
download counter), with or without ``HF_HUB_OFFLINE`` / ``HF_EVALUATE_OFFLINE``, so we deliberately do
not set those variables: they are process-wide and would also change how transformers/datasets behave.
A bare name such as ``"accuracy"`` (or any relative path that does not exist) would query the Hub.

`evaluate` is imported lazily (it takes seconds), so ``main_metric`` and friends are cheap to import.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "GLUE_CONFIGS",
    "GREATER_IS_BETTER",
    "METRICS_DIR",
    "METRIC_NAMES",
    "TASKS",
    "load_metric",
    "main_metric",
    "task_metrics",
]

METRICS_DIR: Path = Path(__file__).resolve().parent
"""Folder holding one sub-folder per metric module, ``METRICS_DIR/<name>/<name>.py``."""

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr", "glue")

GLUE_CONFIGS: tuple[str, ...] = (
    "cola",
    "sst2",
    "mrpc",
    "stsb",
    "qqp",
    "mnli",
    "mnli_mismatched",
    "mnli_matched",
    "qnli",
    "rte",
    "wnli",
    "hans",
    "snli",
)
"""Config names of the ``glue`` metric module (HF's GLUE configs plus ``snli``)."""

TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "snli")
"""The tasks robustft trains on; ``task_metrics`` also accepts the other ``GLUE_CONFIGS``."""

REGRESSION_TASKS: frozenset[str] = frozenset({"stsb"})

GREATER_IS_BETTER = True
"""Every ``main_metric`` (accuracy, MCC, mean of accuracy/F1 or of Pearson/Spearman) is maximised."""

# As in HF's run_glue.py: combined_score where a task reports two metrics.
_MAIN_METRIC = {
    "cola": "matthews_correlation",
    "stsb": "combined_score",
    "mrpc": "combined_score",
    "qqp": "combined_score",
}


@functools.lru_cache(maxsize=64)  # at most ~20 (name, config) pairs exist
def load_metric(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
    """Load the bundled metric module ``name`` (e.g. ``"glue"``, ``config_name="mrpc"``) without network.

    Cached per process: loading copies the script into the HF modules cache and imports it, which is
    far slower than a ``compute``. The module keeps its predictions in memory (``keep_in_memory=True``)
    rather than in Arrow files + file locks under ``~/.cache/huggingface/metrics``, which is faster and
    avoids collisions between concurrent jobs on a shared home directory.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; bundled metrics are {list(METRIC_NAMES)}")
    if name == "glue" and config_name not in GLUE_CONFIGS:
        raise ValueError(f"The glue metric needs config_name in {list(GLUE_CONFIGS)}, got {config_name!r}")
    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():  # never let evaluate fall back to a Hub lookup
        raise FileNotFoundError(f"Metric script {script} is missing (is the package installed completely?)")

    import evaluate

    # The absolute folder path makes evaluate take its local-script branch: no Hub access at all.
    return evaluate.load(str(script.parent), config_name, keep_in_memory=True)


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on GPU; avoids importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _prepare(task: str, predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds, refs = _to_numpy(predictions), _to_numpy(references)
    if task in REGRESSION_TASKS:
        # A regression head outputs shape (n, 1); run_glue.py squeezes it too.
        preds = preds.reshape(-1) if preds.ndim == 2 and preds.shape[1] == 1 else preds
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
    else:
        for what, arr in (("predictions", preds), ("references", refs)):
            if arr.ndim == 1 and np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
                raise ValueError(f"{task}: {what} must be class ids, got non-integer floats")
        if preds.ndim != 1:
            raise ValueError(
                f"{task}: predictions must be a 1-D array of class ids, got shape {preds.shape} "
                "(take the argmax of the logits first)"
            )
        preds, refs = preds.astype(np.int64), refs.astype(np.int64)
    if preds.ndim != 1 or refs.ndim != 1 or len(preds) != len(refs):
        raise ValueError(
            f"{task}: expected 1-D predictions/references of equal length, got {preds.shape}/{refs.shape}"
        )
    return preds, refs


def task_metrics(
    task: str, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """GLUE metric(s) of ``task`` as plain floats, plus ``combined_score`` (their mean) when there are several.

    ``predictions`` are class ids (ints), or scores (floats, shape ``(n,)`` or ``(n, 1)``) for stsb; lists,
    numpy arrays and torch tensors are accepted. ``combined_score`` follows HF's run_glue.py: it is the
    mean of accuracy and F1 for mrpc/qqp and of Pearson and Spearman for stsb. Pearson/Spearman (and so
    ``combined_score``) are nan when the predictions are constant.
    """
    if task not in GLUE_CONFIGS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(GLUE_CONFIGS)}")
    preds, refs = _prepare(task, predictions, references)
    result = load_metric("glue", task).compute(predictions=preds, references=refs)
    scores = {key: float(value) for key, value in result.items()}
    if len(scores) > 1:
        scores["combined_score"] = float(np.mean(list(scores.values())))
    return scores


def main_metric(task: str) -> str:
    """Key of ``task_metrics(task, ...)`` used to select the best checkpoint (always maximised)."""
    if task not in GLUE_CONFIGS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(GLUE_CONFIGS)}")
    return _MAIN_METRIC.get(task, "accuracy")
