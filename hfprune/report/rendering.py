"""The report's display forms: numbers formatted as the paper prints them, tables written as CSV (numbers), markdown
and LaTeX, the verdict tables' wide markdown form and power line, and the report's table sections."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from hfprune import comparisons, verdict_notes
from hfprune.plan import format_ratio
from hfprune.report.verdicts import smallest_detectable


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
    for r, mde in smallest_detectable(table):
        value = comparisons.format_value(mde, r["scale"]).lstrip("+")
        parts.append(f"{_task_label(r['label'], columns)} {value} (n {int(r['n'])}, {int(r['clusters'])} clusters)")
    return ("Smallest detectable |Δ| (80 % power, α = 0.05, two-sided; the median over the table's rows, each row's "
            "own is in the CSV and `hfprune compare`; n = paired units pooled over seed pairs): "
            + "; ".join(parts) + ".")


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
