"""The power plan (hfprune.power) against independent computations: statsmodels' t-test power solver, a Monte
Carlo of statsmodels' TOST, and a CPU rate from hand-written Snakemake benchmark files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW

from hfprune import comparisons, power


def test_clusters_for_a_difference_are_statsmodels_t_test_power():
    se, g, diff = 0.03, 20, 0.04  # sigma = se * sqrt(g) per cluster
    got = power.clusters_needed(diff, se, g, margin=0.02, alpha=0.05)
    ref = TTestPower().solve_power(effect_size=diff / (se * math.sqrt(g)), alpha=0.05, power=0.8)
    assert got == math.ceil(ref)


def test_clusters_for_equivalence_give_the_power_in_simulation():
    se, g, diff, margin = 0.02, 25, 0.004, 0.02
    need = int(power.clusters_needed(diff, se, g, margin, alpha=0.05))
    assert need > g  # today's 25 clusters do not suffice
    sigma, rng = se * math.sqrt(g), np.random.default_rng(0)

    def rejection_rate(n, sims=800):
        hits = 0
        for _ in range(sims):
            x = rng.normal(diff, sigma, n)
            hits += DescrStatsW(x).ttost_mean(-margin, margin)[0] < 0.05
        return hits / sims

    assert rejection_rate(need) == pytest.approx(0.8, abs=0.05)
    assert rejection_rate(max(3, need // 2)) < 0.7
    assert power.goal(diff, margin) == "equivalence" and power.goal(0.03, margin) == "difference"
    assert math.isnan(power.clusters_needed(0.0, se, g, math.nan))  # nothing can decide it
    assert power.clusters_needed(margin * (1 - 1e-9), se, g, margin) == math.inf  # on the margin: never


def _records(values, shift=0.0):
    return pd.DataFrame({"measure": "logppl", "group": "wiki", "unit": [str(i) for i in range(len(values))],
                         "cluster": [f"doc:{i // 4}" for i in range(len(values))], "value": np.asarray(values) + shift,
                         "weight": 1.0, "choice_loglik": None})


def test_plan_lists_undecided_rows_with_more_units_and_seeds():
    rng = np.random.default_rng(4)
    base = rng.normal(3, 0.5, 40)
    a = {s: _records(base + rng.normal(0, 0.3, 40), 0.01 * (s - 1)) for s in range(3)}
    b = {s: _records(base) for s in range(3)}
    table = comparisons.comparison_table({"a": a, "b": b}, [("a", "b")])
    assert table["verdict"].iloc[0] == "undecided"
    costs = {"perplexity wiki": 120.0, "lm-eval": 600.0, "seed": 300.0}
    rows = power.plan(table, costs)
    row = rows.iloc[0]
    assert row["unit"] == "windows" and row["now"] == 40 and row["needed"] > 40
    assert row["needed"] == math.ceil(40 * row["factor"])
    assert row["minutes"] == pytest.approx(120.0 * (row["factor"] - 1) / 60)  # only the perplexity part re-runs
    assert row["seeds_now"] == 3 and row["seeds_needed"] > 3
    assert row["seed_minutes"] == pytest.approx(300.0 * (row["seeds_needed"] - 3) / 60)
    text = power.plan_markdown(rows, "a rate")
    assert "windows: 40 → " in text and "evaluation.perplexity.max_tokens" in text


def test_cpu_rate_is_measured_on_the_grids_benchmark_files(tmp_path):
    cfg = {"results_dir": str(tmp_path), "experiment": "e"}
    bench = tmp_path / "e/benchmarks/evaluate/tiny"
    for name, seconds in (("dense.tsv", 10.0), ("random/s0/r0.2.tsv", 30.0)):
        (bench / name).parent.mkdir(parents=True, exist_ok=True)
        (bench / name).write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:{int(seconds)}\t100\n")
    # another model's jobs (the report prices one model at a time) are not this model's
    other = tmp_path / "e/benchmarks/evaluate/other/dense.tsv"
    other.parent.mkdir(parents=True)
    other.write_text("s\th:m:s\tmax_rss\n500.0\t0:08:20\t100\n")
    rows = pd.DataFrame({"stage": ["evaluate", "evaluate", "score"], "jobs": [1, 1, 1],
                         "flops": [2e12, 6e12, 9e12], "model": ["tiny"] * 3})
    rate, note = power.measured_tflops(cfg, rows)
    assert rate == pytest.approx(8e12 / 40.0 / 1e12) and "2 evaluate benchmark files" in note
    assert power.measured_tflops(cfg, rows.assign(jobs=[1, 2, 1])) is None  # a job without its file
