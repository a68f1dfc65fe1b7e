"""Paired statistics (hfprune.stats) and cell comparisons (hfprune.comparisons), against independent
computations: scipy's paired t-test and noncentral t power, hand-computed cluster-robust and Holm values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from hfprune import comparisons
from hfprune.stats import holm, minimum_detectable, paired_difference


def test_without_clusters_it_is_the_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(0.2, 1.0, size=40)
    got = paired_difference(a - b)
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval()
    assert got.diff == pytest.approx(np.mean(a - b))
    assert (got.lo, got.hi, got.p) == pytest.approx((ci.low, ci.high, ref.pvalue), rel=1e-9)
    assert got.n == got.clusters == 40


def test_cluster_robust_interval_by_hand():
    # d = 1, 2, 3, 4 in clusters {a, a, b, b}: residuals -1.5 -0.5 | 0.5 1.5, cluster sums -2 | 2;
    # V = G/(G-1) * (N-1)/(N-K) * sum(s_c^2) / N^2 = 2 * 1 * 8 / 16 = 1, so se = 1 on G - 1 = 1 df
    got = paired_difference([1.0, 2.0, 3.0, 4.0], clusters=["a", "a", "b", "b"])
    t = st.t.ppf(0.975, df=1)
    assert (got.diff, got.se) == pytest.approx((2.5, 1.0))
    assert (got.lo, got.hi) == pytest.approx((2.5 - t, 2.5 + t))
    assert got.p == pytest.approx(2 * st.t.sf(2.5, df=1))
    assert got.clusters == 2


def test_clustering_widens_the_interval_when_units_share_a_document():
    rng = np.random.default_rng(1)
    docs = np.repeat(np.arange(10), 8)  # 8 windows per document, the document effect dominates
    d = rng.normal(0, 1, size=10)[docs] + rng.normal(0, 0.2, size=docs.size)
    plain, clustered = paired_difference(d), paired_difference(d, clusters=docs)
    assert clustered.diff == pytest.approx(plain.diff)
    assert clustered.hi - clustered.lo > 2 * (plain.hi - plain.lo)
    assert clustered.clusters == 10 and clustered.mde > plain.mde


def test_strata_give_the_unweighted_mean_of_strata_means():
    d = np.array([1.0, 1.2, 0.8, 5.0, 5.5, 4.5, 5.2, 4.8, 5.1])
    strata = ["boolq"] * 3 + ["arc"] * 6
    got = paired_difference(d, strata=strata)
    assert got.diff == pytest.approx((d[:3].mean() + d[3:].mean()) / 2)
    # the variance of a mean of two independent means: (v1 / n1 + v2 / n2) / 4, with HC1-style residuals
    resid = np.concatenate([d[:3] - d[:3].mean(), d[3:] - d[3:].mean()])
    hc = resid ** 2 * (9 - 1) / (9 - 2) * 9 / 8  # statsmodels' small-sample factors, singleton clusters
    var = (hc[:3].sum() / 9 + hc[3:].sum() / 36) / 4
    assert got.se == pytest.approx(math.sqrt(var), rel=1e-9)


def test_a_known_shift_is_found_and_a_label_shuffled_pair_is_not():
    rng = np.random.default_rng(2)
    base = rng.normal(size=300)
    shifted = base + 0.3 + rng.normal(0, 0.5, size=300)
    found = paired_difference(shifted - base)
    assert found.p < 1e-6 and found.lo < 0.3 < found.hi
    # swap A and B on a random half of the units: any real difference cancels out
    swap = rng.random(300) < 0.5
    a, b = np.where(swap, base, shifted), np.where(swap, shifted, base)
    shuffled = paired_difference(a - b)
    assert shuffled.p > 0.05 and shuffled.lo < 0 < shuffled.hi


def test_identical_cells_give_zero_with_a_zero_width_interval():
    got = paired_difference(np.zeros(12), clusters=np.repeat(np.arange(4), 3))
    assert (got.diff, got.lo, got.hi, got.p) == (0.0, 0.0, 0.0, 1.0)


def test_one_unit_per_stratum_has_no_interval():
    """Ten tasks with one doc each: the strata means are the units, nothing estimates their spread (a zero-width
    interval here once marked a 1-doc-per-task rehearsal's accuracy differences "worse" at p = 0)."""
    out = paired_difference([0.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0, 1.0], strata=list("abcdefghij"))
    assert out.diff == pytest.approx(0.2)
    assert math.isnan(out.lo) and math.isnan(out.hi) and math.isnan(out.p) and math.isnan(out.mde)


def test_clusters_nest_in_strata():
    """Two tasks both numbering their docs 0..n-1: doc 3 of one task and doc 3 of the other are not one cluster."""
    rng = np.random.default_rng(1)
    d, ids, tasks = rng.normal(size=40), np.tile(np.arange(20), 2), np.repeat(["arc", "piqa"], 20)
    shared = paired_difference(d, ids, tasks)
    assert shared.clusters == 40
    assert shared == paired_difference(d, [f"{t}/{i}" for t, i in zip(tasks, ids)], tasks)


def test_holm_by_hand_and_nan_kept():
    # sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, 0.04, 0.03, math.nan])[3])


def test_minimum_detectable_difference_has_the_stated_power():
    se, g = 0.05, 30
    mde = minimum_detectable(se, g)
    # power of a two-sided one-sample t-test at a true difference of `mde` (noncentral t, computed by scipy)
    nc, t = mde / se, st.t.ppf(0.975, df=g - 1)
    power = st.nct.sf(t, g - 1, nc) + st.nct.cdf(-t, g - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-6)


# ---- comparisons of record tables

def _records(values: dict[str, list[float]], clusters: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for key, vals in values.items():
        measure, group = key.split(":")
        for i, v in enumerate(vals):
            rows.append({"measure": measure, "group": group, "unit": str(i),
                         "cluster": clusters[i] if clusters else f"doc:{i}", "value": v, "weight": 1.0,
                         "choice_loglik": None})
    return pd.DataFrame(rows)


def test_cell_against_itself_and_seed_pooling():
    rng = np.random.default_rng(3)
    a = {s: _records({"logppl:wiki": list(rng.normal(3, 0.3, 20)), "acc:boolq": list(rng.integers(0, 2, 20) * 1.0)})
         for s in (0, 1, 2)}
    same = comparisons.comparison_table({"x": a, "y": a}, [("x", "y")])
    assert (same["diff"] == 0).all() and (same["lo"] == 0).all() and (same["hi"] == 0).all()
    assert set(same["verdict"]) == {"equivalent"} and (same["pairs"] == 3).all()

    # B = A - 0.1 on every unit of every seed: found, with every seed pair agreeing
    b = {s: f.assign(value=np.where(f["measure"] == "logppl", f["value"] - 0.1, f["value"])) for s, f in a.items()}
    table = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")]).set_index("measure")
    assert table.loc["logppl:wiki", "diff"] == pytest.approx(0.1)
    assert table.loc["logppl:wiki", "verdict"] == "worse" and table.loc["logppl:wiki", "wins"] == 0.0
    assert table.loc["logppl:wiki", "n"] == 60 and table.loc["logppl:wiki", "clusters"] == 20  # docs, not seeds

    # a cell with one draw (magnitude, dense) pairs with every draw of the other
    one = {None: a[0]}
    assert comparisons.comparison_table({"a": a, "m": one}, [("a", "m")])["pairs"].eq(3).all()


def test_cells_on_different_units_are_refused():
    a = {0: _records({"logppl:wiki": [1.0, 2.0, 3.0]})}
    b = {0: _records({"logppl:wiki": [1.0, 2.0]})}
    with pytest.raises(Exception, match="not evaluated on the same units"):
        comparisons.comparison_table({"a": a, "b": b}, [("a", "b")])


def test_dense_fidelity_is_the_identity():
    a = {0: _records({"js:lambada": [0.2, 0.3, 0.4], "logppl:wiki": [3.0, 3.1, 3.2]})}
    dense = {None: _records({"logppl:wiki": [2.9, 3.0, 3.1]})}
    table = comparisons.comparison_table({"a": a, "dense": dense}, [("a", "dense")]).set_index("measure")
    assert table.loc["js:lambada", "diff"] == pytest.approx(0.3)
    assert table.loc["logppl:wiki", "diff"] == pytest.approx(0.1)
