"""A power plan: for each undecided comparison of a Verdict table, how many units (docs per task, perplexity
windows, fidelity prompts, calibration seeds) would decide it at its margin with 80 % power, and what the extra
evaluation costs (hfprune.estimates' FLOPs at a GPU rate, or at a CPU rate measured on the grid's own Snakemake
benchmark files).

The model: the grid's own per-cluster standard deviation of the contrast, sigma = se * sqrt(clusters), stays as it
is and the clusters grow by the same factor as the units (units per cluster fixed); the true difference is the
observed one. Where |Δ| < margin the goal is equivalence (TOST power: P(both one-sided tests reject), the usual
lower bound P(T_upper < -t) - P(T_lower <= t) on noncentral t), else a difference (two-sided t power). Holm's
first step is the strictest: alpha / (tests in the table's family), a conservative stand-in for Holm. Seeds: the
same on the over-draws interval, its per-seed-pair spread held fixed (approx.: it holds the docs' share too).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from hfprune.comparisons import MIN_SEEDS
from hfprune.stats import ALPHA, POWER

CAP = 10 ** 6  # clusters beyond which a plan says "more than"


def _power(goal: str, g: int, diff: float, sigma: float, margin: float, alpha: float) -> float:
    from scipy import stats as st

    se, df = sigma / math.sqrt(g), g - 1
    if goal == "equivalence":
        t = st.t.ppf(1 - alpha, df)
        return max(0.0, st.nct.cdf(-t, df, (diff - margin) / se) - st.nct.cdf(t, df, (diff + margin) / se))
    t = st.t.ppf(1 - alpha / 2, df)
    nc = abs(diff) / se
    return st.nct.sf(t, df, nc) + st.nct.cdf(-t, df, nc)


def goal(diff: float, margin: float) -> str | None:
    """What can decide a comparison: equivalence inside its margin, a difference outside it."""
    if math.isfinite(margin) and abs(diff) < margin:
        return "equivalence"
    return "difference" if diff != 0 else None


def clusters_needed(diff: float, se: float, clusters: int, margin: float, alpha: float = ALPHA,
                    power: float = POWER) -> float:
    """Smallest number of clusters that decides the comparison with `power` (math.inf beyond CAP, NaN where
    nothing can decide it or the spread is unknown)."""
    aim = goal(diff, margin)
    if aim is None or not (math.isfinite(se) and se > 0 and clusters >= 2):
        return math.nan
    sigma = se * math.sqrt(clusters)
    lo, hi = 2, 2
    while _power(aim, hi, diff, sigma, margin, alpha) < power:
        if hi >= CAP:
            return math.inf
        lo, hi = hi, min(hi * 2, CAP)
    while lo < hi:  # power grows with the clusters: the first g that reaches it
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _power(aim, mid, diff, sigma, margin, alpha) < power else (lo, mid)
    return float(hi)


# measure -> (unit, evaluate part of hfprune.estimates that scales with it, the setting that sets it)
UNITS = {"acc": ("docs per task", "lm-eval", "evaluation.limit"),
         "gold_prob": ("docs per task", "lm-eval", "evaluation.limit"),
         "flip": ("docs per task", "lm-eval", "evaluation.limit"),
         "logppl": ("windows", "perplexity", "evaluation.perplexity.max_tokens"),
         "js": ("prompts", "fidelity", "evaluation.fidelity.num_prompts"),
         "jaccard": ("prompts", "fidelity", "evaluation.fidelity.num_prompts"),
         "kl": ("prompts", "fidelity", "evaluation.fidelity.num_prompts"),
         "top1": ("prompts", "fidelity", "evaluation.fidelity.num_prompts")}


def plan(table: pd.DataFrame, costs: dict | None = None) -> pd.DataFrame:
    """One row per undecided comparison of a (headline) Verdict table: the goal, the units and seeds that would
    decide it, and (with `costs` from `evaluation_costs`) the extra evaluation minutes."""
    if table.empty:
        return pd.DataFrame()
    alpha = ALPHA / max(1, int(table["p_decide"].notna().sum()))
    rows = []
    for _, r in table[table["verdict"] == "undecided"].iterrows():
        name = r["measure"].split(":")[0]
        aim = goal(r["diff"], r["margin"])
        factor = clusters_needed(r["diff"], r["se"], int(r["clusters"]), r["margin"], alpha) / r["clusters"]
        row = {"comparison": f"{r['a']} − {r['b']}", "measure": r["label"], "goal": aim or "none (Δ = 0, no margin)",
               "factor": factor, "unit": None, "now": math.nan, "needed": math.nan, "setting": None,
               "seeds_now": int(r["pairs"]), "seeds_needed": math.nan, "minutes": math.nan,
               "seed_minutes": math.nan}
        if name in UNITS:
            row["unit"], part, row["setting"] = UNITS[name]
            row["now"] = float(r["n"] / r["pairs"] / r["strata"])  # per seed pair, per task of an average
            row["needed"] = math.ceil(row["now"] * factor) if math.isfinite(factor) else factor
            if costs is not None and math.isfinite(factor):
                seconds = sum(s for p, s in costs.items() if p.startswith(part))
                row["minutes"] = seconds * max(factor - 1, 0.0) / 60
        if math.isfinite(r.get("se_draws", math.nan)):
            row["seeds_needed"] = clusters_needed(r["diff"], r["se_draws"], int(r["pairs"]), r["margin"], alpha)
            if costs is not None and math.isfinite(row["seeds_needed"]):
                row["seed_minutes"] = costs["seed"] * max(row["seeds_needed"] - row["seeds_now"], 0) / 60
        rows.append(row)
    return pd.DataFrame(rows)


def _count(value: float) -> str:
    if not math.isfinite(value):
        return f"> {CAP:,}" if value == math.inf else "n/a"
    return f"{value:,.0f}"


def _minutes(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.1f}" if value >= 0.1 or value == 0 else f"{value * 60:.2g} s"


def plan_markdown(plan_rows: pd.DataFrame, rate_note: str) -> str:
    """The plan as printed under a Verdict table."""
    out = pd.DataFrame({
        "comparison": plan_rows["comparison"], "measure": plan_rows["measure"], "to show": plan_rows["goal"],
        "units (per seed) now → needed": [f"{u}: {_count(n)} → {_count(m)} ({s})" if u else "n/a" for u, n, m, s in
                                          zip(plan_rows["unit"], plan_rows["now"], plan_rows["needed"],
                                              plan_rows["setting"])],
        "seeds now → needed (over draws)": [f"{n} → {_count(m)}" if n >= MIN_SEEDS else
                                            f"{n} → not estimable ({MIN_SEEDS} needed to measure the seed spread)"
                                            for n, m in zip(plan_rows["seeds_now"], plan_rows["seeds_needed"])],
        "extra min (units)": [_minutes(m) for m in plan_rows["minutes"]],
        "extra min (seeds)": [_minutes(m) for m in plan_rows["seed_minutes"]]})
    return (out.to_markdown(index=False, disable_numparse=True) + "\n\n" + "Power plan (hfprune.power): units that "
            "would decide each undecided comparison with 80 % power at its margin, assuming the observed Δ is true "
            f"and the grid's per-cluster spread holds; α split over the table's tests. Cost: {rate_note}.")


# ---- cost: hfprune.estimates' FLOPs of the model's evaluate jobs at a GPU or measured CPU rate

def benchmark_seconds(cfg: dict, models=None) -> tuple[float, int]:
    """(seconds, files) of the evaluate jobs' Snakemake benchmark files of this experiment (of `models` only,
    when given: a folder of each job's path names its model)."""
    root = Path(cfg["results_dir"]) / cfg["experiment"] / "benchmarks" / "evaluate"
    total, files = 0.0, 0
    wanted = None if models is None else set(models)
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        if wanted is not None and not wanted & set(path.relative_to(root).parts[:-1]):
            continue
        frame = pd.read_csv(path, sep="\t")
        if "s" in frame.columns and len(frame):
            total, files = total + float(frame["s"].iloc[-1]), files + 1
    return total, files


def measured_tflops(cfg: dict, grid_rows: pd.DataFrame) -> tuple[float, str] | None:
    """The effective TFLOP/s this machine reached on the grid's evaluate jobs (their estimated FLOPs over their
    benchmarked seconds), with a note; None unless every evaluate job has a benchmark file."""
    evaluate = grid_rows[grid_rows["stage"] == "evaluate"]
    seconds, files = benchmark_seconds(cfg, set(evaluate["model"]))
    if files == 0 or files != int(evaluate["jobs"].sum()) or seconds <= 0:
        return None
    rate = float((evaluate["jobs"] * evaluate["flops"]).sum()) / seconds / 1e12
    return rate, (f"{rate:.3g} effective TFLOP/s measured on this grid's {files} evaluate benchmark files "
                  f"({seconds / 60:.1f} min of whole-job wall time, loading included: a low rate, so costs err high)")


def evaluation_costs(cfg: dict, grid_rows: pd.DataFrame, model: str, tflops: float) -> dict[str, float]:
    """Seconds per evaluate part (lm-eval, perplexity <source>, fidelity) summed over the model's evaluate jobs
    (what raising that part's units re-runs), and `seed`: the seconds one more calibration seed adds (the
    model's seeded score, evaluate and recover jobs over its seeds)."""
    from hfprune.config import cell_seeds

    out: dict[str, float] = {}
    mine = grid_rows[grid_rows["model"] == model]
    for _, r in mine[mine["stage"] == "evaluate"].iterrows():
        for part, (_tokens, flops) in r["parts"].items():
            out[part] = out.get(part, 0.0) + r["jobs"] * flops / (tflops * 1e12)
    seeded = mine[mine["what"] != "dense"]
    seeds = max(len(cell_seeds(cfg, model, c)) for c in cfg["criteria"])
    out["seed"] = float((seeded["jobs"] * seeded["flops"]).sum()) / seeds / (tflops * 1e12)
    return out
