"""robustft-report's example-level statistics: hand-computed McNemar and crossed-test cases, the mark under
the null (simulated trees, fixed seed) and with a known effect, the MDD, and CI ends compared with 0 exactly."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from robustft.report import stats
from robustft.report.stats_examples import compare_examples, crossed_test, mcnemar, outcome_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import stats_null  # noqa: E402


def test_mcnemar_hand_computed() -> None:
    # b = 8 discordant pairs for the method, c = 2 for the baseline: p = 2 P(X <= 2 | 10, 1/2)
    # = 2 (1 + 10 + 45) / 1024 = 0.109375; concordant pairs (0) do not count
    x = np.array([1] * 8 + [-1] * 2 + [0] * 50)
    assert mcnemar(x) == pytest.approx(112 / 1024)
    assert mcnemar(np.array([1, -1, 1, -1, 0])) == 1.0      # b = c
    assert mcnemar(np.zeros(7)) == 1.0                      # no discordant pair
    assert mcnemar(np.array([1] * 6)) == pytest.approx(2 / 64)  # 6 of 6: 2 / 2^6


def test_crossed_test_hand_computed() -> None:
    # x = [[1,0,0],[1,1,0]]: D = 0.5; rows 1/3, 2/3 -> MS_a = 3 (1/36 + 1/36) = 1/6; columns 1, .5, 0 ->
    # MS_b = 2 (.25 + 0 + .25) / 2 = 0.5; residuals +-1/6, +-1/3 -> SS_e = 1/3, MS_e = 1/6 (df 2).
    # MS_a is not above MS_e: the seed component is 0, so S N Var = MS_b = 0.5, se = sqrt(0.5 / 6),
    # df = 0.5^2 / (0.5^2 / 2) = 2, t = 0.5 / sqrt(1/12) = sqrt(3), two-sided p (df 2) = 1 - t / sqrt(2 + t^2)
    res = crossed_test(np.array([[1, 0, 0], [1, 1, 0]]))
    assert res.diff == 0.5 and res.se == pytest.approx(math.sqrt(1 / 12)) and res.df == pytest.approx(2)
    assert res.p == pytest.approx(1 - math.sqrt(3) / math.sqrt(5))


def test_crossed_test_reduces_to_the_one_sample_t_tests() -> None:
    # identical seeds (no seed variance): the t-test over the examples' mean outcomes, df N - 1
    row = np.array([1, 0, 0, 1, -1, 1, 0, 1])
    res = crossed_test(np.tile(row, (3, 1)))
    assert res.df == pytest.approx(len(row) - 1)
    assert res.p == pytest.approx(sps.ttest_1samp(row, 0).pvalue)
    # every example alike within a seed (no example variance): the paired t-test over seeds, df S - 1
    x = np.repeat(np.array([[1], [0], [1], [1]]), 5, axis=1)
    res = crossed_test(x)
    assert res.df == pytest.approx(3) and res.p == pytest.approx(stats.t_test(x.mean(axis=1)))
    assert crossed_test(np.zeros((3, 4))).p == 1.0 and crossed_test(np.ones((3, 4))).p == 0.0


def test_outcome_table_uses_shared_seeds_and_examples() -> None:
    method = {("sst2", 1): {"a": True, "b": False, "c": True}, ("sst2", 2): {"a": True, "b": True, "c": True},
              ("sst2", 3): {"a": False}}
    base = {("sst2", 1): {"a": False, "b": False, "c": True, "d": True}, ("sst2", 2): {"a": True, "b": False, "c": True}}
    x, seeds = outcome_table(method, base)
    assert seeds == [("sst2", 1), ("sst2", 2)]
    assert x.tolist() == [[1, 0, 0], [0, 1, 0]]  # examples a, b, c (d: one side only)
    comp = compare_examples(method, base)
    assert comp.test == "examples" and comp.n == 2 and comp.n_examples == 3 and comp.diff == pytest.approx(1 / 3)
    assert comp.mcnemar == (1.0, 1.0)
    assert compare_examples({("sst2", 9): {"a": True}}, base) is None


def test_mdd_hand_computed() -> None:
    # (t_{.975, 4} + t_{.8, 4}) x 0.01 = (2.7764 + 0.9410) x 0.01; Holm's first step with m = 2: alpha / 4
    assert stats.mdd(0.01, 4) == pytest.approx(0.037175, abs=1e-5)
    assert stats.mdd(0.01, 4, m=2) == pytest.approx((sps.t.ppf(1 - 0.0125, 4) + sps.t.ppf(0.8, 4)) * 0.01)
    assert math.isnan(stats.mdd(math.nan, 4))


def test_ci_ends_are_compared_with_zero_with_a_tolerance() -> None:
    # 0.8257 - 0.8257 in another order: the three marks rested on such +2.2e-17 ends
    assert not stats.excludes_zero(2.2e-17, 0.01) and not stats.excludes_zero(-0.02, -1.1e-17)
    assert stats.excludes_zero(0.001, 0.02) and stats.excludes_zero(-0.02, -0.001)
    comp = stats.compare({("t", s): 0.8257 for s in range(3)}, {("t", s): 0.8257 - 1e-17 for s in range(3)})
    assert not comp.ci_excludes_0 and not comp.significant


def _marks(rng: np.random.Generator, trees: int, effect: float) -> float:
    """Share of simulated trees (3 methods vs one baseline, 5 seeds x 200 examples) whose first method is
    marked: crossed test per method, Holm over the three, mark = Holm p < 0.05."""
    fired = 0
    for _ in range(trees):
        ps = [crossed_test(stats_null.table(rng, 5, 200, effect if k == 0 else 0.0)).p for k in range(3)]
        fired += stats.holm(ps)[0] < stats.ALPHA
    return fired / trees


def test_the_mark_fires_at_about_the_nominal_rate_under_the_null() -> None:
    rng = np.random.default_rng(0)
    # one method per tree: the Holm-adjusted mark is the test itself; 1500 trees: 0.05 +- 2 x 0.0056
    crossed, seedwise = stats_null.rates(rng, 1500, 5, 200, 0.0, 0.3)
    assert 0.035 <= crossed <= 0.065 and 0.035 <= seedwise <= 0.065
    # three methods under the null: Holm keeps the chance of marking the first one below alpha / 1
    assert _marks(rng, 600, 0.0) <= 0.05


def test_the_mark_fires_with_a_known_effect() -> None:
    rng = np.random.default_rng(1)
    assert _marks(rng, 100, 1.5) >= 0.9  # a logit shift of 1.5 (about +15 points) among 3 methods: found
    comp = compare_examples({("t", s): {i: i % 10 != 0 for i in range(300)} for s in range(3)},
                            {("t", s): {i: i % 3 != 0 for i in range(300)} for s in range(3)})
    assert comp.diff == pytest.approx(0.9 - 0.6667, abs=1e-3) and comp.p < 1e-6


def test_equal_seed_differences_give_no_t_test_p() -> None:
    """Two seeds with the same difference (+3/148 twice): scipy's t is inf and its p 0; the t-test is undefined,
    so p is nan (shown n/a, not a test for Holm) and the row is not marked."""
    t_test = stats.t_test
    assert math.isnan(t_test(np.array([3 / 148, 3 / 148])))
    assert math.isnan(t_test(np.array([0.0, 0.0, 0.0])))
    assert t_test(np.array([0.02, 0.03])) > 0.05  # a spread: the test is defined
    comp = stats.compare({1: 0.40, 2: 0.39}, {1: 0.38, 2: 0.37})
    assert math.isnan(comp.p) and not comp.significant
