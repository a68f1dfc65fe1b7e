"""Reading an experiment for the report: its metrics JSONs as rows and cells (means over calibration seeds), the
per-unit records, plans and score sidecars, and the paper's published figures (hfprune/reference/*.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hfprune import comparisons, grid, layout
from hfprune.config import cell_seeds, score_ratios
from hfprune.data import source_label
from hfprune.errors import HFPruneError
from hfprune.plan import format_ratio
from hfprune.runtime import read_json

REFERENCE_DIR = Path(__file__).parent.parent / "reference"
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
