"""Per-unit records of one evaluated cell: what the paired statistics (hfprune.stats) compare unit by unit.

One long table per cell, stored beside its metrics JSON as ``<metrics>.units.parquet`` (docs/CONTRACTS.md):

| measure | group | unit | cluster | value |
|---|---|---|---|---|
| ``acc`` | task | doc id | shared passage / source, else the doc | the task metric's 0/1 outcome |
| ``gold_prob`` | task | doc id | as above | probability of the gold choice(s) under the metric's normalisation |
| ``logppl`` | text source | window index | document the window starts in | mean NLL per predicted token (nats) |
| ``js`` / ``jaccard`` / ``kl`` / ``top1`` | text source | prompt index | document the prompt starts in | mean over the prompt's positions |

``choice_loglik`` holds each doc's per-choice log-likelihoods (lm-eval's filtered responses), ``choice_norm``
what the task metric divides each by before its argmax (``choice_norms``; null where the metric is not a choice
argmax), so a doc's answer can be recomputed (``hfprune.flips`` derives the ``flip`` records from them);
``weight`` the tokens a window predicts (1 elsewhere). Every cell of a model sees the same docs, windows and
prompts, so two cells pair on (measure, group, unit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hfprune.errors import HFPruneError
from hfprune.runtime import atomic_path

COLUMNS = ["measure", "group", "unit", "cluster", "value", "weight", "choice_loglik", "choice_norm"]
OPTIONAL = {"choice_norm"}  # records written before it existed lack it (and give no flips)
# doc fields that mark docs sharing a context: BoolQ's questions on one passage, HellaSwag's clips of one video
CLUSTER_FIELDS = ("passage", "source_id")
# how lm-eval's multiple-choice metrics normalise a choice's log-likelihood before the argmax
_NORMALISERS = {"acc": lambda c: 1.0, "acc_norm": lambda c: float(len(c)), "acc_bytes": lambda c: float(len(c.encode()))}


def records_path(metrics_path) -> Path:
    """metrics/<...>/r0.2.json -> metrics/<...>/r0.2.units.parquet."""
    path = Path(metrics_path)
    return path.with_name(path.name.removesuffix(".json") + ".units.parquet")


def _cluster(doc: dict, doc_id) -> str:
    for field in CLUSTER_FIELDS:
        if isinstance(doc, dict) and doc.get(field) not in (None, ""):
            return f"{field}:{doc[field]}"
    return f"doc:{doc_id}"


def gold_indices(task, doc: dict, n_choices: int, metric: str) -> list[int]:
    """The gold choice(s) of a doc, as lm-eval itself decides them: the choices that, made the argmax,
    score 1 under the task's own process_results (so multiple-target and multiple-input tasks need no
    special case here)."""
    golds = []
    for i in range(n_choices):
        probe = [(0.0 if j == i else -1e9, j == i) for j in range(n_choices)]
        if task.process_results(doc, probe).get(metric) == 1.0:
            golds.append(i)
    return golds


def choice_norms(task, doc: dict, n_logliks: int, metric: str) -> list[float] | None:
    """What `metric` divides each choice's log-likelihood by before its argmax (acc: 1, acc_norm: characters,
    acc_bytes: bytes, as lm-eval's multiple-choice scoring); None where the metric is not a choice argmax."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or metric not in _NORMALISERS:
        return None
    choices = task.doc_to_choice(doc)
    if len(choices) != n_logliks:
        return None  # e.g. mutual-information scoring appends unconditional requests
    return [_NORMALISERS[metric](c) or 1.0 for c in choices]


def normalised(logliks, norms) -> np.ndarray:
    """The scores whose argmax is the metric's answer (first of ties, as numpy's argmax in lm-eval)."""
    return np.asarray(logliks, dtype=float) / np.asarray(norms, dtype=float)


def gold_probability(task, doc: dict, logliks: list[float], metric: str) -> float | None:
    """Probability of the gold choice(s) under a softmax of the metric's normalised log-likelihoods: a
    continuous, lower-variance version of the 0/1 outcome. None where the metric is not a choice argmax."""
    norms = choice_norms(task, doc, len(logliks), metric)
    golds = gold_indices(task, doc, len(norms), metric) if norms else None
    if not golds:
        return None
    scores = normalised(logliks, norms)
    p = np.exp(scores - scores.max())
    return float(p[golds].sum() / p.sum())


def task_records(selection, samples: dict) -> list[dict]:
    """Rows for every evaluated doc of every task, from lm-eval's logged samples."""
    rows = []
    for name, metric in selection.metrics.items():
        for leaf in selection.members.get(name, [name]):  # a group: each of its tasks, by the group's metric
            rows += _leaf_records(selection, leaf, metric, samples)
    return rows


def _leaf_records(selection, name: str, metric: str, samples: dict) -> list[dict]:
    rows, task = [], selection.tasks[name]
    for sample in samples.get(name, []):
        doc, doc_id = sample["doc"], selection.doc_id(name, sample["doc_id"])
        if metric not in sample:
            raise HFPruneError(f"lm-eval logged no per-doc {metric!r} for task {name!r}")
        logliks = [float(r[0]) for r in sample["filtered_resps"]] if all(
            isinstance(r, (tuple, list)) for r in sample["filtered_resps"]) else None
        base = {"group": name, "unit": str(doc_id), "cluster": _cluster(doc, doc_id), "weight": 1.0,
                "choice_loglik": logliks,
                "choice_norm": choice_norms(task, doc, len(logliks), metric) if logliks else None}
        rows.append({**base, "measure": "acc", "value": float(sample[metric])})
        prob = gold_probability(task, doc, logliks, metric) if logliks else None
        if prob is not None:
            rows.append({**base, "measure": "gold_prob", "value": prob})
    return rows


def perplexity_records(source: str, result: dict) -> list[dict]:
    """Rows per window from `source_perplexity`'s window_nll / window_doc."""
    per_token = result["seq_len"] - 1
    return [{"measure": "logppl", "group": source, "unit": str(i), "cluster": f"doc:{doc}",
             "value": nll / per_token, "weight": float(per_token), "choice_loglik": None}
            for i, (nll, doc) in enumerate(zip(result["window_nll"], result["window_doc"], strict=True))]


FIDELITY_MEASURES = {"js_distance": "js", "topk_jaccard": "jaccard", "kl": "kl", "top1_agreement": "top1"}


def fidelity_records(result: dict) -> list[dict]:
    """Rows per prompt from `source_fidelity`'s per_prompt / prompt_doc."""
    rows = []
    for key, measure in FIDELITY_MEASURES.items():
        for i, (value, doc) in enumerate(zip(result["per_prompt"][key], result["prompt_doc"], strict=True)):
            rows.append({"measure": measure, "group": result["source"], "unit": str(i), "cluster": f"doc:{doc}",
                         "value": float(value), "weight": 1.0, "choice_loglik": None})
    return rows


def write_records(path, rows: list[dict]) -> Path:
    """Write the rows as Parquet, atomically."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def read_records(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise HFPruneError(f"per-unit records {str(path)!r} do not exist; rerun the cell's evaluate job")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise HFPruneError(f"per-unit records {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); "
                           "delete it and rerun the cell's evaluate job") from None
    missing = sorted(set(COLUMNS) - OPTIONAL - set(frame.columns))
    if missing:
        raise HFPruneError(f"per-unit records {str(path)!r} lack column(s) {', '.join(missing)}")
    return frame
