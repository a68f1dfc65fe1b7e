"""The report of one experiment, verdicts first, from its metrics JSONs, per-unit records, plans and score sidecars.

`write_report(cfg)` writes ``<results_dir>/<experiment>/report/`` atomically (the whole folder at once):

- ``report.md``: first the **Verdicts** — per model x ratio (x recovered), every criterion against the baseline
  criterion (``report.baseline``, default the paper's CE) and against the dense model: paired differences with
  95 % CIs on log-perplexity, fidelity and (gold-choice probability, accuracy) task averages, Holm-corrected
  marks (equivalent / better / worse / undecided at ``report.margins``, hfprune.equivalence), each with its
  inference target, the interval over calibration draws beside it, the smallest difference the grid can detect and
  a power plan (hfprune.power); a forest plot and, with several calibration seeds, the marks per measure. Then the paper's
  table forms, every number a mean over calibration seeds with its uncertainty:
- ``tables/<model>.verdict.r<ratio>.csv`` (every paired comparison, per task too), ``tables/<model>.main.*``
  (Table 1 form: accuracy with 95 % CIs and n, average, perplexity, fidelity, size), ``<model>.ablation.*``
  (Table 6 form, with CIs and which cells differ from the baseline), ``<model>.fidelity.*`` (Table 7),
  ``<model>.efficiency.*`` (Table 4, medians with the per-repeat ratio range), ``scoring_cost.*`` (Table 5);
  each as CSV (numbers), markdown and LaTeX (formatted);
- ``plots/<model>.{forest,rank_stability,avg_vs_ratio,ppl_vs_ratio,neurons_kept}.png``.

Where a model's config entry has a ``paper_name`` that the paper reports (hfprune/reference/*.csv), the
paper's published rows sit beside ours, marked "(paper)". Only the cells the config asks for are reported
(metrics left over from an earlier, larger config are ignored); cells not yet evaluated are listed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hfprune import comparisons, equivalence, grid, layout, verdict_notes
from hfprune.config import baseline_criterion, cell_seeds, score_ratios
from hfprune.data import source_label
from hfprune.errors import HFPruneError
from hfprune.plan import format_ratio
from hfprune.plots import plot_neurons_kept
from hfprune.plots import pyplot as _pyplot
from hfprune.plots import save as _save
from hfprune.runtime import atomic_path, read_json
from hfprune.stats import mean_interval

REFERENCE_DIR = Path(__file__).parent / "reference"
# What a criterion's rows are: the paper's Taylor criteria on activations (its CE / SD / IE ablation) apart from
# the weight-level methods it compares with in Table 1
CRITERION_LABELS = {"taylor_ce": "CE criterion (Taylor, act.)", "taylor_kd": "SD criterion (Taylor, act.)",
                    "taylor_entropy": "IE (HFPrune)", "sdmprune": "SDMPrune (method)",
                    "llm_pruner": "LLM-Pruner (method)"}
CELL_KEYS = ["model", "criterion", "ratio", "recovered"]
SPREAD = ("average", "js_distance", "topk_jaccard", "kl")  # shown as mean ± sd over calibration seeds


def experiment_dir(cfg: dict) -> Path:
    return Path(cfg["results_dir"]) / cfg["experiment"]


def reference(name: str) -> pd.DataFrame:
    """A table of the paper's published figures (hfprune/reference/<name>.csv)."""
    return pd.read_csv(REFERENCE_DIR / f"{name}.csv")


def _pct(value) -> float | None:
    return None if value is None else 100.0 * float(value)


# ---- reading the experiment

def cell_row(metrics: dict) -> dict:
    """One metrics JSON (docs/CONTRACTS.md) -> one flat row; accuracies in %, task columns named as in the
    paper's tables (the task's `column`)."""
    cell = metrics["cell"]
    row = {"model": cell["model"], "criterion": cell["criterion"], "ratio": float(cell["ratio"]),
           "recovered": bool(cell["recovered"]), "seed": cell.get("seed")}
    for task, res in (metrics.get("tasks") or {}).items():
        row[res.get("column", task)] = _pct(res["value"])
    row["average"] = _pct(metrics.get("average"))
    for source, res in (metrics.get("perplexity") or {}).items():
        row[f"ppl_{source}"] = res["ppl"]
    fid = metrics.get("fidelity") or {}
    row.update(js_distance=fid.get("js_distance"), topk_jaccard=fid.get("topk_jaccard"), kl=fid.get("kl"),
               fidelity_k=fid.get("k"))
    eff = metrics.get("efficiency") or {}
    for key in ("params", "params_ratio", "macs_per_token", "prefill_ms", "prefill_ms_ratio", "decode_tok_s",
                "decode_tok_s_ratio", "decode_static_tok_s", "decode_static_tok_s_ratio"):
        row[key] = eff.get(key)
    for key in ("prefill_ms_ratio_range", "decode_tok_s_ratio_range", "decode_static_tok_s_ratio_range"):
        lo, hi = eff.get(key) or (None, None)
        row[f"{key.removesuffix('_range')}_min"], row[f"{key.removesuffix('_range')}_max"] = lo, hi
    row["achieved_ratio"] = (metrics.get("meta") or {}).get("achieved_ratio")
    return row


def expected_cells(cfg: dict) -> list[tuple]:
    """(model, criterion, formatted ratio, recovered, seed) of every cell the config asks for, dense first."""
    cells = []
    for model in (m["name"] for m in cfg["models"]):
        cells.append((model, "dense", format_ratio(0.0), False, None))
        for crit in cfg["criteria"]:
            for ratio in cfg["ratios"]:
                for seed in cell_seeds(cfg, model, crit):
                    cells.append((model, crit, format_ratio(ratio), False, seed))
                    if cfg["recovery"]["enabled"]:
                        cells.append((model, crit, format_ratio(ratio), True, seed))
    return cells


def load_runs(cfg: dict) -> tuple[pd.DataFrame, dict[str, str], list[tuple]]:
    """(one row per evaluated draw of a configured cell of one grid point, {task: column} in suite order,
    configured draws not found)."""
    rows, columns, missing = [], {}, []
    for key in expected_cells(cfg):
        model, crit, ratio, recovered, seed = key
        path = comparisons.cell_files(cfg, model, crit, float(ratio), recovered)[seed]
        if not path.is_file():
            missing.append(key)
            continue
        metrics = read_json(path, "metrics file")
        try:
            rows.append(cell_row(metrics))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # hand-edited or another tool's JSON
            raise HFPruneError(f"metrics file {str(path)!r}: not a metrics JSON of docs/CONTRACTS.md "
                               f"({type(exc).__name__}: {exc}); delete it and rerun its evaluate job") from None
        for task, res in (metrics.get("tasks") or {}).items():
            columns.setdefault(task, res.get("column", task))
    return pd.DataFrame(rows), columns, missing


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the mean over its calibration seeds (perplexity: geometric mean), `<col>_sd` across
    seeds for perplexity and fidelity, `seeds` = how many draws."""
    runs = runs.astype({c: float for c in runs.columns if runs[c].isna().all()})  # e.g. no accuracy at all
    numeric = [c for c in runs.columns if c not in CELL_KEYS + ["seed"] and pd.api.types.is_numeric_dtype(runs[c])]
    ppl = [c for c in numeric if c.startswith("ppl_")]
    grouped = runs.groupby(CELL_KEYS, sort=False)
    out = grouped[numeric].mean()
    if ppl:
        out[ppl] = np.exp(grouped[ppl].agg(lambda v: np.log(v).mean()))
    spread = [c for c in numeric if c in SPREAD or c in ppl]
    sd = grouped[spread].std(ddof=1)
    for col in spread:
        out[f"{col}_sd"] = sd[col]
    out["seeds"] = grouped.size()
    return out.reset_index()


def load_records(cfg: dict, model: str, cells: pd.DataFrame) -> dict[tuple, dict]:
    """(criterion, formatted ratio, recovered) -> {seed: per-unit records} for every cell of `model` whose
    configured draws were all evaluated."""
    out = {}
    for _, row in cells[cells["model"] == model].iterrows():
        try:
            out[(row["criterion"], format_ratio(row["ratio"]), bool(row["recovered"]))] = comparisons.load_cell(
                cfg, model, row["criterion"], row["ratio"], bool(row["recovered"]))
        except HFPruneError:
            continue  # a draw is missing: the cell is listed as missing, its comparisons wait for it
    return out


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


def load_plans(cfg: dict, model: str) -> dict[str, dict]:
    """'<criterion> r<ratio>' -> plan of the first calibration seed, for the configured cells that have one."""
    out = {}
    for crit in cfg["criteria"]:
        seed = cell_seeds(cfg, model, crit)[0]
        for ratio in cfg["ratios"]:
            path = Path(layout.plan_file(experiment_dir(cfg), grid.variant_dir(cfg, "plan", crit), model, crit, seed,
                                         format_ratio(ratio)))
            if path.is_file():
                out[f"{crit} r{format_ratio(ratio)}"] = read_json(path, "plan file")
    return out


def scoring_cost(cfg: dict) -> pd.DataFrame:
    """Mean wall time and peak memory of the score jobs of each model x criterion (over its seeds)."""
    rows = []
    for model in (m["name"] for m in cfg["models"]):
        for crit in cfg["criteria"]:
            v = grid.variant_dir(cfg, "score", crit)
            metas = [read_json(p, "score sidecar") for s in cell_seeds(cfg, model, crit)
                     for r in score_ratios(cfg, crit)
                     if (p := Path(layout.score_file(experiment_dir(cfg), v, model, crit, s, r, ".json"))).is_file()]
            if not metas:
                continue
            cal = metas[0].get("calibration") or {}
            peaks = [m["peak_memory_mb"] for m in metas if m.get("peak_memory_mb") is not None]
            rows.append({"model": model, "method": "ours", "criterion": crit,
                         "seconds": float(np.mean([m["seconds"] for m in metas])),
                         "peak_memory_gb": max(peaks) / 1024 if peaks else None, "jobs": len(metas),
                         "calibration": f"{cal['num_sequences']} {source_label(cal['source'])} samples x {cal['seq_len']} "
                                        "tokens" if cal.get("num_sequences") else "none (needs no data)",
                         "device": metas[0].get("device"), "source": "ours"})
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


def _task_label(label: str, columns: dict[str, str]) -> str:
    for task, column in columns.items():
        label = label.replace(task, column)
    return label


def verdict_markdown(table: pd.DataFrame, columns: dict[str, str]) -> str:
    """Wide form: a row per comparison, a column per measure, 'Δ [lo, hi] mark' in each cell."""
    rows = []
    for (a, b), group in table.groupby(["a", "b"], sort=False):
        row = {"comparison": f"{a} − {b}", "seed pairs": str(int(group["pairs"].iloc[0])),
               "target": " / ".join(dict.fromkeys(group["target"]))}
        for _, r in group.iterrows():
            row[f"Δ {_task_label(r['label'], columns)}"] = verdict_notes.verdict_cell(r)
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def power_line(table: pd.DataFrame, columns: dict[str, str]) -> str:
    """The smallest difference each measure can detect with this grid's units (median over comparisons)."""
    parts = []
    for measure, group in table.groupby("measure", sort=False):
        r = group.iloc[0]
        mde = float(np.nanmedian(group["mde"])) if group["mde"].notna().any() else math.nan
        value = comparisons.format_value(mde, r["scale"]).lstrip("+")
        parts.append(f"{_task_label(r['label'], columns)} {value} (n {int(r['n'])}, {int(r['clusters'])} clusters)")
    return ("Smallest detectable |Δ| (80 % power, α = 0.05, two-sided; the median over the table's rows, each row's "
            "own is in the CSV and `hfprune compare`; n = paired units pooled over seed pairs): "
            + "; ".join(parts) + ".")


# ---- tables (numbers) and their display form

def criterion_label(crit: str) -> str:
    """`<name> — <what it is>` for a criterion with a display label, else its name."""
    return f"{crit} — {CRITERION_LABELS[crit]}" if crit in CRITERION_LABELS else crit


def _method(row) -> str:
    if row["criterion"] == "dense":
        return "dense"
    label = criterion_label(row["criterion"])
    return f"{label} +LoRA" if row["recovered"] else label


def _finetuned(row) -> str:
    if row["criterion"] == "dense":
        return "not fine-tuned"
    return "LoRA" if row["recovered"] else "no"


def _with(col: str, *suffixes: str) -> list[str]:
    return [col] + [f"{col}{s}" for s in suffixes]


def main_table(cells: pd.DataFrame, columns: list[str], ratios: list[float], paper_name: str | None) -> pd.DataFrame:
    """Table 1 form for one model's cells: accuracy per task with its 95 % CI, average, n docs, perplexity and
    fidelity (mean ± sd over seeds), size."""
    df = cells.copy()
    df.insert(0, "method", [_method(r) for _, r in df.iterrows()])
    df["fine_tuned"] = [_finetuned(r) for _, r in df.iterrows()]
    df["source"] = "ours"
    if paper_name:
        paper = reference("table1_accuracy")
        paper = paper[(paper["model"] == paper_name)
                      & paper["ratio"].map(format_ratio).isin({format_ratio(r) for r in [0.0, *ratios]})]
        paper = paper.assign(method=paper["method"] + " (paper)", source="paper",
                             fine_tuned=paper["finetuned"].map({"yes": "LoRA", "no": "not fine-tuned"}))
        paper_tasks = [c for c in paper.columns if c not in ("model", "ratio", "method", "finetuned", "average",
                                                             "source", "fine_tuned")]
        columns = columns + [c for c in paper_tasks if c not in columns]  # the paper's tasks our suite lacks
        df = pd.concat([df, paper.drop(columns=["model", "finetuned"])], ignore_index=True)
    keep = (["method", "ratio", "fine_tuned", "source", "seeds", "n_docs"]
            + [x for c in columns for x in _with(c, "_lo", "_hi")] + _with("average", "_lo", "_hi")
            + [x for c in sorted(c for c in df.columns if c.startswith("ppl_") and not c.endswith("_sd"))
               for x in _with(c, "_sd")]
            + _with("js_distance", "_sd") + _with("topk_jaccard", "_sd") + ["params"])
    df = df[[c for c in keep if c in df.columns]]
    if "seeds" in df.columns:
        df["seeds"] = df["seeds"].astype("Int64")
    df = df.assign(_order=df["source"].map({"ours": 0, "paper": 1}))
    return df.sort_values(["ratio", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def ablation_table(cells: pd.DataFrame, criteria: list[str], paper_name: str | None,
                   marks: dict[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """Table 6 form: average accuracy (%) by ratio (rows) and criterion (columns), no fine-tuning, with its
    95 % CI and, from the Verdict tables, whether it differs from the baseline criterion."""
    pruned = cells[(cells["criterion"] != "dense") & ~cells["recovered"]]
    table = pd.DataFrame({"ratio": sorted(pruned["ratio"].unique())}).set_index("ratio")
    for crit in criteria:
        rows = pruned[pruned["criterion"] == crit].set_index("ratio")
        if rows.empty:
            continue
        table[crit] = rows["average"]
        for suffix in ("_lo", "_hi"):
            if f"average{suffix}" in rows.columns:
                table[f"{crit}{suffix}"] = rows[f"average{suffix}"]
        if marks:
            table[f"{crit}_mark"] = [marks.get((crit, format_ratio(r)), "") for r in table.index]
    if paper_name:
        paper = reference("table6_ablation")
        paper = paper[paper["model"] == paper_name]
        for crit, group in paper.groupby("criterion", sort=False):
            col = group.set_index("ratio")["average"]
            table[f"{criterion_label(crit)} (paper)"] = col.reindex(table.index)
    return table.reset_index()


def fidelity_table(cells: pd.DataFrame, criteria: list[str], paper_name: str | None) -> pd.DataFrame:
    """Table 7 form: JS distance and top-k Jaccard to the dense model by ratio and criterion, no fine-tuning
    (mean ± sd over seeds)."""
    pruned = cells[(cells["criterion"] != "dense") & ~cells["recovered"]]
    out = pd.DataFrame({"ratio": sorted(pruned["ratio"].unique())}).set_index("ratio")
    for crit in criteria:
        rows = pruned[pruned["criterion"] == crit].set_index("ratio")
        if "js_distance" in rows.columns and len(rows):
            for src, name in (("js_distance", "JS"), ("topk_jaccard", "top-k Jaccard")):
                out[f"{crit} {name}"] = rows[src]
                if f"{src}_sd" in rows.columns:
                    out[f"{crit} {name}_sd"] = rows[f"{src}_sd"]
    if paper_name:
        paper = reference("table7_fidelity")
        for crit, group in paper[paper["model"] == paper_name].groupby("criterion", sort=False):
            group = group.set_index("ratio")
            label = f"{criterion_label(crit)} (paper, top-{group['k'].iloc[0]})"
            out[f"{label} JS"] = group["js_distance"].reindex(out.index)
            out[f"{label} Jaccard"] = group["topk_jaccard"].reindex(out.index)
    return out.reset_index()


def efficiency_table(cells: pd.DataFrame, paper_name: str | None) -> pd.DataFrame:
    """Table 4 form: size and speed of every non-recovered cell (medians of alternating repeats), with ratios
    to the dense model and the [min, max] of the per-repeat ratios."""
    df = cells[~cells["recovered"]].copy()
    df.insert(0, "method", [_method(r) for _, r in df.iterrows()])
    df["source"] = "ours"
    cols = (["method", "ratio", "source", "params", "params_ratio", "macs_per_token", "prefill_ms"]
            + _with("prefill_ms_ratio", "_min", "_max") + ["decode_tok_s"] + _with("decode_tok_s_ratio", "_min", "_max")
            + ["decode_static_tok_s"] + _with("decode_static_tok_s_ratio", "_min", "_max"))
    # the static-cache (CUDA graphs) decode columns only where it was measured (CUDA)
    df = df[[c for c in cols if c in df.columns and not (c.startswith("decode_static") and df[c].isna().all())]]
    if paper_name:
        paper = reference("table4_speed")
        paper = paper[paper["model"] == paper_name].assign(method="dense / HFPrune (paper)", source="paper")
        df = pd.concat([df, paper.drop(columns=["model"])], ignore_index=True)
    return df.sort_values(["ratio", "source"], kind="stable").reset_index(drop=True)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value, fmt: str) -> str:
    if _missing(value):
        return ""
    if isinstance(value, str):
        return value
    return format(value, fmt)


def _params(value) -> str:
    if _missing(value):
        return ""
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"


def _formatter(col: str, values: pd.Series):
    if col == "params":
        return _params
    if col == "ratio":
        return format_ratio
    if col.startswith("ppl_") or col in ("prefill_ms", "decode_tok_s", "decode_static_tok_s"):
        return lambda v: _number(v, ".2f")
    if (col.endswith("_ratio") or "JS" in col or "Jaccard" in col
            or col in ("js_distance", "topk_jaccard", "kl")):
        return lambda v: _number(v, ".3f")
    if col == "macs_per_token":
        return lambda v: _number(v / 1e6, ".1f") if isinstance(v, (int, float)) else ""
    if pd.api.types.is_float_dtype(values):
        return lambda v: _number(v, ".1f")
    return lambda v: "" if _missing(v) else str(v)


COMPANIONS = ("_lo", "_hi", "_sd", "_min", "_max", "_mark")


def display(df: pd.DataFrame, pm: str = "±") -> pd.DataFrame:
    """Numbers -> strings as the paper prints them: accuracy `45.1 [38.2, 52.0]` (95 % CI), perplexity and
    fidelity `mean ± sd` over seeds, speed ratios `0.93 [0.90-0.97]` (per-repeat range), marks after values."""
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        if any(col.endswith(s) and col[: -len(s)] in df.columns for s in COMPANIONS):
            continue
        fmt = _formatter(col, df[col])
        text = df[col].map(fmt)
        if f"{col}_lo" in df.columns:
            text = [t + (f" [{fmt(lo)}, {fmt(hi)}]" if t and not _missing(lo) else "")
                    for t, lo, hi in zip(text, df[f"{col}_lo"], df[f"{col}_hi"])]
        if f"{col}_sd" in df.columns:
            text = [t + (f" {pm} {fmt(sd)}" if t and not _missing(sd) else "") for t, sd in zip(text, df[f"{col}_sd"])]
        if f"{col}_min" in df.columns:
            text = [t + (f" [{fmt(lo)}-{fmt(hi)}]" if t and not _missing(lo) else "")
                    for t, lo, hi in zip(text, df[f"{col}_min"], df[f"{col}_max"])]
        if f"{col}_mark" in df.columns:
            text = [t + (f" {m}" if t and isinstance(m, str) and m else "") for t, m in zip(text, df[f"{col}_mark"])]
        out["MMACs/token" if col == "macs_per_token" else col] = list(text)
    return out


def _latex_escape(text: str) -> str:
    for char in ("\\", "&", "%", "$", "#", "_", "{", "}"):
        text = text.replace(char, "\\" + char)
    return text.replace("≈", "$\\approx$").replace("**", "")


def write_table(df: pd.DataFrame, base: Path) -> dict[str, Path]:
    """<base>.csv (numbers), <base>.md and <base>.tex (formatted); returns the paths by format."""
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {fmt: base.with_name(f"{base.name}.{fmt}") for fmt in ("csv", "md", "tex")}
    df.to_csv(paths["csv"], index=False)
    paths["md"].write_text(display(df).to_markdown(index=False, disable_numparse=True) + "\n")
    tex = display(df, pm="PLUSMINUS")
    tex = tex.map(lambda s: _latex_escape(s).replace("PLUSMINUS", "$\\pm$"))
    tex.columns = [_latex_escape(str(c)) for c in tex.columns]
    paths["tex"].write_text(tex.to_latex(index=False, escape=False))
    return paths


# ---- plots

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


# ---- the report

def _links(paths: dict[str, Path], root: Path) -> str:
    return " · ".join(f"[{fmt.upper()}]({os.path.relpath(p, root)})" for fmt, p in paths.items() if fmt != "md")


def _section(lines: list[str], heading: str, df: pd.DataFrame, base: Path, root: Path, note: str = "") -> None:
    if df.empty:
        return
    paths = write_table(df, base)
    lines += [f"### {heading}", "", paths["md"].read_text().rstrip(), "", _links(paths, root)]
    if note:
        lines += ["", note]
    lines.append("")


def _params_from_plans(cells: pd.DataFrame, plans: dict[str, dict]) -> pd.DataFrame:
    """Parameter counts from the plans where efficiency was not measured (they count the same way)."""
    cells = cells.copy()
    if "params" not in cells.columns:
        cells["params"] = None
    for i, row in cells.iterrows():
        if pd.notna(row["params"]):
            continue
        if row["criterion"] == "dense" and plans:
            cells.loc[i, "params"] = next(iter(plans.values()))["params_dense"]
        elif (plan := plans.get(f"{row['criterion']} r{format_ratio(row['ratio'])}")) is not None:
            cells.loc[i, "params"] = plan["params_pruned"]
    return cells


def _with_intervals(cells: pd.DataFrame, records: dict, columns: dict[str, str]) -> pd.DataFrame:
    """Accuracy CIs and n docs from each cell's records (cells without complete records keep none)."""
    rows = []
    for _, row in cells.iterrows():
        key = (row["criterion"], format_ratio(row["ratio"]), bool(row["recovered"]))
        rows.append({**row.to_dict(), **(accuracy_intervals(records[key], columns) if key in records else {})})
    return pd.DataFrame(rows)


def _header(cfg: dict) -> list[str]:
    ev, cal = cfg["evaluation"], cfg["calibration"]
    docs = "all docs" if ev["limit"] is None else f"{ev['limit']} seeded random docs per task"
    recovery = "LoRA (rows marked +LoRA)" if cfg["recovery"]["enabled"] else "off"
    seeds = {m["name"]: (m.get("seeds") or cal["seeds"] or [cal["seed"]]) for m in cfg["models"]}
    seed_text = "; ".join(f"{name}: {', '.join(map(str, s))}" for name, s in seeds.items())
    return [
        f"# hfprune report: experiment `{cfg['experiment']}`", "",
        (f"Models: {', '.join(m['name'] for m in cfg['models'])}. Criteria: {', '.join(cfg['criteria'])}. "
         f"Ratios (fraction of all parameters removed): {', '.join(map(format_ratio, cfg['ratios']))}. "
         f"Calibration: {cal['num_sequences']} x {cal['seq_len']} tokens of `{source_label(cal['source'])}`, seeds {seed_text}. "
         f"Evaluation: suite `{ev['suite']}`, {docs} (seed {ev['subsample_seed']}), 0-shot; "
         f"perplexity on {', '.join(map(source_label, ev['perplexity']['sources']))} "
         f"({ev['perplexity']['protocol']} protocol); fidelity on {ev['fidelity']['num_prompts']} "
         f"`{source_label(ev['fidelity']['source'])}` prompts. Recovery: {recovery}."),
        "",
    ]


def _verdict_intro(cfg: dict) -> list[str]:
    return [
        "## Verdicts", "",
        (f"Each row compares criterion A with the baseline `{baseline_criterion(cfg)}` (first table of a ratio) "
         "or with the dense model (second), **paired** on the same docs, perplexity windows and fidelity prompts, "
         "pooled over calibration seeds (seed s of A with seed s of B; a criterion without a seed, such as "
         "magnitude, pairs with every seed). Δ = A − B with its 95 % CI, cluster-robust (docs on one passage, "
         "windows of one document and one doc's repeats across seeds are one cluster). log-ppl: mean NLL per "
         "token in nats (Δ −0.05 ≈ 5 % lower perplexity; lower is better); JS / top-k Jaccard: fidelity to the "
         "dense model (JS lower, Jaccard higher is better); gold prob: probability of the correct choice under the "
         "task's normalisation, averaged over tasks (pp); acc: accuracy averaged over tasks (pp)."),
        "",
        verdict_notes.marks_intro(cfg),
        "",
        ("On small models that score near chance on the zero-shot tasks, accuracy differences stay "
         "undecided unless they are very large: perplexity and fidelity separate the criteria far "
         "better, and the verdicts above rest on them."),
        "",
    ]


def _verdicts(cfg: dict, model: str, records: dict, columns: dict[str, str], root: Path,
              prefix: str) -> tuple[list[str], dict]:
    """The Verdict section of one model and the ablation marks {(criterion, ratio): mark} it implies; its files
    are named `<prefix><model>.*`."""
    lines, marks, forest = [f"### {model}", "", *verdict_notes.seed_effect_warning(cfg, model)], {}, []
    base = baseline_criterion(cfg)
    costs, rate_note = verdict_notes.power_costs(cfg, model)
    tables_dir = root / "tables"
    (tables_dir / prefix).mkdir(parents=True, exist_ok=True)
    for recovered in (False, True) if cfg["recovery"]["enabled"] else (False,):
        for ratio in map(format_ratio, cfg["ratios"]):
            headline = verdict_tables(cfg, records, ratio, recovered)
            if headline["baseline"].empty and headline["dense"].empty:
                continue
            tag = f"r{ratio}{'.recovered' if recovered else ''}"
            detail = verdict_tables(cfg, records, ratio, recovered, headline=False)
            csv = tables_dir / f"{prefix}{model}.verdict.{tag}.csv"
            pd.concat([t.assign(family=name) for name, t in detail.items() if not t.empty]).to_csv(csv, index=False)
            lines += [f"#### ratio {ratio}{' +LoRA' if recovered else ''}", ""]
            for name, table in headline.items():
                if table.empty:
                    continue
                lines += [f"vs {base if name == 'baseline' else 'dense'}:", "",
                          verdict_markdown(table, columns), "", power_line(table, columns), "",
                          verdict_notes.target_line(cfg, table), ""]
                if name == "baseline":
                    lines += verdict_notes.power_plan_lines(table, costs, rate_note)
            lines += [f"Every measure, per task too: [CSV]({os.path.relpath(csv, root)})", ""]
            table = headline["baseline"]
            if not table.empty:
                forest.append(table.assign(row=[f"{a} r{ratio}{' +LoRA' if recovered else ''}" for a in table["a"]]))
                if not recovered:
                    for _, r in table[table["measure"] == "acc:average"].iterrows():
                        marks[(r["a"], ratio)] = comparisons.mark(r["verdict"])
                    marks[(base, ratio)] = "(baseline)"
    if forest:
        rows = pd.concat(forest, ignore_index=True)
        plots = root / "plots"
        made = [plot_forest(rows, plots / f"{prefix}{model}.forest.png",
                            f"{model}: differences vs {base} (95 % CI; shaded: ±margin)")]
        if (rows["pairs"] > 1).any():
            made.append(plot_rank_stability(rows, plots / f"{prefix}{model}.rank_stability.png",
                                            f"{model}: marks vs {base}, with the seeds on which A beat it"))
        lines += [f"![{p.stem}]({os.path.relpath(p, root)})" for p in made] + [""]
    return lines, marks


def _demote(lines: list[str]) -> list[str]:
    return ["#" + line if line.startswith("#") else line for line in lines]


def _variant_report(cfg: dict, runs: pd.DataFrame, columns: dict[str, str], root: Path,
                    prefix: str) -> tuple[list[str], list[str], pd.DataFrame]:
    """(Verdict lines, table and plot sections, one row per cell) of one grid point; its files are named
    `<prefix><model>.*` under tables/ and plots/."""
    cells = aggregate(runs)
    ev = cfg["evaluation"]
    verdicts, sections = [], []
    tables = root / "tables"
    for entry in cfg["models"]:
        model, paper_name = entry["name"], entry.get("paper_name") if cfg["report"]["paper_reference"] else None
        plans = load_plans(cfg, model)
        records = load_records(cfg, model, cells)
        mine = _with_intervals(_params_from_plans(cells[cells["model"] == model], plans), records, columns)
        if mine.empty:
            continue
        model_verdicts, marks = _verdicts(cfg, model, records, columns, root, prefix)
        verdicts += model_verdicts
        task_columns = list(dict.fromkeys(columns.values()))
        sections += [f"## {model} ({entry.get('family', 'family unresolved')}, `{entry['source']}`)", ""]
        _section(sections, "Accuracy, perplexity, fidelity, size (Table 1 form)",
                 main_table(mine, task_columns, cfg["ratios"], paper_name), tables / f"{prefix}{model}.main", root,
                 "Accuracy in % with its 95 % CI over the n docs per task (Wilson; the average: cluster-robust "
                 "over tasks), averaged over calibration seeds; perplexity and fidelity: mean ± sd over seeds. "
                 "The dense row is **not fine-tuned**; `+LoRA` rows are after LoRA recovery; `(paper)` rows "
                 "are the paper's figures (pruned rows after LoRA recovery, 2 epochs LaMini; their average is "
                 "over the paper's 10 tasks, ours over the columns our suite has)." + verdict_notes.crows_pairs_footnote(task_columns))
        _section(sections, "Criterion ablation, average accuracy % without fine-tuning (Table 6 form)",
                 ablation_table(mine, cfg["criteria"], paper_name, marks), tables / f"{prefix}{model}.ablation", root,
                 "95 % CIs; the mark says whether the paired difference from the baseline is significant "
                 "(Holm, see Verdicts): equivalent / better / worse / undecided. Never read a ranking into undecided "
                 "cells."
                 + (f" Dense average: {_number(mine[mine['criterion'] == 'dense']['average'].iloc[0], '.1f')}."
                    if (mine["criterion"] == "dense").any() else ""))
        _section(sections, "Output fidelity to the dense model, without fine-tuning (Table 7 form)",
                 fidelity_table(mine, cfg["criteria"], paper_name), tables / f"{prefix}{model}.fidelity", root,
                 "JS = Jensen-Shannon distance of the next-token distributions (lower is closer); "
                 f"top-k Jaccard of the top-{ev['fidelity']['top_k']} token sets; mean ± sd over seeds.")
        if ev["efficiency"]["enabled"]:
            _section(sections, "Size and speed (Table 4 form)", efficiency_table(mine, paper_name),
                     tables / f"{prefix}{model}.efficiency", root,
                     f"Medians of {ev['efficiency']['repeats']} alternating dense/pruned repeats on this "
                     "machine's device; ratios to dense with [min-max] of the per-repeat ratios. decode_tok_s: "
                     "eager decode (one Python step per token; launch-bound on a GPU); decode_static_tok_s, where "
                     "shown (CUDA): static cache + CUDA graphs. The paper's rows are on one A6000.")
        sections += _plots(mine, plans, model, root, prefix)
    cost = scoring_cost(cfg)
    if not cost.empty:
        paper = reference("table5_scoring_cost")
        paper = paper[paper["model"].isin({m.get("paper_name") for m in cfg["models"]})]
        cost = pd.concat([cost, paper.assign(source="paper")], ignore_index=True).astype({"jobs": "Int64"})
        _section(sections, "Scoring cost (Table 5 form)", cost, tables / f"{prefix}scoring_cost", root,
                 "Mean wall time and peak memory of the score jobs (over seeds; paper: peak GPU memory).")
    return verdicts, sections, cells


# what the grid summary shows of each cell (the per-variant tables have the rest)
SUMMARY = ["seeds", "average", "average_sd", "js_distance", "js_distance_sd", "topk_jaccard", "topk_jaccard_sd"]


def grid_summary(variants: dict[str, dict], cells: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per variant x cell: the variant, a column per grid axis, the cell, its average accuracy,
    perplexities and fidelity (means over seeds)."""
    frames = []
    for name, vcfg in variants.items():
        axes = {path: v if isinstance(v, (str, int, float)) else str(v) for path, v in grid.point_values(vcfg).items()}
        frames.append(cells[name].assign(variant=name, **axes))
    out = pd.concat(frames, ignore_index=True)
    ppl = [c for c in out.columns if c.startswith("ppl_")]
    keys = ["variant", *grid.axes(next(iter(variants.values()))), *CELL_KEYS]
    return out[keys + [c for c in SUMMARY[:2] + ppl + SUMMARY[2:] if c in out.columns]]


def write_report(cfg: dict, out_dir: str | os.PathLike | None = None, notes: list[str] = ()) -> Path:
    """Write the whole report folder atomically; returns the path of report.md. With grid axes: a summary of
    every variant (a column per axis), then each variant's verdicts and tables, compared within the variant.
    `notes` (markdown lines, e.g. the MLflow completeness check) follow the header."""
    variants = grid.variants(cfg)
    loaded = {name: load_runs(vcfg) for name, vcfg in variants.items()}
    if all(runs.empty for runs, _, _ in loaded.values()):
        raise HFPruneError(f"no metrics JSON of this config's cells under {experiment_dir(cfg) / 'metrics'}; "
                           "run the evaluate jobs first")
    out_dir = Path(out_dir) if out_dir is not None else experiment_dir(cfg) / "report"
    with atomic_path(out_dir) as root:
        root.mkdir()
        lines, verdicts, sections, cells = _header(cfg) + list(notes), _verdict_intro(cfg), [], {}
        for name, vcfg in variants.items():
            runs, columns, missing = loaded[name]
            if missing:
                lines += [f"**{len(missing)} configured cell draw(s){f' of variant `{name}`' if name else ''} have "
                          "no metrics yet:** " + ", ".join(
                              f"{m}/{c}/r{r}{'' if s is None else f'/s{s}'}{' +LoRA' if rec else ''}"
                              for m, c, r, rec, s in missing), ""]
            if runs.empty:
                continue
            mine, theirs, cells[name] = _variant_report(vcfg, runs, columns, root, f"{name}/" if name else "")
            if name:
                mine, theirs = _demote(mine), _demote(theirs)
                verdicts += [f"### variant `{name}`", ""]
                sections += [f"## variant `{name}`", ""]
            verdicts += mine
            sections += theirs
        if cfg["grid"]:
            summary = []
            _section(summary, "Every variant (one row per variant x cell)",
                     grid_summary({n: variants[n] for n in cells}, cells), root / "tables" / "grid_summary", root,
                     "Means over calibration seeds (perplexity: geometric), ± sd over seeds; the verdicts below "
                     "compare criteria within each variant only.")
            axes = "; ".join(f"`{path}`: {', '.join(map(str, values))}" for path, values in cfg["grid"].items())
            lines += ["## Grid", "", (f"{len(variants)} variants, the product of the axes {axes} (each overrides "
                                      "the setting above). A variant is named `<axis>-<value>_...`."), ""] + summary
        (root / "report.md").write_text("\n".join(lines + verdicts + ["# Tables and plots", ""] + sections).rstrip()
                                        + "\n")
    return out_dir / "report.md"


def _plots(cells: pd.DataFrame, plans: dict[str, dict], model: str, root: Path, prefix: str) -> list[str]:
    plots = root / "plots" / f"{prefix}{model}"  # plus .<plot>.png
    made = []
    if cells["average"].notna().any():  # a grid with evaluation.suite `none` has no accuracy to plot
        made.append(plot_metric_vs_ratio(cells, ["average"], plots.with_name(f"{plots.name}.avg_vs_ratio.png"),
                                         f"{model}: average accuracy vs ratio (95 % CI)", "average accuracy (%)"))
    ppl = [c for c in cells.columns if c.startswith("ppl_") and not c.endswith("_sd")]
    if ppl:
        made.append(plot_metric_vs_ratio(cells, ppl, plots.with_name(f"{plots.name}.ppl_vs_ratio.png"),
                                         f"{model}: perplexity vs ratio (± sd over seeds)", "perplexity", log=True,
                                         band="sd"))
    if plans:
        made.append(plot_neurons_kept(plans, plots.with_name(f"{plots.name}.neurons_kept.png"), f"{model}: neurons kept"))
    lines = ["### Plots", ""]
    lines += [f"![{p.stem}]({os.path.relpath(p, root)})" for p in made]
    return lines + [""]
