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


@dataclass
class Comparison:
    """A method minus the baseline on one column, over the keys (task, seed) both have."""

    n: int
    diff: float            # mean of the paired differences
    ci_low: float
    ci_high: float
    p_t: float             # paired t-test
    p_wilcoxon: float      # Wilcoxon signed-rank (nan when n < MIN_WILCOXON)
    fragile: bool = False  # a CI-excluding-0 difference that flips sign or covers 0 when one seed is dropped
    p_holm: float = math.nan

    @property
    def significant(self) -> bool:
        """The 95% bootstrap CI excludes 0."""
        return not math.isnan(self.ci_low) and (self.ci_low > 0 or self.ci_high < 0)


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
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _excludes_zero(low: float, high: float) -> bool:
    return not math.isnan(low) and (low > 0 or high < 0)


def t_test(diffs: np.ndarray) -> float:
    """Two-sided paired t-test p-value (ttest_rel of method vs baseline == one-sample t on the diffs)."""
    if len(diffs) < 2:
        return math.nan
    with warnings.catch_warnings():  # zero variance: scipy warns and returns nan
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
    if not _excludes_zero(low, high):
        return False
    sign = np.sign(diffs.mean())
    for i in range(len(diffs)):
        rest = np.delete(diffs, i)
        lo, hi = bootstrap_ci(rest)
        if np.sign(rest.mean()) != sign or not _excludes_zero(lo, hi):
            return True
    return False


def compare(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float]) -> Comparison:
    """Everything the scorecard says about one method-vs-baseline cell (Holm is set by `holm` later)."""
    diffs = paired_diffs(method, baseline)
    low, high = bootstrap_ci(diffs)
    return Comparison(n=len(diffs), diff=float(diffs.mean()) if len(diffs) else math.nan, ci_low=low,
                      ci_high=high, p_t=t_test(diffs), p_wilcoxon=wilcoxon(diffs),
                      fragile=drop_one_fragile(diffs))


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
