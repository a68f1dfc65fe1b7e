"""The report's own plots (metric vs ratio, forest, rank stability): they draw the numbers they are given and compute
no statistic. The plots jobs log too (neurons kept, scores) live in hfprune.plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from hfprune.plots import pyplot as _pyplot
from hfprune.plots import save as _save
from hfprune.report.paper_tables import criterion_label


def _errors(frame: pd.DataFrame, metric: str, band: str):
    """Error bar lengths: `ci` from <metric>_lo/_hi, `sd` from <metric>_sd; None where absent."""
    if band == "ci" and f"{metric}_lo" in frame.columns:
        # clipped: a zero-width interval (one doc per task) can come out as -1e-15 below its point
        return np.clip(np.vstack([(frame[metric] - frame[f"{metric}_lo"]).to_numpy(float),
                                  (frame[f"{metric}_hi"] - frame[metric]).to_numpy(float)]), 0, None)
    if band == "sd" and f"{metric}_sd" in frame.columns:
        return np.nan_to_num(frame[f"{metric}_sd"].to_numpy(float))
    return None


def plot_metric_vs_ratio(cells: pd.DataFrame, metrics: list[str], out_png, title: str, ylabel: str,
                         log: bool = False, band: str = "ci") -> Path:
    """One panel per metric column: a line per criterion (dashed: LoRA-recovered), dense at ratio 0, with
    error bars (`ci`: 95 % CI from <metric>_lo/_hi; `sd`: ± sd over calibration seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    dense = cells[cells["criterion"] == "dense"]
    for ax, metric in zip(axes[0], metrics):
        for (crit, recovered), group in cells[cells["criterion"] != "dense"].groupby(["criterion", "recovered"],
                                                                                     sort=False):
            group = pd.concat([dense, group]).sort_values("ratio")
            ax.errorbar(group["ratio"], group[metric], yerr=_errors(group, metric, band), marker="o", capsize=3,
                        linestyle="--" if recovered else "-", label=f"{criterion_label(crit)}{' +LoRA' if recovered else ''}")
        if len(dense):
            ax.axhline(dense[metric].iloc[0], color="grey", linestyle=":", linewidth=1, label="dense")
        ax.set(xlabel="pruning ratio (fraction of all parameters)", ylabel=ylabel,
               title=metric if len(metrics) > 1 else title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if len(metrics) > 1:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_forest(table: pd.DataFrame, out_png, title: str) -> Path:
    """Paired differences vs the baseline with 95 % CIs: a panel per measure, a row per comparison x ratio, the
    ±margin band shaded; coloured by mark (MARK_COLOURS), hollow where undecided."""
    plt = _pyplot()
    from matplotlib.ticker import SymmetricalLogLocator
    labels = list(dict.fromkeys(table["label"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 0.45 * table["row"].nunique() + 1.6),
                             squeeze=False, sharey=True)
    rows = list(dict.fromkeys(table["row"]))
    for ax, label in zip(axes[0], labels):
        sub = table[table["label"] == label]
        y = [rows.index(r) for r in sub["row"]]
        scale = sub["scale"].to_numpy(float)
        for yi, d, lo, hi, v, sc in zip(y, sub["diff"], sub["lo"], sub["hi"], sub["verdict"], scale):
            color = MARK_COLOURS.get(v, "tab:grey")
            xerr = None if not (math.isfinite(lo) and math.isfinite(hi)) else [[(d - lo) * sc], [(hi - d) * sc]]
            ax.errorbar([d * sc], [yi], xerr=xerr, fmt="o", color=color, capsize=3,
                        markerfacecolor=color if v != "undecided" else "white")
        margin = float(sub["margin"].iloc[0]) * float(sub["scale"].iloc[0]) if "margin" in sub else math.nan
        if math.isfinite(margin) and margin > 0:
            ax.axvspan(-margin, margin, color="tab:blue", alpha=0.12, linewidth=0)
        ax.axvline(0, color="black", linewidth=0.8)
        # a far-off criterion (magnitude) would squeeze the close ones into a dot at 0: linear within the
        # typical CI half-width (rounded up to a power of ten, so the first decade ticks sit at the linear
        # range's edges, not crowded into it beside 0), logarithmic beyond it, about 6 decade ticks at most
        half = ((sub["hi"] - sub["lo"]) / 2 * sub["scale"]).abs()
        half = half[np.isfinite(half) & (half > 0)]
        symlog = bool(len(half)) and (sub["diff"] * sub["scale"]).abs().max() > 10 * half.median()
        if symlog:
            linthresh = 10.0 ** math.ceil(math.log10(half.median()))
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.xaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=linthresh))
            ax.xaxis.get_major_locator().set_params(numticks=6)
        better = "higher" if sub["higher_is_better"].iloc[0] else "lower"
        ax.set(title=f"Δ {label}", xlabel=f"A − baseline ({better} is better){', symlog' if symlog else ''}")
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)), rows)
    axes[0][0].invert_yaxis()
    fig.suptitle(title)
    return _save(fig, out_png)


MARK_COLOURS = {"equivalent": "tab:blue", "better": "tab:green", "worse": "tab:red", "undecided": "tab:grey"}


def plot_rank_stability(table: pd.DataFrame, out_png, title: str) -> Path:
    """Each criterion's mark vs the baseline per measure (the colour), with the count of seeds on which A beat
    it (a count, not a test): a bright cell is a decided one, never a magnitude."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    order = list(MARK_COLOURS)
    codes = table.assign(code=table["verdict"].map(order.index))
    grid = codes.pivot_table(index="row", columns="label", values="code", aggfunc="first", sort=False)
    wins = table.pivot_table(index="row", columns="label", values="wins", aggfunc="first", sort=False)
    pairs = table.pivot_table(index="row", columns="label", values="pairs", aggfunc="first", sort=False)
    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 3, 0.45 * grid.shape[0] + 1.8))
    ax.imshow(grid.to_numpy(float), vmin=-0.5, vmax=len(order) - 0.5, aspect="auto",
              cmap=ListedColormap([MARK_COLOURS[m] for m in order]), alpha=0.6)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            code, w, n = grid.iat[i, j], wins.iat[i, j], pairs.iat[i, j]
            if math.isfinite(code):
                ax.text(j, i, f"{order[int(code)]}\n{round(w * n)}/{int(n)} seeds", ha="center", va="center",
                        fontsize=7)
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_title(title)
    return _save(fig, out_png)
