"""What the report prints around its Verdict tables: the marks and their inference target in words, the interval
over calibration draws, the warning where `report.seed_effect: random` cannot be estimated, CrowS-Pairs' footnote,
and the power plan with its cost (hfprune.equivalence, hfprune.power, hfprune.estimates)."""

from __future__ import annotations

import math

import pandas as pd

from hfprune import comparisons, equivalence
from hfprune.config import cell_seeds
from hfprune.errors import HFPruneError


def verdict_cell(r) -> str:
    """'Δ [lo, hi] mark', plus the interval over calibration draws where the row has one."""
    text = f"{comparisons.format_difference(r)} {comparisons.mark(r['verdict'])}"
    if math.isfinite(r.get("lo_draws", math.nan)):
        text += (f" · draws [{comparisons.format_value(r['lo_draws'], r['scale'])}, "
                 f"{comparisons.format_value(r['hi_draws'], r['scale'])}]")
    return text


def marks_intro(cfg: dict) -> str:
    chosen = equivalence.margins(cfg)
    margins = ", ".join(f"{k} {v:g}" for k, v in chosen.items())
    decides = ("over calibration draws where a model has ≥ 3 seeds (`report.seed_effect: random`)"
               if cfg["report"]["seed_effect"] == "random" else
               "conditional on the calibration sets that were drawn (`report.seed_effect: fixed`): what this grid's "
               "docs, windows and prompts can decide")
    return (f"Marks, in this order of precedence: **equivalent**: two one-sided tests on the same cluster-robust "
            f"errors put Δ within ±margin (margins, in record units, accuracies and probabilities as fractions: "
            f"{margins}; `report.margins`); **better** / **worse**: the difference test rejects 0; undecided: "
            "neither, the grid could not tell. Holm applies within a table, to the difference tests and to the "
            "equivalence tests apart (the CIs are per comparison, uncorrected). The marks use the interval "
            f"{decides}; each table's `target` column names it. `draws [lo, hi]` is the 95 % interval over "
            "calibration draws (the seed pair as a second clustering dimension, two-way cluster-robust, t on "
            "seeds − 1 df), shown where a comparison has ≥ 3 seed pairs. CrowS-Pairs' pct_stereotype is "
            "lower-is-better: its own rows say so and the acc / gold prob averages leave it out.")


def crows_pairs_footnote(task_columns: list[str]) -> str:
    """The paper-format average keeps the paper's sum; say so where it holds CrowS-Pairs."""
    if not any(comparisons.lower_is_better_task(c) for c in task_columns):
        return ""
    return (" Note: the average column is the paper's: it adds CrowS-Pairs' pct_stereotype as if higher were "
            "better (in lm-eval lower is better); the Verdicts' acc and gold prob averages leave CrowS-Pairs out.")


def seed_effect_warning(cfg: dict, model: str) -> list[str]:
    """A warning line where `seed_effect: random` meets a model with too few seeds to estimate it."""
    seeds = max(len(cell_seeds(cfg, model, c)) for c in cfg["criteria"])
    if cfg["report"]["seed_effect"] != "random" or seeds >= comparisons.MIN_SEEDS:
        return []
    return [(f"**Warning:** `report.seed_effect: random`, but {model} has {seeds} calibration seed(s): the interval "
             f"over calibration draws is not estimable ({seeds} seeds, {comparisons.MIN_SEEDS} needed), so its marks "
             "are conditional on the calibration sets that were drawn."), ""]


def target_line(cfg: dict, table: pd.DataFrame) -> str:
    """What the table's marks generalise to, in words."""
    pairs = int(table["pairs"].min())
    over = (f"the interval over calibration draws is shown as `draws` ({int(table['pairs'].max())} seed pairs)"
            if table["lo_draws"].notna().any() else f"over calibration draws: not estimable ({pairs} seed{'s' if pairs != 1 else ''})")
    return (f"Inference target of the marks: {', '.join(dict.fromkeys(table['target']))}; {over}.")


def power_costs(cfg: dict, model: str, tflops: float | None = None) -> tuple[dict | None, str]:
    """(seconds per evaluate part and per seed for `model`, where its rate comes from), priced by
    hfprune.estimates at `tflops` (the user's), else the CPU rate measured on a CPU grid's benchmark files, else
    the paper's GPU rate."""
    from hfprune import estimates, job_estimates, power
    from hfprune.limits import job_architecture

    try:
        rows = job_estimates.grid_table(cfg, {model: job_architecture(cfg, model)})
    except (OSError, HFPruneError) as exc:
        return None, f"not estimated ({model}'s config.json is not available here: {type(exc).__name__})"
    measured = power.measured_tflops(cfg, rows) if cfg["device"] == "cpu" and tflops is None else None
    if tflops is not None:
        rate, note = tflops, f"{tflops:.3g} effective TFLOP/s given with --tflops"
    elif measured is not None:
        rate, note = measured
    else:
        rate = estimates.paper_tflops()
        note = (f"{rate:.1f} effective TFLOP/s, the paper's GPU (hfprune.estimates)"
                + ("; this CPU grid has no complete benchmark files to measure a CPU rate" if cfg["device"] == "cpu"
                   else ""))
    return power.evaluation_costs(cfg, rows, model, rate), f"hfprune.estimates' FLOPs at {note}"


def power_plan_lines(table: pd.DataFrame, costs: dict | None, rate_note: str) -> list[str]:
    from hfprune import power

    rows = power.plan(table, costs)
    if rows.empty:
        return ["Power plan: every comparison in this table is decided.", ""]
    return [power.plan_markdown(rows, rate_note), ""]
