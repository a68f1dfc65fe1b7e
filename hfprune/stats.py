"""Paired differences with cluster-robust confidence intervals, Holm's correction and the smallest detectable
difference ("Adding Error Bars to Evals", Miller 2024): every cell of a model sees the same docs, windows and
prompts, so two cells are compared unit by unit, and units that share a context (several questions on one
passage, windows of one document, the same doc under several calibration seeds) form one cluster.

The estimate is an OLS fit of the per-unit differences on one indicator per stratum (a task, for an average
over tasks) with statsmodels' cluster-robust covariance; the reported difference is the plain mean of the
strata means (the macro average lm-eval reports), with a t interval on (clusters - 1) degrees of freedom.
With one unit per cluster and one stratum this is exactly the paired t-test (tests check it against scipy).
With `seeds`, the calibration draw is a second clustering dimension (Cameron, Gelbach & Miller 2011, two-way
cluster-robust errors through statsmodels; t on min(clusters, seeds) - 1 degrees of freedom): the interval then
covers the variation over calibration draws, not only over docs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Paired:
    """Mean difference A - B with its 95 % CI, p-value (H0: no difference), units, clusters and the smallest
    difference this design detects with 80 % power at alpha 0.05 (two-sided)."""

    diff: float
    lo: float
    hi: float
    se: float
    p: float
    n: int
    clusters: int
    mde: float
    df: float = math.nan  # degrees of freedom of the t reference

    def as_dict(self) -> dict:
        return asdict(self)


def _codes(values) -> np.ndarray:
    return pd.factorize(pd.Series(list(values)).astype(str))[0]


def minimum_detectable(se: float, clusters: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true difference a two-sided t-test on `clusters` clusters finds with probability `power`:
    the standardised effect statsmodels solves for, times the per-cluster standard deviation se * sqrt(G)."""
    if clusters < 2 or not math.isfinite(se):
        return math.nan
    return _standardised_effect(int(clusters), alpha, power) * se * math.sqrt(clusters)


@functools.cache
def _standardised_effect(clusters: int, alpha: float, power: float) -> float:
    """statsmodels' root-finding, once per cluster count: a report asks it for ~1,500 comparisons on a few counts."""
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=clusters, alpha=alpha, power=power, alternative="two-sided"))


def paired_difference(diffs, clusters=None, strata=None, alpha: float = ALPHA, seeds=None) -> Paired:
    """Inference on per-unit differences `diffs` (A - B on the same unit).

    clusters: one label per unit (units of a label within a stratum are not independent); None = every unit its
    own cluster.
    strata: one label per unit (e.g. the task); the estimate is the unweighted mean of the strata means.
    seeds: one calibration draw (seed pair) label per unit: a second, crossed clustering dimension.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, math.nan)
    strata_codes = np.zeros(n, dtype=int) if strata is None else _codes(strata)
    # clusters nest in strata: doc 3 of one task and doc 3 of another are different contexts
    groups = np.arange(n) if clusters is None else _codes(f"{s}|{c}" for s, c in zip(strata_codes, clusters))
    k = int(strata_codes.max()) + 1
    design = np.zeros((n, k))
    design[np.arange(n), strata_codes] = 1.0
    contrast = np.full(k, 1.0 / k)
    means = np.array([d[strata_codes == j].mean() for j in range(k)])
    diff = float(contrast @ means)
    g = int(groups.max()) + 1
    if seeds is not None:
        seed_codes = _codes(seeds)
        g = min(g, int(seed_codes.max()) + 1)
        groups = np.column_stack([groups, seed_codes])
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if np.ptp(d) <= tol:
        # every unit differs by the same amount (e.g. a cell against itself): the difference is exact
        return Paired(diff, diff, diff, 0.0, 1.0 if diff == 0 else 0.0, n, g, 0.0, math.inf)
    if g < 2 or not np.any(np.abs(d - means[strata_codes]) > tol):
        # one cluster, or one unit per stratum (e.g. one doc per task): nothing estimates the spread
        return Paired(diff, math.nan, math.nan, math.nan, math.nan, n, g, math.nan)
    import statsmodels.api as sm

    fit = sm.OLS(d, design).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
    test = fit.t_test(contrast[None, :])
    se = float(np.asarray(test.sd).ravel()[0])
    lo, hi = (float(x) for x in np.asarray(test.conf_int(alpha=alpha)).ravel()[:2])
    p = float(np.asarray(test.pvalue).ravel()[0])
    if not se > 0:  # two-way: V_docs + V_seeds - V_both can come out non-positive on few seeds
        return Paired(diff, math.nan, math.nan, math.nan, math.nan, n, g, math.nan)
    return Paired(diff, lo, hi, se, p, n, g, minimum_detectable(se, g, alpha), float(fit.df_resid_inference))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels); NaN entries stay NaN and do not count as tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        from statsmodels.stats.multitest import multipletests

        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return out


def mean_interval(values, clusters=None, strata=None, alpha: float = ALPHA) -> Paired:
    """CI of a cell's own mean (e.g. an accuracy): the paired machinery against a constant zero."""
    return paired_difference(values, clusters, strata, alpha)
