"""robustft/report/tuning.py: expected max of n trials on hand-computed cases, its unbiasedness simulated,
and the table/plot read from a tuned sweep's trial records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from robustft.report import tuning


def test_expected_max_hand_computed():
    # n = 1: the mean; n = N: the maximum; n = 2 of {1, 2, 3}: subsets' maxima 2, 3, 3
    assert tuning.expected_max([3, 1, 2], 1) == pytest.approx((2.0, math.sqrt(2 / 3)))
    assert tuning.expected_max([3, 1, 2], 2) == pytest.approx((8 / 3, math.sqrt(2 / 9)))
    assert tuning.expected_max([3, 1, 2], 3) == pytest.approx((3.0, 0.0))
    # ties: pairs of {.5, .5, .7, .9} have maxima .5, .7, .7, .9, .9, .9
    assert tuning.expected_max([0.5, 0.5, 0.7, 0.9], 2)[0] == pytest.approx(4.6 / 6)
    # Dodge et al.'s with-replacement estimator: weights (1/9, 3/9, 5/9) at n = 2
    assert tuning.expected_max([1, 2, 3], 2, "dodge")[0] == pytest.approx(22 / 9)
    with pytest.raises(ValueError):
        tuning.expected_max([1, 2], 3)


def test_unbiased_under_simulation():
    """Uniform(0, 1) scores: E[max of n] = n / (n + 1). Averaged over 4,000 searches of N = 5 trials the
    unbiased estimator hits it at every n; the with-replacement one falls short at n = N."""
    rng = np.random.default_rng(0)
    draws = rng.uniform(size=(4000, 5))
    for n in range(1, 6):
        est = np.mean([tuning.expected_max(list(d), n)[0] for d in draws])
        assert est == pytest.approx(n / (n + 1), abs=0.01)
    dodge = np.mean([tuning.expected_max(list(d), 5, "dodge")[0] for d in draws])
    assert dodge < 5 / 6 - 0.03


def trial(root: Path, arm: str, number: int, status: str, value: float | None, key: str = "validation/accuracy") -> None:
    run = root / "trials" / arm / f"{number:03d}"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"status": status, "main_metric": key, "method": arm, "tag": None}))
    if value is not None:
        (run / "metrics.json").write_text(json.dumps({key: value, "test/accuracy": 0.0}))


def test_table_and_plot_from_trial_records(tmp_path):
    sweep = tmp_path / "sweep"
    for i, v in enumerate([0.6, 0.8, 0.7]):
        trial(sweep, "arm=a", i, "completed", v)
    trial(sweep, "arm=b", 0, "completed", 0.75)
    trial(sweep, "arm=b", 1, "failed", None)
    arms = tuning.load_trials(sweep)
    assert arms["arm=a"]["scores"] == [0.6, 0.8, 0.7] and arms["arm=b"]["failed"] == 1
    section = tuning.write([sweep], tmp_path / "out")
    row_a = next(line for line in section.splitlines() if line.startswith("| arm=a"))
    assert "| 3 | 0 | 0.7000 ± 0.0816 |" in row_a and row_a.endswith("| 0.8000 |")
    assert "| arm=b | arm=b | 2 | 1 | 0.7500 ± 0.0000 |" in section
    assert (tmp_path / "out" / "expected_max.png").stat().st_size > 0
    trial(sweep, "arm=c", 0, "completed", 0.9, key="test/accuracy")
    with pytest.raises(ValueError, match="held-out"):
        tuning.load_trials(sweep)
