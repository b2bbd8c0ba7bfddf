"""The bundled offline metric modules (robustft/metrics) against direct scikit-learn/SciPy calls, and the
task configs' `metrics` / `main_metric` computed through them."""

from __future__ import annotations

import math
import warnings

import evaluate
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from robustft.cli import CONF_DIR
from robustft.metrics import COMBINED, load_metric, main_metric, task_metrics

SIZES = (2, 11, 257, 2000)
SEEDS = (0, 1)
TASKS = tuple(sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")))
CLASSIFICATION_TASKS = tuple(t for t in TASKS if t != "stsb")
EXACT = {"rel": 1e-12, "abs": 1e-12}


def approx(value: float) -> object:
    return pytest.approx(value, nan_ok=True, **EXACT)


def sklearn_quiet(fn, *args, **kwargs):
    """Reference call with sklearn/scipy's 'ill-defined metric' warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def int_data(seed: int, n: int, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, num_classes, n)
    # Mostly-correct predictions so that scores are far from chance and from each other.
    preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, num_classes, n))
    return preds, refs


def float_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    refs = rng.uniform(0.0, 5.0, n)
    preds = refs + rng.normal(0.0, 1.5, n)
    return preds, refs


def task(name: str):
    return OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")


# ---------------------------------------------------------------------- single metrics vs sklearn/scipy


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_accuracy_matches_sklearn(seed, n, num_classes):
    preds, refs = int_data(seed, n, num_classes)
    metric = load_metric("accuracy")
    assert metric.compute(predictions=preds, references=refs) == {
        "accuracy": approx(accuracy_score(refs, preds))
    }
    weights = np.random.default_rng(seed).random(n)
    got = metric.compute(predictions=preds, references=refs, sample_weight=weights)["accuracy"]
    assert got == approx(accuracy_score(refs, preds, sample_weight=weights))
    got = metric.compute(predictions=preds, references=refs, normalize=False)["accuracy"]
    assert got == accuracy_score(refs, preds, normalize=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_f1_binary_matches_sklearn(seed, n):
    preds, refs = int_data(seed, n)
    metric = load_metric("f1")
    for pos_label in (1, 0):
        got = sklearn_quiet(metric.compute, predictions=preds, references=refs, pos_label=pos_label)["f1"]
        assert got == approx(sklearn_quiet(f1_score, refs, preds, pos_label=pos_label))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_f1_multiclass_averages_match_sklearn(seed, n):
    preds, refs = int_data(seed, n, num_classes=3)
    metric = load_metric("f1")
    for average in ("macro", "micro", "weighted"):
        got = sklearn_quiet(metric.compute, predictions=preds, references=refs, average=average)["f1"]
        assert isinstance(got, float)
        assert got == approx(sklearn_quiet(f1_score, refs, preds, average=average))
    per_class = sklearn_quiet(
        metric.compute, predictions=preds, references=refs, average=None, labels=[0, 1, 2]
    )
    expected = sklearn_quiet(f1_score, refs, preds, average=None, labels=[0, 1, 2])
    np.testing.assert_allclose(per_class["f1"], expected, rtol=1e-12)


def test_f1_edge_cases():
    metric = load_metric("f1")
    refs = np.array([0, 1, 0, 1, 1])
    no_positive_preds = np.zeros(5, dtype=int)
    assert metric.compute(predictions=no_positive_preds, references=refs)["f1"] == 0.0
    assert sklearn_quiet(f1_score, refs, no_positive_preds) == 0.0
    # Nothing positive at all: ill-defined; zero_division decides: 0.0 by default, sklearn's default
    # value, without sklearn's warning (one per evaluation of an early checkpoint otherwise).
    all_negative = np.zeros(5, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)
        assert metric.compute(predictions=all_negative, references=all_negative)["f1"] == 0.0
    with pytest.warns(UndefinedMetricWarning):
        assert metric.compute(predictions=all_negative, references=all_negative, zero_division="warn")["f1"] == 0.0
    got = metric.compute(predictions=all_negative, references=all_negative, zero_division=1.0)["f1"]
    assert got == 1.0
    assert metric.compute(predictions=refs, references=refs)["f1"] == 1.0


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_matthews_correlation_matches_sklearn(seed, n, num_classes):
    preds, refs = int_data(seed, n, num_classes)
    got = load_metric("matthews_correlation").compute(predictions=preds, references=refs)
    assert got == {"matthews_correlation": approx(matthews_corrcoef(refs, preds))}


def test_matthews_correlation_edge_cases():
    metric = load_metric("matthews_correlation")
    refs = np.array([0, 1, 1, 0, 1, 0, 0])
    for constant in (0, 1):
        same = np.full_like(refs, constant)
        assert metric.compute(predictions=same, references=refs)["matthews_correlation"] == 0.0
    assert metric.compute(predictions=refs, references=refs)["matthews_correlation"] == approx(1.0)
    assert metric.compute(predictions=1 - refs, references=refs)["matthews_correlation"] == approx(-1.0)
    weights = np.linspace(0.1, 1.0, len(refs))
    preds = np.array([0, 1, 0, 0, 1, 1, 0])
    got = metric.compute(predictions=preds, references=refs, sample_weight=weights)["matthews_correlation"]
    assert got == approx(matthews_corrcoef(refs, preds, sample_weight=weights))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", (3, 11, 257, 2000))
def test_correlations_match_scipy(seed, n):
    preds, refs = float_data(seed, n)
    pearson = load_metric("pearson").compute(predictions=preds, references=refs, return_pvalue=True)
    expected = pearsonr(preds, refs)
    assert pearson == {"pearson": approx(expected[0]), "p-value": approx(expected[1])}
    spearman = load_metric("spearmanr").compute(predictions=preds, references=refs, return_pvalue=True)
    expected = spearmanr(preds, refs)
    assert spearman == {"spearmanr": approx(expected[0]), "spearmanr_pvalue": approx(expected[1])}
    # With ties (integer-valued scores), and without p-values.
    tied = np.round(preds)
    assert load_metric("spearmanr").compute(predictions=tied, references=refs) == {
        "spearmanr": approx(spearmanr(tied, refs)[0])
    }
    assert load_metric("pearson").compute(predictions=tied, references=refs) == {
        "pearson": approx(pearsonr(tied, refs)[0])
    }


def test_correlations_keep_float64_precision():
    # datasets' "numpy" format would downcast to float32; these values differ only beyond float32 precision.
    preds = np.array([1.0, 1.0 + 1e-9, 1.0 + 3e-9, 1.0 + 2e-9])
    refs = np.array([0.0, 1.0, 3.0, 2.0])
    got = load_metric("pearson").compute(predictions=preds, references=refs)["pearson"]
    assert got == approx(pearsonr(preds, refs)[0])
    assert got > 0.99


def test_correlations_of_constant_predictions_are_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("pearson", "spearmanr"):
            result = load_metric(name).compute(predictions=[2.0, 2.0, 2.0], references=[1.0, 2.0, 3.0])
            assert math.isnan(result[name])


# ------------------------------------------------------------------------- task configs -> metrics

# GLUE's conventions (HF run_glue.py: combined_score where a task reports two metrics)
GLUE = {
    "cola": (["matthews_correlation"], "matthews_correlation"),
    "stsb": (["pearson", "spearmanr"], COMBINED),
    "mrpc": (["accuracy", "f1"], COMBINED),
    "qqp": (["accuracy", "f1"], COMBINED),
}
REFERENCE = {  # each module against the library call it wraps
    "accuracy": lambda p, r: accuracy_score(r, p),
    "f1": lambda p, r: sklearn_quiet(f1_score, r, p),
    "matthews_correlation": lambda p, r: matthews_corrcoef(r, p),
    "pearson": lambda p, r: pearsonr(p, r)[0],
    "spearmanr": lambda p, r: spearmanr(p, r)[0],
}


def task_data(name: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = task(name)
    return float_data(seed, n) if t.is_regression else int_data(seed, n, num_classes=len(t.label_names))


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_follow_glue_conventions(name):
    t = task(name)
    assert (list(t.metrics), t.main_metric) == GLUE.get(name, (["accuracy"], "accuracy"))
    assert main_metric(t) == t.main_metric


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("name", TASKS)
def test_task_metrics_match_sklearn_scipy_and_combined_score(name):
    t = task(name)
    for seed in SEEDS:
        for n in (3, 11, 257, 2000):
            preds, refs = task_data(name, seed, n)
            got = task_metrics(t, preds, refs)
            expected = {m: float(REFERENCE[m](preds, refs)) for m in t.metrics}
            if len(expected) > 1:
                expected[COMBINED] = sum(expected.values()) / len(expected)
            assert got == {key: approx(value) for key, value in expected.items()}
            assert list(got) == list(expected)  # the config's order, combined_score last
            assert all(type(value) is float for value in got.values())
            assert main_metric(t) in got
    # Plain Python lists work too.
    assert task_metrics(t, preds.tolist(), refs.tolist()) == {key: approx(v) for key, v in got.items()}


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_constant_predictions_give_zero_without_warnings(name):
    refs = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1])
    preds = np.zeros_like(refs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)  # no warning spam during training
        got = task_metrics(task(name), preds, refs)
    assert got["accuracy" if "accuracy" in got else "matthews_correlation"] == approx(
        accuracy_score(refs, preds) if "accuracy" in got else 0.0)
    if "f1" in got:
        assert got["f1"] == 0.0


def test_combined_score_values():
    got = task_metrics(task("mrpc"), [1, 1, 0, 0], [1, 0, 0, 0])
    assert got == {"accuracy": 0.75, "f1": approx(2 / 3), "combined_score": approx((0.75 + 2 / 3) / 2)}
    got = task_metrics(task("stsb"), [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert got == {"pearson": approx(1.0), "spearmanr": approx(1.0), "combined_score": approx(1.0)}
    assert "combined_score" not in task_metrics(task("cola"), [1, 0], [1, 0])
    assert "combined_score" not in task_metrics(task("sst2"), [1, 0], [1, 0])


def test_stsb_keeps_float_inputs():
    preds = [0.25, 1.5, 2.75, 4.125, 3.0]
    refs = [0.0, 2.0, 2.5, 5.0, 3.5]
    got = task_metrics(task("stsb"), preds, refs)
    assert {k: got[k] for k in ("pearson", "spearmanr")} == {
        "pearson": approx(pearsonr(preds, refs)[0]),
        "spearmanr": approx(spearmanr(preds, refs)[0]),
    }


def test_task_metrics_input_handling():
    preds, refs = float_data(seed=0, n=50)
    column = task_metrics(task("stsb"), preds[:, None], refs)  # regression head output, shape (n, 1)
    assert column == task_metrics(task("stsb"), preds, refs)
    # Integer-valued floats are fine as class ids; logits or fractional values are not.
    assert task_metrics(task("rte"), np.array([0.0, 1.0, 1.0]), [0, 1, 0])["accuracy"] == approx(2 / 3)
    with pytest.raises(ValueError, match="argmax"):
        task_metrics(task("sst2"), np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="class ids"):
        task_metrics(task("sst2"), [0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match="equal length"):
        task_metrics(task("sst2"), [0, 1, 1], [0, 1])


def test_task_metrics_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    got = task_metrics(task("qqp"), torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1]))
    assert got["accuracy"] == 0.75
    got = task_metrics(task("stsb"), torch.tensor([[0.5], [1.5], [2.0]]), torch.tensor([0.0, 1.0, 3.0]))
    assert got["pearson"] == pytest.approx(pearsonr([0.5, 1.5, 2.0], [0.0, 1.0, 3.0])[0], rel=1e-6)


def test_task_metrics_loads_each_module_once(monkeypatch):
    """Evaluation calls task_metrics at every eval step: after the first call no module is loaded again
    (a load parses the module's script). Speed itself is not asserted here; no test times anything."""
    preds, refs = int_data(seed=0, n=10_000)
    fpreds, frefs = float_data(seed=0, n=10_000)
    tasks = {name: task(name) for name in ("cola", "mrpc", "stsb")}
    first = {name: task_metrics(t, fpreds if name == "stsb" else preds, frefs if name == "stsb" else refs)
             for name, t in tasks.items()}

    def refuse(*args, **kwargs):
        raise AssertionError(f"evaluate.load called again: {args!r}")

    monkeypatch.setattr(evaluate, "load", refuse)
    assert task_metrics(tasks["cola"], preds, refs) == first["cola"]
    assert task_metrics(tasks["mrpc"], preds, refs) == first["mrpc"]
    assert task_metrics(tasks["stsb"], fpreds, frefs) == first["stsb"]
