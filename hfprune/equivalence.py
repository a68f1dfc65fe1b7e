"""Marks that decide: equivalence margins and two one-sided tests (TOST) on the paired, cluster-robust errors of
hfprune.stats.

Each comparison gets one of four marks, in this order of precedence:

- ``equivalent``: both one-sided tests reject |Δ| >= margin (Holm within the table's equivalence tests), so the
  difference lies within ±margin whatever its sign: a significant but negligible difference is equivalent;
- ``better`` / ``worse``: the difference test rejects Δ = 0 (Holm within the table's difference tests);
- ``undecided``: neither; the grid could not tell.

Margins are in the record's own units (``report.margins``; accuracies and probabilities as fractions: 0.01 is one
point). Both tests use the same standard error and t degrees of freedom as the difference's interval, so with
one unit per cluster the equivalence p-value is statsmodels' ``ttost_paired``.
"""

from __future__ import annotations

import math

import pandas as pd

from hfprune.errors import ConfigError
from hfprune.stats import ALPHA, Paired, holm

# smallest differences that matter, in record units (README "Margins" justifies each)
DEFAULT_MARGINS = {"logppl": 0.02, "js": 0.005, "jaccard": 0.02, "kl": 0.02, "acc": 0.01, "gold_prob": 0.01,
                   "flip": 0.01, "top1": 0.01}
MARKS = ("equivalent", "better", "worse", "undecided")


def margins(cfg: dict) -> dict[str, float]:
    """The defaults, overridden by `report.margins`."""
    return {**DEFAULT_MARGINS, **(cfg["report"].get("margins") or {})}


def produced_measures(cfg: dict) -> set[str]:
    """The record measures a grid's evaluate jobs write (docs/CONTRACTS.md)."""
    ev = cfg["evaluation"]
    out = set()
    if ev["suite"] != "none":
        out |= {"acc", "gold_prob", "flip"}
    if ev["perplexity"]["sources"]:
        out.add("logppl")
    if ev["fidelity"]["enabled"]:
        out |= {"js", "jaccard", "kl", "top1"}
    return out


def check_margins(cfg: dict, source: str) -> None:
    """report.margins only for measures this grid produces (the schema keeps them >= 0)."""
    produced = produced_measures(cfg)
    for measure in cfg["report"].get("margins") or {}:
        if measure not in produced:
            raise ConfigError(f"{source}: invalid config field 'report.margins.{measure}': this grid produces no "
                              f"{measure!r} records (it produces {', '.join(sorted(produced)) or 'none'})")


def tost(result: Paired, margin: float | None) -> float:
    """p-value of H0: |Δ| >= margin against |Δ| < margin: the larger of the two one-sided t-tests' p-values on
    the result's standard error and degrees of freedom; NaN where no margin or no error is known."""
    if margin is None or not (math.isfinite(margin) and math.isfinite(result.diff)):
        return math.nan
    if result.se == 0.0:  # an exact difference
        return 0.0 if abs(result.diff) < margin else 1.0
    if not (math.isfinite(result.se) and result.df > 0):
        return math.nan
    from scipy import stats as st

    lower = st.t.sf((result.diff + margin) / result.se, result.df)  # H0: Δ <= -margin
    upper = st.t.cdf((result.diff - margin) / result.se, result.df)  # H0: Δ >= +margin
    return float(max(lower, upper))


def mark(diff: float, p_holm: float, p_tost_holm: float, higher_is_better: bool) -> str:
    if math.isfinite(p_tost_holm) and p_tost_holm < ALPHA:
        return "equivalent"
    if math.isfinite(p_holm) and p_holm < ALPHA and diff != 0:
        return "better" if (diff > 0) == higher_is_better else "worse"
    return "undecided"


def add_marks(table: pd.DataFrame, p: str = "p", p_tost: str = "p_tost") -> pd.DataFrame:
    """Holm-correct a table's difference and equivalence p-values, each family apart, and mark every row (column `verdict`)."""
    table = table.copy()
    table["p_holm"] = holm(table[p])
    table["p_tost_holm"] = holm(table[p_tost])
    table["verdict"] = [mark(d, ph, pt, h) for d, ph, pt, h in
                     zip(table["diff"], table["p_holm"], table["p_tost_holm"], table["higher_is_better"])]
    return table


def margin_for(measure: str, chosen: dict[str, float] | None) -> float:
    """A measure's margin; NaN (no equivalence test) for a measure without one."""
    value = (chosen if chosen is not None else DEFAULT_MARGINS).get(measure)
    return math.nan if value is None else float(value)
