"""Task metrics: each task config names its metrics, computed by the `evaluate` modules robustft ships.

A task YAML (conf/task/*.yaml) declares them, as lm-evaluation-harness task files do::

    metrics: [accuracy, f1]        # metric modules, computed on every evaluated split
    main_metric: combined_score    # the key that picks the best checkpoint and drives early stopping

Each name is a module ``METRICS_DIR/<name>/<name>.py`` that returns ``{<name>: value}``; with several
metrics ``combined_score``, their mean (HF's run_glue.py), is added and may be the main metric. Every
main metric is maximised.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub, which compute nodes
cannot reach. So robustft ships its own modules (computed with scikit-learn/SciPy) and loads them by
absolute path. Loading a metric by an absolute local path never touches the network in `evaluate` (no
Hub lookup, no download counter), with or without ``HF_HUB_OFFLINE`` / ``HF_EVALUATE_OFFLINE``, so we
deliberately do not set those variables: they are process-wide and would also change how
transformers/datasets behave. A bare name such as ``"accuracy"`` (or any relative path that does not
exist) would query the Hub.

`evaluate` is imported lazily (it takes seconds), so ``main_metric`` is cheap to import.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustft.errors import UserError

if TYPE_CHECKING:
    import evaluate

__all__ = ["COMBINED", "METRICS_DIR", "METRIC_NAMES", "load_metric", "main_metric", "task_metrics"]

METRICS_DIR: Path = Path(__file__).resolve().parent
"""Folder holding one sub-folder per metric module, ``METRICS_DIR/<name>/<name>.py``."""

METRIC_NAMES: tuple[str, ...] = tuple(sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file()))
"""The metric modules a task may name."""

COMBINED = "combined_score"
"""The mean of a task's metrics when it has several (HF run_glue.py's main metric for MRPC, QQP, STS-B)."""


@functools.lru_cache(maxsize=16)  # one entry per shipped module
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load the bundled metric module ``name`` (e.g. ``"f1"``) without network.

    Cached per process: loading copies the script into the HF modules cache and imports it, which is
    far slower than a ``compute``. The module keeps its predictions in memory (``keep_in_memory=True``)
    rather than in Arrow files + file locks under ``~/.cache/huggingface/metrics``, which is faster and
    avoids collisions between concurrent jobs on a shared home directory.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; bundled metrics are {list(METRIC_NAMES)}")
    import evaluate

    # The absolute folder path makes evaluate take its local-script branch: no Hub access at all.
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def _metric_names(task: Mapping[str, Any]) -> list[str]:
    """The task's `metrics`, each a shipped module (a one-line UserError otherwise)."""
    names = list(task.get("metrics") or [])
    if not names:
        raise UserError(f"task {task.get('name')} names no metrics; set task.metrics, e.g. [accuracy] "
                        f"(modules: {', '.join(METRIC_NAMES)})")
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise UserError(f"task.metrics of {task.get('name')}: unknown metric '{unknown[0]}'; choose from "
                        f"{', '.join(METRIC_NAMES)} (robustft/metrics/<name>/<name>.py)")
    return names


def main_metric(task: Mapping[str, Any]) -> str:
    """The task's `main_metric`, checked to be one of the keys `task_metrics` returns (always maximised)."""
    names = _metric_names(task)
    keys = [*names, COMBINED] if len(names) > 1 else names
    main = task.get("main_metric")
    if main not in keys:
        raise UserError(f"task.main_metric={main} of {task.get('name')} is not one of its metrics; "
                        f"choose from {', '.join(keys)}")
    return str(main)


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on GPU; avoids importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _prepare(task: str, is_regression: bool, predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds, refs = _to_numpy(predictions), _to_numpy(references)
    if is_regression:
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
    task: Mapping[str, Any], predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """The task's metrics (its config's `metrics`) as plain floats, plus ``combined_score`` when there are several.

    ``predictions`` are class ids (ints), or scores (floats, shape ``(n,)`` or ``(n, 1)``) for a
    regression task (``task.is_regression``); lists, numpy arrays and torch tensors are accepted.
    Pearson/Spearman (and so ``combined_score``) are nan when the predictions are constant.
    """
    names = _metric_names(task)
    preds, refs = _prepare(str(task.get("name")), bool(task.get("is_regression")), predictions, references)
    scores = {name: float(load_metric(name).compute(predictions=preds, references=refs)[name]) for name in names}
    if len(scores) > 1:
        scores[COMBINED] = float(np.mean(list(scores.values())))
    return scores
