"""Paper-format tables and plots of one experiment, from its metrics JSONs, plans and score sidecars.

`write_report(cfg)` writes ``<results_dir>/<experiment>/report/`` atomically (the whole folder at once):

- ``tables/<model>.main.*`` — Table 1 form: dense + every criterion x ratio (+ recovered rows), task accuracy
  (% with lm-eval's stderr), average, perplexity, fidelity and parameter count;
- ``tables/<model>.ablation.*`` (Table 6 form: average accuracy by criterion and ratio, no fine-tuning),
  ``tables/<model>.fidelity.*`` (Table 7 form), ``tables/<model>.efficiency.*`` (Table 4 form) and
  ``tables/scoring_cost.*`` (Table 5 form); each as CSV (numbers), markdown and LaTeX (formatted);
- ``plots/<model>.{avg_vs_ratio,ppl_vs_ratio,neurons_kept}.png``;
- ``report.md`` linking all of them.

Where a model's config entry has a ``paper_name`` that the paper reports (hfprune/reference/*.csv), the
paper's published rows sit beside ours, marked "(paper)". Only the cells the config asks for are reported
(metrics left over from an earlier, larger config are ignored); cells not yet evaluated are listed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from hfprune.errors import HFPruneError
from hfprune.plan import format_ratio
from hfprune.runtime import atomic_path, read_json

REFERENCE_DIR = Path(__file__).parent / "reference"
PAPER_LABELS = {"taylor_ce": "CE", "taylor_kd": "SD", "taylor_entropy": "IE"}  # the paper's criterion names
CELL_KEYS = ["model", "criterion", "ratio", "recovered"]


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
           "recovered": bool(cell["recovered"])}
    for task, res in (metrics.get("tasks") or {}).items():
        col = res.get("column", task)
        row[col], row[f"{col}_stderr"] = _pct(res["value"]), _pct(res["stderr"])
    row["average"] = _pct(metrics.get("average"))
    for source, res in (metrics.get("perplexity") or {}).items():
        row[f"ppl_{source}"] = res["ppl"]
    fid = metrics.get("fidelity") or {}
    row.update(js_distance=fid.get("js_distance"), topk_jaccard=fid.get("topk_jaccard"), kl=fid.get("kl"),
               fidelity_k=fid.get("k"))
    eff = metrics.get("efficiency") or {}
    for key in ("params", "params_ratio", "macs_per_token", "prefill_ms", "prefill_ms_ratio", "decode_tok_s",
                "decode_tok_s_ratio"):
        row[key] = eff.get(key)
    row["achieved_ratio"] = (metrics.get("meta") or {}).get("achieved_ratio")
    return row


def expected_cells(cfg: dict) -> list[tuple[str, str, str, bool]]:
    """(model, criterion, formatted ratio, recovered) of every cell the config asks for, dense first."""
    cells = []
    for model in (m["name"] for m in cfg["models"]):
        cells.append((model, "dense", format_ratio(0.0), False))
        for crit in cfg["criteria"]:
            for ratio in cfg["ratios"]:
                cells.append((model, crit, format_ratio(ratio), False))
                if cfg["recovery"]["enabled"]:
                    cells.append((model, crit, format_ratio(ratio), True))
    return cells


def load_cells(cfg: dict) -> tuple[pd.DataFrame, list[str], list[tuple]]:
    """(rows of the configured cells found, task columns in suite order, configured cells not found)."""
    wanted = expected_cells(cfg)
    rows, columns = {}, []
    root = experiment_dir(cfg) / "metrics"
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a job's atomic-write temporary, not a finished cell
        metrics = read_json(path, "metrics file")
        try:
            row = cell_row(metrics)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # hand-edited or another tool's JSON
            raise HFPruneError(f"metrics file {str(path)!r}: not a metrics JSON of docs/CONTRACTS.md "
                               f"({type(exc).__name__}: {exc}); delete it and rerun its evaluate job") from None
        key = (row["model"], row["criterion"], format_ratio(row["ratio"]), row["recovered"])
        if key in wanted:
            rows[key] = row
            for res in (metrics.get("tasks") or {}).values():
                if res.get("column") not in columns:
                    columns.append(res.get("column"))
    missing = [key for key in wanted if key not in rows]
    frame = pd.DataFrame([rows[k] for k in wanted if k in rows])
    return frame, columns, missing


def load_plans(cfg: dict, model: str) -> dict[str, dict]:
    """'<criterion> r<ratio>' -> plan, for the configured criteria and ratios that have a plan file."""
    out = {}
    for crit in cfg["criteria"]:
        for ratio in cfg["ratios"]:
            path = experiment_dir(cfg) / "plans" / model / crit / f"r{format_ratio(ratio)}.json"
            if path.is_file():
                out[f"{crit} r{format_ratio(ratio)}"] = read_json(path, "plan file")
    return out


def scoring_cost(cfg: dict) -> pd.DataFrame:
    rows = []
    for model in (m["name"] for m in cfg["models"]):
        for crit in cfg["criteria"]:
            path = experiment_dir(cfg) / "scores" / model / f"{crit}.json"
            if path.is_file():
                meta = read_json(path, "score sidecar")
                cal = meta.get("calibration") or {}
                peak = meta.get("peak_memory_mb")
                rows.append({"model": model, "method": "ours", "criterion": crit, "seconds": meta.get("seconds"),
                             "peak_memory_gb": None if peak is None else peak / 1024,
                             "calibration": f"{cal['num_sequences']} {cal['source']} samples x {cal['seq_len']} "
                                            "tokens" if cal.get("num_sequences") else "none (needs no data)",
                             "device": meta.get("device"),
                             "source": "ours"})
    return pd.DataFrame(rows)


# ---- tables (numbers) and their display form

def _method(row) -> str:
    if row["criterion"] == "dense":
        return "dense"
    return f"{row['criterion']} +LoRA" if row["recovered"] else row["criterion"]


def _finetuned(row) -> str:
    if row["criterion"] == "dense":
        return "not fine-tuned"
    return "LoRA" if row["recovered"] else "no"


def main_table(cells: pd.DataFrame, columns: list[str], ratios: list[float], paper_name: str | None) -> pd.DataFrame:
    """Table 1 form for one model's cells: accuracy per task (+ stderr), average, perplexity, fidelity, size."""
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
    keep = (["method", "ratio", "fine_tuned", "source"] + [x for c in columns for x in (c, f"{c}_stderr")]
            + ["average"] + sorted(c for c in df.columns if c.startswith("ppl_"))
            + ["js_distance", "topk_jaccard", "params"])
    df = df[[c for c in keep if c in df.columns]]
    df = df.assign(_order=df["source"].map({"ours": 0, "paper": 1}))
    return df.sort_values(["ratio", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def ablation_table(cells: pd.DataFrame, criteria: list[str], paper_name: str | None) -> pd.DataFrame:
    """Table 6 form: average accuracy (%) by ratio (rows) and criterion (columns), no fine-tuning."""
    pruned = cells[(cells["criterion"] != "dense") & ~cells["recovered"]]
    table = pruned.pivot_table(index="ratio", columns="criterion", values="average", aggfunc="first")
    table = table.reindex(columns=[c for c in criteria if c in table.columns])
    if paper_name:
        paper = reference("table6_ablation")
        paper = paper[paper["model"] == paper_name]
        for crit, group in paper.groupby("criterion", sort=False):
            col = group.set_index("ratio")["average"]
            table[f"{crit} ({PAPER_LABELS.get(crit, crit)}, paper)"] = col.reindex(table.index)
    return table.reset_index()


def fidelity_table(cells: pd.DataFrame, criteria: list[str], paper_name: str | None) -> pd.DataFrame:
    """Table 7 form: JS distance and top-k Jaccard to the dense model by ratio and criterion, no fine-tuning."""
    pruned = cells[(cells["criterion"] != "dense") & ~cells["recovered"]]
    out = pd.DataFrame({"ratio": sorted(pruned["ratio"].unique())}).set_index("ratio")
    for crit in criteria:
        rows = pruned[pruned["criterion"] == crit].set_index("ratio")
        if "js_distance" in rows.columns and len(rows):
            out[f"{crit} JS"] = rows["js_distance"]
            out[f"{crit} top-k Jaccard"] = rows["topk_jaccard"]
    if paper_name:
        paper = reference("table7_fidelity")
        for crit, group in paper[paper["model"] == paper_name].groupby("criterion", sort=False):
            group = group.set_index("ratio")
            label = f"{crit} ({PAPER_LABELS.get(crit, crit)}, paper, top-{group['k'].iloc[0]})"
            out[f"{label} JS"] = group["js_distance"].reindex(out.index)
            out[f"{label} Jaccard"] = group["topk_jaccard"].reindex(out.index)
    return out.reset_index()


def efficiency_table(cells: pd.DataFrame, paper_name: str | None) -> pd.DataFrame:
    """Table 4 form: size and speed of every non-recovered cell, with ratios to the dense model."""
    df = cells[~cells["recovered"]].copy()
    df.insert(0, "method", [_method(r) for _, r in df.iterrows()])
    df["source"] = "ours"
    cols = ["method", "ratio", "source", "params", "params_ratio", "macs_per_token", "prefill_ms",
            "prefill_ms_ratio", "decode_tok_s", "decode_tok_s_ratio"]
    df = df[[c for c in cols if c in df.columns]]
    if paper_name:
        paper = reference("table4_speed")
        paper = paper[paper["model"] == paper_name].assign(method="dense / HFPrune (paper)", source="paper")
        df = pd.concat([df, paper.drop(columns=["model"])], ignore_index=True)
    return df.sort_values(["ratio", "source"], kind="stable").reset_index(drop=True)


def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    return format(value, fmt)


def _params(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"


def display(df: pd.DataFrame, pm: str = "±") -> pd.DataFrame:
    """Numbers -> strings as the paper prints them: accuracy 45.1 ± 1.2, ppl 2 decimals, fidelity 3."""
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        if col.endswith("_stderr"):
            continue
        values = df[col]
        if f"{col}_stderr" in df.columns:
            err = df[f"{col}_stderr"]
            out[col] = [_number(v, ".1f") + (f" {pm} {e:.1f}" if _number(e, ".1f") else "")
                        for v, e in zip(values, err)]
        elif col == "params":
            out[col] = values.map(_params)
        elif col == "ratio":
            out[col] = values.map(format_ratio)
        elif col.startswith("ppl_") or col in ("prefill_ms", "decode_tok_s"):
            out[col] = values.map(lambda v: _number(v, ".2f"))
        elif col.endswith("_ratio") or "JS" in col or "Jaccard" in col or col in ("js_distance", "topk_jaccard"):
            out[col] = values.map(lambda v: _number(v, ".3f"))
        elif col == "macs_per_token":
            out[col] = values.map(lambda v: _number(v / 1e6, ".1f") if isinstance(v, (int, float)) else "")
            out = out.rename(columns={col: "MMACs/token"})
        elif pd.api.types.is_float_dtype(values):
            out[col] = values.map(lambda v: _number(v, ".1f"))
        else:
            out[col] = values.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


def _latex_escape(text: str) -> str:
    for char in ("\\", "&", "%", "$", "#", "_", "{", "}"):
        text = text.replace(char, "\\" + char)
    return text


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

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    _pyplot().close(fig)
    return out_png


def plot_metric_vs_ratio(cells: pd.DataFrame, metrics: list[str], out_png, title: str, ylabel: str,
                         log: bool = False) -> Path:
    """One panel per metric column: a line per criterion (dashed: LoRA-recovered), dense at ratio 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    dense = cells[cells["criterion"] == "dense"]
    for ax, metric in zip(axes[0], metrics):
        for (crit, recovered), group in cells[cells["criterion"] != "dense"].groupby(["criterion", "recovered"],
                                                                                     sort=False):
            group = pd.concat([dense, group]).sort_values("ratio")
            ax.plot(group["ratio"], group[metric], marker="o", linestyle="--" if recovered else "-",
                    label=f"{crit}{' +LoRA' if recovered else ''}")
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


def plot_neurons_kept(plans: dict[str, dict], out_png, title: str) -> Path:
    """MLP neurons kept per layer, a line per plan (label -> plan JSON), dense size dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    dense_size = None
    for label, plan in plans.items():
        kept = [len(layer["mlp_keep"]) for layer in plan["layers"]]
        ax.plot(range(len(kept)), kept, marker=".", label=label)
        dense_size = plan.get("intermediate_size_dense") or dense_size
    if dense_size:
        ax.axhline(dense_size, color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set(xlabel="layer", ylabel="MLP neurons kept", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_png)


def plot_layer_scores(scores: dict, out_png, title: str) -> Path:
    """Distribution of MLP neuron scores per layer (median and 5-95 % band, log scale) from a score file."""
    import torch

    plt = _pyplot()
    layers = sorted((int(k.split(".")[1]), v) for k, v in scores.items() if k.startswith("mlp."))
    q = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    stats = torch.stack([torch.quantile(v.double().flatten(), q) for _, v in layers]).numpy()
    x = [i for i, _ in layers]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.fill_between(x, stats[:, 0], stats[:, 2], alpha=0.3, label="5-95 %")
    ax.plot(x, stats[:, 1], marker=".", label="median")
    if (stats > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="neuron score", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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


def _header(cfg: dict) -> list[str]:
    ev, cal = cfg["evaluation"], cfg["calibration"]
    docs = "all docs" if ev["limit"] is None else f"{ev['limit']} seeded random docs per task"
    recovery = "LoRA (rows marked +LoRA)" if cfg["recovery"]["enabled"] else "off"
    return [
        f"# hfprune report: experiment `{cfg['experiment']}`", "",
        (f"Models: {', '.join(m['name'] for m in cfg['models'])}. Criteria: {', '.join(cfg['criteria'])}. "
        f"Ratios (fraction of all parameters removed): {', '.join(map(format_ratio, cfg['ratios']))}. "
        f"Calibration: {cal['num_sequences']} x {cal['seq_len']} tokens of `{cal['source']}`. "
        f"Evaluation: suite `{ev['suite']}`, {docs} (seed {ev['subsample_seed']}), 0-shot; "
        f"perplexity on {', '.join(ev['perplexity']['sources'])}. Recovery: {recovery}."),
        "",
        ("Accuracy in % with lm-eval's standard error. The dense row is **not fine-tuned**; rows marked `+LoRA` "
        "are after LoRA recovery; rows marked `(paper)` are the paper's published figures (their average is "
        "over the paper's 10 tasks, ours over the columns our suite has)."),
        "",
    ]


def write_report(cfg: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the whole report folder atomically; returns the path of report.md."""
    cells, columns, missing = load_cells(cfg)
    if cells.empty:
        raise HFPruneError(f"no metrics JSON of this config's cells under {experiment_dir(cfg) / 'metrics'}; "
                           "run the evaluate jobs first")
    out_dir = Path(out_dir) if out_dir is not None else experiment_dir(cfg) / "report"
    ev = cfg["evaluation"]
    with atomic_path(out_dir) as root:
        root.mkdir()
        lines = _header(cfg)
        if missing:
            lines += [f"**{len(missing)} configured cell(s) have no metrics yet:** "
                      + ", ".join(f"{m}/{c}/r{r}{' +LoRA' if rec else ''}" for m, c, r, rec in missing), ""]
        for entry in cfg["models"]:
            model, paper_name = entry["name"], entry.get("paper_name") if cfg["report"]["paper_reference"] else None
            plans = load_plans(cfg, model)
            mine = _params_from_plans(cells[cells["model"] == model], plans)
            if mine.empty:
                continue
            lines += [f"## {model} ({entry['family']}, `{entry['source']}`)", ""]
            tables = root / "tables"
            _section(lines, "Accuracy, perplexity, fidelity, size (Table 1 form)",
                     main_table(mine, columns, cfg["ratios"], paper_name), tables / f"{model}.main", root,
                     "Paper rows: pruned rows after LoRA recovery (2 epochs, LaMini); dense not fine-tuned."
                     if paper_name else "")
            _section(lines, "Criterion ablation, average accuracy % without fine-tuning (Table 6 form)",
                     ablation_table(mine, cfg["criteria"], paper_name), tables / f"{model}.ablation", root,
                     f"Dense average: {_number(mine[mine['criterion'] == 'dense']['average'].iloc[0], '.1f')}"
                     if (mine["criterion"] == "dense").any() else "")
            _section(lines, "Output fidelity to the dense model, without fine-tuning (Table 7 form)",
                     fidelity_table(mine, cfg["criteria"], paper_name), tables / f"{model}.fidelity", root,
                     "JS = Jensen-Shannon distance of the next-token distributions (lower is closer); "
                     f"top-k Jaccard of the top-{ev['fidelity']['top_k']} token sets.")
            if ev["efficiency"]["enabled"]:
                _section(lines, "Size and speed (Table 4 form)", efficiency_table(mine, paper_name),
                         tables / f"{model}.efficiency", root,
                         "Measured on this machine's device; the paper's rows are on one A6000.")
            lines += _plots(mine, plans, model, root)
        cost = scoring_cost(cfg)
        if not cost.empty:
            paper = reference("table5_scoring_cost")
            paper = paper[paper["model"].isin({m.get("paper_name") for m in cfg["models"]})]
            cost = pd.concat([cost, paper.assign(source="paper")], ignore_index=True)
            _section(lines, "Scoring cost (Table 5 form)", cost, root / "tables" / "scoring_cost", root,
                     "Wall time and peak memory of one scoring job (paper: peak GPU memory).")
        (root / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    return out_dir / "report.md"


def _plots(cells: pd.DataFrame, plans: dict[str, dict], model: str, root: Path) -> list[str]:
    plots = root / "plots"
    made = []
    if cells["average"].notna().any():  # a grid with evaluation.suite `none` has no accuracy to plot
        made.append(plot_metric_vs_ratio(cells, ["average"], plots / f"{model}.avg_vs_ratio.png",
                                         f"{model}: average accuracy vs ratio", "average accuracy (%)"))
    ppl = [c for c in cells.columns if c.startswith("ppl_")]
    if ppl:
        made.append(plot_metric_vs_ratio(cells, ppl, plots / f"{model}.ppl_vs_ratio.png",
                                         f"{model}: perplexity vs ratio", "perplexity", log=True))
    if plans:
        made.append(plot_neurons_kept(plans, plots / f"{model}.neurons_kept.png", f"{model}: neurons kept"))
    lines = ["### Plots", ""]
    lines += [f"![{p.stem}]({os.path.relpath(p, root)})" for p in made]
    return lines + [""]
