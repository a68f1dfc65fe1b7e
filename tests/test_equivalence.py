"""Marks that decide (hfprune.equivalence) and the interval over calibration draws (two-way clustered,
hfprune.stats), against independent computations: statsmodels' ttost_paired, hand-computed clustered TOST and
the Cameron-Gelbach-Miller two-way variance written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from statsmodels.stats.weightstats import ttost_paired

from hfprune import comparisons, equivalence, verdict_notes
from hfprune.errors import ConfigError
from hfprune.stats import holm, paired_difference
from hfprune.validation import validate_config


def test_tost_on_unclustered_units_is_statsmodels_ttost_paired():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.5, size=50)
    b = a + rng.normal(0.01, 0.05, size=50)
    for margin in (0.005, 0.02, 0.05):
        ref = ttost_paired(a, b, -margin, margin)[0]
        assert equivalence.tost(paired_difference(a - b), margin) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_tost_on_clustered_units_by_hand():
    # d = 1, 2, 3, 4 in clusters {a, a, b, b}: Δ 2.5, se 1 on 1 df (tests/test_stats.py derives it)
    result = paired_difference([1.0, 2.0, 3.0, 4.0], clusters=["a", "a", "b", "b"])
    lower = st.t.sf((2.5 + 10.0) / 1.0, df=1)  # H0: Δ <= -10
    upper = st.t.cdf((2.5 - 10.0) / 1.0, df=1)  # H0: Δ >= +10
    assert equivalence.tost(result, 10.0) == pytest.approx(max(lower, upper), rel=1e-12)
    assert result.df == 1


def _records(measure: str, group: str, values, seed_shift: float = 0.0, docs_per_cluster: int = 1):
    return pd.DataFrame({"measure": measure, "group": group, "unit": [str(i) for i in range(len(values))],
                         "cluster": [f"doc:{i // docs_per_cluster}" for i in range(len(values))],
                         "value": np.asarray(values) + seed_shift, "weight": 1.0, "choice_loglik": None})


def _pair(shift: float, noise: float, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.5, size=n)
    a = {0: _records("logppl", "wiki", base + shift + rng.normal(0, noise, n))}
    b = {0: _records("logppl", "wiki", base)}
    return comparisons.comparison_table({"a": a, "b": b}, [("a", "b")]).iloc[0]


def test_marks_inside_outside_and_too_noisy():
    inside = _pair(0.005, 0.02)  # significant, but far inside the 0.02-nat margin: equivalent wins
    assert inside["p_holm"] < 0.05 and inside["verdict"] == "equivalent" and inside["margin"] == 0.02
    worse = _pair(0.1, 0.05)  # log-ppl higher by 0.1 nats: worse, and certainly not equivalent
    assert worse["verdict"] == "worse" and worse["p_tost"] > 0.5
    better = _pair(-0.1, 0.05)
    assert better["verdict"] == "better"
    noisy = _pair(0.01, 2.0)  # the interval spans both 0 and the margins
    assert noisy["lo"] < -0.02 and noisy["hi"] > 0.02 and noisy["verdict"] == "undecided"
    assert {inside["target"], noisy["target"]} == {comparisons.FIXED}


def test_holm_is_applied_to_each_family_apart():
    rng = np.random.default_rng(5)
    base = {m: rng.normal(0.5, 0.2, 60) for m in ("logppl", "js", "kl")}
    a = {0: pd.concat([_records(m, "wiki", v + rng.normal(0.004, 0.01, 60)) for m, v in base.items()])}
    b = {0: pd.concat([_records(m, "wiki", v) for m, v in base.items()])}
    table = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")], margins={"logppl": 0.01, "js": 0.002})
    assert list(table["p_holm"]) == pytest.approx(list(holm(table["p"])))
    assert list(table["p_tost_holm"]) == pytest.approx(list(holm(table["p_tost"])), nan_ok=True)
    assert table.set_index("measure").loc["js:wiki", "margin"] == 0.002
    # a measure without a margin has no equivalence test and does not count in that family
    no_kl = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")], margins={"logppl": 0.01})
    assert no_kl["p_tost"].isna().sum() == 2 and no_kl["verdict"].isin(equivalence.MARKS).all()


def _two_way_by_hand(d, docs, seeds):
    """V = V_docs + V_seeds - V_docs∩seeds, each CRV1 with its own G / (G - 1) factor (one regressor)."""
    d, n = np.asarray(d, float), len(d)
    e = d - d.mean()

    def crv1(labels):
        sums = pd.Series(e).groupby(list(labels)).sum().to_numpy()
        g = len(sums)
        return g / (g - 1) * (sums ** 2).sum() / n ** 2

    var = crv1(docs) + crv1(seeds) - crv1([f"{x}|{s}" for x, s in zip(docs, seeds)])
    df = min(len(set(docs)), len(set(seeds))) - 1
    t = st.t.ppf(0.975, df)
    return d.mean(), math.sqrt(var), d.mean() - t * math.sqrt(var), d.mean() + t * math.sqrt(var), df


def test_two_way_clustered_interval_is_cameron_gelbach_miller():
    rng = np.random.default_rng(7)
    docs = np.tile(np.arange(30), 4)
    seeds = np.repeat(np.arange(4), 30)
    d = rng.normal(0, 0.3, 30)[docs] + rng.normal(0, 0.2, 4)[seeds] + rng.normal(0, 0.1, docs.size)
    got = paired_difference(d, clusters=docs, seeds=seeds)
    diff, se, lo, hi, df = _two_way_by_hand(d, docs, seeds)
    assert (got.diff, got.se, got.lo, got.hi) == pytest.approx((diff, se, lo, hi), rel=1e-9)
    assert got.df == df == 3


def _seeded(shifts, n=60, noise=0.05, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.5, n)
    a = {s: _records("logppl", "wiki", base + shift + rng.normal(0, noise, n)) for s, shift in enumerate(shifts)}
    b = {s: _records("logppl", "wiki", base) for s in range(len(shifts))}
    return a, b


def test_over_draws_interval_is_wider_when_seeds_disagree_and_decides_under_random():
    a, b = _seeded([0.08, -0.02, 0.05])
    fixed = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")]).iloc[0]
    assert fixed["hi_draws"] - fixed["lo_draws"] > 2 * (fixed["hi"] - fixed["lo"])
    assert fixed["verdict"] == "worse" and fixed["target"] == comparisons.FIXED
    random = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")], seed_effect="random").iloc[0]
    assert random["target"] == comparisons.RANDOM and random["verdict"] == "undecided"
    assert random["p_decide"] == random["p_draws"]
    # two seeds: not estimable, the marks stay conditional on the draws
    two = comparisons.comparison_table({"a": dict(list(a.items())[:2]), "b": dict(list(b.items())[:2])},
                                       [("a", "b")], seed_effect="random").iloc[0]
    assert math.isnan(two["lo_draws"]) and two["target"] == comparisons.FIXED


def test_crows_pairs_is_lower_is_better_and_out_of_the_average():
    rng = np.random.default_rng(2)
    boolq, crows = rng.integers(0, 2, 80) * 1.0, rng.integers(0, 2, 80) * 1.0
    a = {0: pd.concat([_records("acc", "offline_boolq", boolq), _records("acc", "crows_pairs_english", crows * 0)])}
    b = {0: pd.concat([_records("acc", "offline_boolq", boolq), _records("acc", "crows_pairs_english", crows)])}
    table = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")]).set_index("measure")
    assert table.loc["acc:average", "diff"] == 0.0  # boolq only
    row = table.loc["acc:crows_pairs_english"]
    assert row["diff"] < 0 and not row["higher_is_better"] and row["verdict"] == "better"
    # the paper-format table keeps the paper's average and says so in a footnote
    assert "in lm-eval lower is better" in verdict_notes.crows_pairs_footnote(["boolq", "crows_pairs"])
    assert verdict_notes.crows_pairs_footnote(["boolq", "arc_easy"]) == ""


def test_bad_margins_are_one_line_naming_the_field(tmp_path):
    cfg = {"experiment": "m", "results_dir": str(tmp_path), "criteria": ["magnitude"], "ratios": [0.2],
           "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path / "tiny")}]}
    with pytest.raises(ConfigError, match=r"^config: invalid config field 'report.margins.acc': .*minimum") as exc:
        validate_config({**cfg, "report": {"margins": {"acc": -0.01}}})
    assert "\n" not in str(exc.value)
    cfg["evaluation"] = {**cfg.get("evaluation", {}), "suite": "none"}
    with pytest.raises(ConfigError, match=r"^config: invalid config field 'report.margins.flip': this grid produces "
                                          r"no 'flip' records") as exc:
        validate_config({**cfg, "report": {"margins": {"flip": 0.02}}})
    assert "\n" not in str(exc.value)
    ok = validate_config({**cfg, "report": {"margins": {"logppl": 0.05}, "seed_effect": "random"}})
    assert equivalence.margins(ok)["logppl"] == 0.05 and equivalence.margins(ok)["acc"] == 0.01
