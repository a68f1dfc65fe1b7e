"""The grid's job listing: every model's job kinds over every grid variant, with hfprune.estimates' numbers per
job, their totals per stage, and the table, header and notes `hfprune estimate` prints."""

from __future__ import annotations

from hfprune.estimates import (
    TABLE5,
    evaluation_estimate,
    fp32_base_weights,
    paper_tflops,
    pruned_arch,
    recovery_estimate,
    recovery_tokens,
    scoring_estimate,
    seconds,
)
from hfprune.limits import GIB


def model_rows(name: str, arch, cfg: dict) -> list[dict]:
    """One row per kind of job of one model and criterion (a point config): jobs, and per job params, tokens,
    FLOPs, peak bytes; `variant` names the folder the jobs write to (the variant projected onto the axes the job
    reads), so rows that several variants share can be counted once."""
    from hfprune import grid
    from hfprune.config import cell_seeds, format_ratio, score_ratios

    rows = []

    def add(stage, what, jobs, est, chain, criterion=None):
        variant = grid.name(grid.projection(cfg, chain, criterion))
        rows.append({"model": name, "stage": stage, "what": what, "variant": variant, "criterion": criterion,
                     "jobs": jobs, **est})

    cells = {c: len(cell_seeds(cfg, name, c)) for c in cfg["criteria"]}
    for crit, seeds in cells.items():
        for ratio in score_ratios(cfg, crit):
            what = crit if ratio is None else f"{crit} r{ratio}"
            add("score", what, seeds, scoring_estimate(arch, cfg, crit, ratio), "score", crit)
    add("evaluate", "dense", 1, evaluation_estimate(arch, cfg), "evaluate_dense")
    for ratio in cfg["ratios"]:
        pruned = pruned_arch(arch, cfg, ratio)
        label = f"r{format_ratio(ratio)}"
        evaluated = evaluation_estimate(arch, cfg, pruned)
        recovered = recovery_estimate(pruned, cfg) if cfg["recovery"]["enabled"] else None
        for crit, seeds in cells.items():
            add("evaluate", f"pruned {label}", seeds, evaluated, "evaluate_pruned", crit)
            if recovered is not None:
                add("recover", label, seeds, recovered, "recover", crit)
                add("evaluate", f"recovered {label}", seeds, evaluated, "evaluate_recovered", crit)
    return rows


def grid_table(cfg: dict, archs: dict, tflops: float | None = None):
    """pandas DataFrame of every model's job kinds over every grid variant (a job that variants share counted
    once; the criteria's cells of one kind summed), with per-job time and the row's GPU-hours (jobs x time)."""
    import pandas as pd

    from hfprune import grid

    rows = [row for vcfg in grid.variants(cfg).values() for name, arch in archs.items()
            for row in model_rows(name, arch, vcfg)]
    df = pd.DataFrame(rows).drop_duplicates(["model", "stage", "what", "variant", "criterion"])
    keys = ["model", "stage", "what", "variant"]
    df = df.groupby(keys, sort=False, as_index=False).agg(
        {"jobs": "sum", **{c: "first" for c in df.columns if c not in (*keys, "jobs", "criterion")}})
    df["hours"] = [seconds(f, tflops) / 3600 for f in df["flops"]]
    df["gpu_hours"] = df["jobs"] * df["hours"]
    return df


def stage_totals(df):
    """Jobs and GPU-hours per stage (plan jobs are CPU-only and not counted), plus the grid's total."""
    totals = df.groupby("stage", sort=False)[["jobs", "gpu_hours"]].sum()
    totals.loc["total"] = totals.sum()
    return totals


def format_table(df, markdown: bool = False) -> str:
    """The per-job table in readable units."""
    out = df.assign(**{
        "params (B)": (df["params"] / 1e9).map(_sig),
        "tokens (M)": (df["tokens"] / 1e6).map(_sig),
        "PFLOP/job": (df["flops"] / 1e15).map(_sig),
        "peak GiB": (df["memory"] / GIB).map("{:.1f}".format),
        "h/job": df["hours"].map(_hours),
        "GPU-h": df["gpu_hours"].map(_sig),
    })[["model", "stage", "what", *(["variant"] if df["variant"].any() else []), "jobs", "params (B)", "tokens (M)",
        "PFLOP/job", "peak GiB", "h/job", "GPU-h"]]
    return out.to_markdown(index=False) if markdown else out.to_string(index=False)


def format_totals(totals, markdown: bool = False) -> str:
    out = totals.assign(jobs=totals["jobs"].astype(int), gpu_hours=totals["gpu_hours"].map(_sig))
    out = out.rename(columns={"gpu_hours": "GPU-hours"})
    return out.to_markdown() if markdown else out.to_string()


def _sig(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _hours(h: float) -> str:
    if h * 60 < 1:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.3g} min" if h < 1 else f"{h:.3g} h"


def header(tflops: float | None, source: str | None = None) -> str:
    """`source`: where a rate not given with --tflops comes from (a CPU rate measured on benchmark files)."""
    rate = tflops or paper_tflops()
    source = source or (f"{rate:.3g} effective TFLOP/s given with --tflops" if tflops else
              f"{rate:.1f} effective TFLOP/s: the paper's GPU, calibrated on its Table 5 (LLaMA-2-7B entropy "
              f"scoring, {TABLE5['num_sequences']} x {TABLE5['seq_len']} tokens, {TABLE5['seconds']} s)")
    return ("ESTIMATES, not measurements (hfprune.estimates names every assumption): time = FLOPs / " + source
            + "; compute only (no loading, downloads or tokenisation); peak memory per job; GPU-h = jobs x h/job"
            + "; plan and report jobs (CPU, seconds) not counted.")


def notes(cfg: dict, df, tflops: float | None) -> list[str]:
    """What the table leaves out or assumes for this config, one line each."""
    out = list(dict.fromkeys(n for row in df["notes"].dropna() for n in row))
    pruned = df[(df["stage"] == "evaluate") & (df["what"] != "dense")]
    if len(pruned):  # tokens do not depend on the model: the first pruned cell's split
        split = ", ".join(f"{k} {v[0] / 1e6:.3g}M" for k, v in pruned["parts"].iloc[0].items())
        out.append(f"evaluate tokens of a pruned cell: {split}")
    if cfg["device"] == "cpu" and not tflops:
        out.append("the config runs on CPU: times are at the GPU rate; pass --tflops with your CPU's rate")
    if cfg["recovery"]["enabled"]:
        _examples, per, _tokens = recovery_tokens(cfg)
        weights = "fp32" if fp32_base_weights(cfg) else cfg["dtype"]
        out.append(f"recovery: {per} tokens per example (LaMini estimate: LAMINI_TOKENS_PER_EXAMPLE) "
                   if cfg["recovery"]["data"] == "lamini" else f"recovery: {per}-token windows ")
        out[-1] += f"x examples x epochs; base weights {weights}; no gradient checkpointing"
    return out
