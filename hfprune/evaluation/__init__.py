"""Evaluation of a grid cell: lm-eval zero-shot accuracy, perplexity, fidelity to the dense model, efficiency.

`run_evaluation` writes one metrics JSON per cell (docs/CONTRACTS.md); `flatten_metrics` turns it into flat,
MLflow-safe metric names (lm-eval's keys such as "acc,none" never reach MLflow).
"""

from __future__ import annotations

import math
import re

__all__ = ["flatten_metrics", "mlflow_name", "run_evaluation"]


def __getattr__(name: str):
    # run_evaluation needs torch: the report and MLflow logging, which import this package's other modules, do not
    if name == "run_evaluation":
        from hfprune.evaluation.cell import run_evaluation

        return run_evaluation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def mlflow_name(name: str) -> str:
    """MLflow accepts letters, digits, '_', '-', '.', ' ' and '/' in metric names; anything else -> '_'."""
    return _UNSAFE.sub("_", name)


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """Metrics JSON -> {name: value}: task/<task>/<metric>[_stderr], average, ppl/<source>, fidelity/<m>,
    eff/<m> (incl. "*_ratio"). Missing values (null, "N/A", NaN) are left out."""
    out: dict[str, object] = {}
    for task, row in (metrics.get("tasks") or {}).items():
        out[f"task/{task}/{row['metric']}"] = row["value"]
        out[f"task/{task}/{row['metric']}_stderr"] = row["stderr"]
    out["average"] = metrics.get("average")
    for source, row in (metrics.get("perplexity") or {}).items():
        out[f"ppl/{source}"] = row["ppl"]
    for key in ("js_distance", "topk_jaccard", "kl", "top1_agreement"):
        out[f"fidelity/{key}"] = (metrics.get("fidelity") or {}).get(key)
    for key, value in (metrics.get("efficiency") or {}).items():
        out[f"eff/{key}"] = value
    return {mlflow_name(k): float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
