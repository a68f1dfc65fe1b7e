"""The report's statistics: paired verdict tables of one model x ratio (x recovered), accuracy intervals from the
per-unit records, and the smallest differences the grid can detect. Numbers only: hfprune.report.rendering formats
them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hfprune import comparisons, equivalence
from hfprune.config import baseline_criterion
from hfprune.plan import format_ratio
from hfprune.stats import mean_interval


def accuracy_intervals(records: dict, columns: dict[str, str]) -> dict:
    """95 % CIs (in %) of a cell's accuracies from its records, seeds averaged per doc: Wilson intervals per
    task over its n docs, and the cluster-robust interval of the macro average over tasks."""
    from statsmodels.stats.proportion import proportion_confint

    acc = pd.concat(records.values())
    acc = acc[acc["measure"] == "acc"]
    if acc.empty:
        return {}
    per_doc = acc.groupby(["group", "unit"], sort=False).agg(value=("value", "mean"), cluster=("cluster", "first"))
    per_doc = per_doc.reset_index()
    out = {}
    for task, docs in per_doc.groupby("group", sort=False):
        lo, hi = proportion_confint(docs["value"].sum(), len(docs), alpha=0.05, method="wilson")
        col = columns.get(task, task)
        out[f"{col}_lo"], out[f"{col}_hi"] = 100 * lo, 100 * hi
    mean = mean_interval(per_doc["value"], per_doc["cluster"], per_doc["group"])
    out["average_lo"], out["average_hi"] = 100 * max(mean.lo, 0.0), 100 * min(mean.hi, 1.0)  # a t interval
    counts = per_doc.groupby("group").size()
    out["n_docs"] = str(counts.min()) if counts.nunique() == 1 else f"{counts.min()}-{counts.max()}"
    return out


def _with_intervals(cells: pd.DataFrame, records: dict, columns: dict[str, str]) -> pd.DataFrame:
    """Accuracy CIs and n docs from each cell's records (cells without complete records keep none)."""
    rows = []
    for _, row in cells.iterrows():
        key = (row["criterion"], format_ratio(row["ratio"]), bool(row["recovered"]))
        rows.append({**row.to_dict(), **(accuracy_intervals(records[key], columns) if key in records else {})})
    return pd.DataFrame(rows)


# ---- verdicts: paired comparisons of the cells of one model x ratio (x recovered)

def verdict_tables(cfg: dict, records: dict, ratio: str, recovered: bool, headline: bool = True) -> dict:
    """{"baseline": every criterion vs the baseline, "dense": every criterion vs the dense model} for one
    ratio (each its own Holm family); empty tables where cells are missing."""
    base = baseline_criterion(cfg)
    cells = {c: records[(c, ratio, recovered)] for c in cfg["criteria"] if (c, ratio, recovered) in records}
    out = {"baseline": pd.DataFrame(), "dense": pd.DataFrame()}
    marking = {"margins": equivalence.margins(cfg), "seed_effect": cfg["report"]["seed_effect"]}
    if base in cells:
        out["baseline"] = comparisons.comparison_table(cells, [(c, base) for c in cells if c != base], headline,
                                                       **marking)
    dense_key = ("dense", format_ratio(0.0), False)
    if dense_key in records:
        cells[comparisons.DENSE] = records[dense_key]
        out["dense"] = comparisons.comparison_table(cells, [(c, comparisons.DENSE) for c in cells
                                                            if c != comparisons.DENSE], headline, **marking)
    return out


def smallest_detectable(table: pd.DataFrame) -> list[tuple[pd.Series, float]]:
    """(a row of the measure, the median over comparisons of its smallest detectable difference), per measure."""
    out = []
    for measure, group in table.groupby("measure", sort=False):
        r = group.iloc[0]
        mde = float(np.nanmedian(group["mde"])) if group["mde"].notna().any() else math.nan
        out.append((r, mde))
    return out
