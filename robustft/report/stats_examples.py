"""Paired statistics over examples: exact McNemar within a seed, and one test over seeds and examples.

Every run of a task scores the same examples (dev sentences, AdvGLUE sentences, the attacked sample), so
a method and its baseline form a seeds x examples table of paired outcomes x[s, i] = correct_method -
correct_baseline in {-1, 0, 1}. Two questions are asked of it:

- Within one seed, "do these two models differ on these examples?": the exact McNemar test, a two-sided
  binomial test of the discordant pairs (scipy.stats.binomtest), as in Dror et al. (2018).
- Across seeds and examples, "would the difference hold for a new seed and new examples?" - the mark.

Why not the two-level bootstrap the issue suggests (resample seeds, then examples within them): any
bootstrap that resamples 3-5 seeds inherits the percentile bootstrap's small-sample failure (the seed-level
bootstrap CI excludes 0 for 14-21% of null comparisons at 3-5 seeds): it estimates the seed variance with
denominator S instead of S - 1 and uses normal, not t, quantiles. Resampling examples independently within
each seed also treats the same examples in every seed (a crossed design) as nested, counting the
per-example noise twice. Measured by scripts/stats_null.py, the two-level bootstrap fires for 8-13% of null
comparisons when seeds vary and 2.6-2.8% when they do not. The defensible alternative used here is the
classical crossed two-way random-effects analysis of the same table: x[s, i] = mu + a_s + b_i + e_si, whose
mean D has Var(D) = s2_a / S + s2_b / N + s2_e / (S N). The ANOVA mean squares give unbiased estimates of
the three components (truncated at 0), and D / se(D) is referred to a t distribution with Satterthwaite's
degrees of freedom, which fall to about S - 1 when seeds dominate (the seed-level t-test) and grow towards
S N when the examples do (a pooled McNemar-like test). Its calibration under the null is checked by
simulation in tests/test_report_stats.py and scripts/stats_null.py (result in docs/statistics.md).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from robustft.report.stats import ALPHA, Comparison, mdd, t_test

Records = Mapping[Hashable, bool]  # example id -> classified correctly


def mcnemar(x: np.ndarray) -> float:
    """Exact two-sided McNemar p of one seed's paired outcomes (x = method - baseline, in -1/0/1).

    Only discordant pairs carry information: b = method right and baseline wrong, c = the reverse; under
    no difference b ~ Binomial(b + c, 1/2). No discordant pair: p = 1.
    """
    b, c = int(np.sum(x > 0)), int(np.sum(x < 0))
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


@dataclass
class Crossed:
    """The crossed seeds x examples test of a paired outcome table."""

    diff: float  # mean of x: the mean over seeds of the accuracy difference on the shared examples
    se: float
    df: float
    p: float

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        if math.isnan(self.df) or self.se == 0:
            return self.diff, self.diff
        half = stats.t.ppf(0.5 + confidence / 2, self.df) * self.se
        return self.diff - half, self.diff + half


def crossed_test(x: np.ndarray) -> Crossed:
    """Two-sided test of mean(x) = 0 for an S x N table (S >= 2 seeds, N >= 2 examples), see the module doc.

    Mean squares: rows (seeds) MS_a, columns (examples) MS_b, residual MS_e; E[MS_a] = N s2_a + s2_e,
    E[MS_b] = S s2_b + s2_e, so S N Var(D) = MS_a + MS_b - MS_e, each component truncated at 0 (then its
    mean square leaves the sum and MS_e takes its place). Satterthwaite: df = (sum k MS)^2 / sum (k MS)^2 / df.
    """
    x = np.asarray(x, dtype=np.float64)
    s, n = x.shape
    d = float(x.mean())
    if s < 2 or n < 2:
        return Crossed(d, math.nan, math.nan, math.nan)
    rows, cols = x.mean(axis=1), x.mean(axis=0)
    df_a, df_b, df_e = s - 1, n - 1, (s - 1) * (n - 1)
    ms_a = n * float(np.sum((rows - d) ** 2)) / df_a
    ms_b = s * float(np.sum((cols - d) ** 2)) / df_b
    ms_e = float(np.sum((x - rows[:, None] - cols[None, :] + d) ** 2)) / df_e
    k_a, k_b = float(ms_a > ms_e), float(ms_b > ms_e)
    terms = [(k_a * ms_a, df_a), (k_b * ms_b, df_b), ((1 - k_a - k_b) * ms_e, df_e)]
    total = sum(t for t, _ in terms)
    if total <= 0:  # every x equal: no variance at all
        return Crossed(d, 0.0, math.nan, 1.0 if d == 0 else 0.0)
    se = math.sqrt(total / (s * n))
    df = total**2 / sum(t**2 / f for t, f in terms if t)
    return Crossed(d, se, df, float(2 * stats.t.sf(abs(d) / se, df)))


def outcome_table(method: Mapping[Hashable, Records], baseline: Mapping[Hashable, Records]
                  ) -> tuple[np.ndarray, list[Hashable]]:
    """x[s, i] over the seeds both sides have and the examples every one of those runs scored."""
    seeds = sorted(set(method) & set(baseline), key=repr)
    if not seeds:
        return np.zeros((0, 0)), []
    ids = set.intersection(*(set(method[k]) & set(baseline[k]) for k in seeds))
    order = sorted(ids, key=repr)
    x = np.array([[int(bool(method[k][i])) - int(bool(baseline[k][i])) for i in order] for k in seeds],
                 dtype=np.int64).reshape(len(seeds), len(order))
    return x, seeds


def _fragile(x: np.ndarray, sign: float) -> bool:
    """A difference that flips sign or loses p < ALPHA (unadjusted) when any single seed is dropped."""
    for i in range(len(x)):
        rest = crossed_test(np.delete(x, i, axis=0))
        if np.sign(rest.diff) != sign or not rest.p < ALPHA:
            return True
    return False


def compare_examples(method: Mapping[Hashable, Records], baseline: Mapping[Hashable, Records],
                     m: int = 1) -> Comparison | None:
    """The example-level comparison of one cell; None when the two sides share no scored example."""
    x, seeds = outcome_table(method, baseline)
    if not x.size:
        return None
    res = crossed_test(x)
    low, high = res.ci()
    per_seed = x.mean(axis=1)
    return Comparison(
        n=len(seeds), diff=res.diff, ci_low=low, ci_high=high, p_t=t_test(per_seed), p_wilcoxon=math.nan,
        fragile=bool(res.p < ALPHA and _fragile(x, np.sign(res.diff))), test="examples", p=res.p,
        mdd=mdd(res.se, res.df, m), n_examples=x.shape[1], mcnemar=tuple(mcnemar(row) for row in x))

