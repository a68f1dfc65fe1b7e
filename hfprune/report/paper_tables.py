"""The paper's table forms of one model's cells (Table 1, 6, 7 and 4), with the paper's published rows beside ours,
and the display labels of criteria and rows."""

from __future__ import annotations

import pandas as pd

from hfprune.plan import format_ratio
from hfprune.report.loading import reference

# What a criterion's rows are: the paper's Taylor criteria on activations (its CE / SD / IE ablation) apart from
# the weight-level methods it compares with in Table 1
CRITERION_LABELS = {"taylor_ce": "CE criterion (Taylor, act.)", "taylor_kd": "SD criterion (Taylor, act.)",
                    "taylor_entropy": "IE (HFPrune)", "sdmprune": "SDMPrune (method)",
                    "llm_pruner": "LLM-Pruner (method)"}


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
