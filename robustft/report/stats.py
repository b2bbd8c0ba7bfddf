"""Statistics of the scorecard: paired differences of a method and the baseline over shared seeds.

Why paired: seed-to-seed variance of fine-tuning (data order, head init) is often larger than the gap
between methods, but the same seed shares it across methods; differencing per (task, seed) removes it.
All distributions come from scipy.stats (bootstrap, ttest_rel, wilcoxon); only Holm's step-down
adjustment is written out (statsmodels is not a dependency and scipy has no Holm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_SEED = 0          # fixed random_state: the same report from the same runs
BOOTSTRAP_RESAMPLES = 9999  # scipy's default
MIN_WILCOXON = 6            # below 6 pairs the two-sided exact Wilcoxon p-value cannot reach 0.05
ALPHA = 0.05                # the level of the mark (Holm-adjusted)
POWER = 0.80                # the power of the minimum detectable difference
TOL = 1e-9                  # accuracies are counts / n (n < 1e6): a CI end within 1e-9 of 0 is 0


@dataclass
class Comparison:
    """A method minus the baseline on one column, over the keys (task, seed) both have."""

    n: int
    diff: float            # mean of the paired differences
    ci_low: float
    ci_high: float
    p_t: float             # paired t-test
    p_wilcoxon: float      # Wilcoxon signed-rank (nan when n < MIN_WILCOXON)
    fragile: bool = False  # a marked difference that flips sign or loses p < 0.05 when one seed is dropped
    p_holm: float = math.nan
    test: str = "seeds"    # what `p` is: "seeds" (paired t over seeds) or "examples" (crossed seed x example test)
    p: float = math.nan    # the p-value behind the mark (Holm-adjusted into p_holm over the methods of a column)
    mdd: float = math.nan  # minimum detectable difference at 80% power, two-sided alpha / m (Holm's first step)
    n_examples: int = 0    # examples scored by both runs in every shared seed (test == "examples")
    mcnemar: tuple[float, ...] = ()  # exact McNemar p per shared seed (test == "examples")
    collapsed: bool = False  # a run of the row or its baseline predicts one class: never marked

    @property
    def significant(self) -> bool:
        """The mark: Holm-adjusted p (over the methods of the column) < ALPHA, never for a collapsed row."""
        return not self.collapsed and not math.isnan(self.p_holm) and self.p_holm < ALPHA

    @property
    def ci_excludes_0(self) -> bool:
        """The CI excludes 0, compared with a tolerance (a float sum of equal accuracies is 1e-17, not 0)."""
        return excludes_zero(self.ci_low, self.ci_high)


def paired_diffs(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float]) -> np.ndarray:
    """method[k] - baseline[k] for the keys both have, in sorted key order."""
    keys = sorted(set(method) & set(baseline), key=repr)
    return np.array([method[k] - baseline[k] for k in keys], dtype=np.float64)


def bootstrap_ci(diffs: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean difference (nan below 2 pairs).

    Percentile, not scipy's default BCa: BCa's jackknife acceleration is unstable (and often nan) with the
    3-5 seeds of fine-tuning papers. Identical differences have a zero-width interval.
    """
    if len(diffs) < 2:
        return math.nan, math.nan
    if np.ptp(diffs) == 0:
        return float(diffs[0]), float(diffs[0])
    res = stats.bootstrap((diffs,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", random_state=BOOTSTRAP_SEED)
    # an end within TOL of 0 is 0: a resample of equal accuracies sums to +-1e-17 in floating point
    low, high = (0.0 if abs(v) < TOL else float(v) for v in res.confidence_interval)
    return low, high


def excludes_zero(low: float, high: float) -> bool:
    """low > 0 or high < 0 beyond TOL: 0.8257 - 0.8257 summed in another order is +2.2e-17, not a gain."""
    return not math.isnan(low) and (low > TOL or high < -TOL)


def mdd(se: float, df: float, m: int = 1, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable difference of a two-sided t-type test: (t_{1-alpha/2m} + t_{power}) x se.

    alpha / m is the level Holm asks of the smallest of m p-values, so "not significant" reads as "no
    effect larger than this was likely to be found" (Cohen's normal approximation, with t quantiles).
    """
    if math.isnan(se) or math.isnan(df) or df <= 0:
        return math.nan
    return float((stats.t.ppf(1 - alpha / (2 * max(m, 1)), df) + stats.t.ppf(power, df)) * se)


def t_test(diffs: np.ndarray) -> float:
    """Two-sided paired t-test p-value (ttest_rel of method vs baseline == one-sample t on the diffs)."""
    if len(diffs) < 2 or np.ptp(diffs) <= 1e-12:
        # equal differences (InfoBERT's 2 seeds vs vanilla on AdvGLUE: +3/148 twice): t is undefined, which
        # scipy reports as p = 0 (t = inf) when the mean is not 0, a certainty 2 seeds do not give
        return math.nan
    with warnings.catch_warnings():  # scipy warns on near-constant input
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(diffs, np.zeros_like(diffs)).pvalue)


def wilcoxon(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; nan below MIN_WILCOXON pairs or when every diff is 0."""
    if len(diffs) < MIN_WILCOXON or not np.any(diffs):
        return math.nan
    return float(stats.wilcoxon(diffs).pvalue)


def drop_one_fragile(diffs: np.ndarray) -> bool:
    """True when the CI excludes 0 but dropping some single pair flips the sign or lets the CI cover 0."""
    low, high = bootstrap_ci(diffs)
    if not excludes_zero(low, high):
        return False
    sign = np.sign(diffs.mean())
    for i in range(len(diffs)):
        rest = np.delete(diffs, i)
        lo, hi = bootstrap_ci(rest)
        if np.sign(rest.mean()) != sign or not excludes_zero(lo, hi):
            return True
    return False


def seed_se(diffs: np.ndarray) -> float:
    """Standard error of the mean paired difference over seeds (ddof=1); nan below 2 pairs."""
    return float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan


def compare(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float], m: int = 1) -> Comparison:
    """The seed-level comparison of one method-vs-baseline cell (Holm is set by `holm` later).

    The mark's test is the paired t-test over seeds (`p`); the bootstrap CI and Wilcoxon are shown beside
    it. This is the fallback for runs without per-example records (stats_examples.compare_examples).
    """
    diffs = paired_diffs(method, baseline)
    low, high = bootstrap_ci(diffs)
    p_t = t_test(diffs)
    return Comparison(n=len(diffs), diff=float(diffs.mean()) if len(diffs) else math.nan, ci_low=low,
                      ci_high=high, p_t=p_t, p_wilcoxon=wilcoxon(diffs), fragile=drop_one_fragile(diffs),
                      test="seeds", p=p_t, mdd=mdd(seed_se(diffs), len(diffs) - 1, m))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan entries stay nan and do not count as tests).

    Sorted ascending p_(1..m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    m = len(valid)
    running = 0.0
    for rank, idx in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return [float(x) for x in out]
