"""Answer flips against the dense model (Dutta et al. 2024, "Accuracy is not all you need"): per doc, whether a
pruned cell's answer differs from the dense model's on the same doc. Accuracy can stay put while answers change
in both directions; the flip rate counts both.

A doc's answer is the choice that lm-eval's task metric takes the argmax of: the log-likelihoods of the doc's
``acc`` record divided by the metric's per-choice normalisation (``choice_loglik`` / ``choice_norm``,
hfprune.evaluation.records). Flip records are not stored: `hfprune.comparisons.load_cell` derives them for a
pruned cell from its records and the dense row's, so they pair and cluster as the docs' ``acc`` records do.
Docs whose metric is not a choice argmax (no ``choice_norm``) have none, nor do records written before
``choice_norm`` existed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hfprune.errors import HFPruneError
from hfprune.evaluation.records import COLUMNS, normalised

_KEYS = ["group", "unit"]


def answers(units: pd.DataFrame) -> pd.DataFrame:
    """group, unit, cluster and answer (choice index) of every doc of a cell's records that has one."""
    if "choice_norm" not in units.columns:
        return pd.DataFrame(columns=[*_KEYS, "cluster", "answer"])
    acc = units[(units["measure"] == "acc") & units["choice_norm"].notna()]
    picked = [int(np.argmax(normalised(lls, norms))) for lls, norms in zip(acc["choice_loglik"], acc["choice_norm"])]
    return acc[[*_KEYS, "cluster"]].assign(answer=picked).reset_index(drop=True)


def flip_records(cell_units: pd.DataFrame, dense_units: pd.DataFrame) -> pd.DataFrame:
    """Per-unit ``flip`` records (COLUMNS) of a cell against the dense row: value 1.0 where the two answers to a
    doc differ, else 0.0; group, unit and cluster as the doc's ``acc`` record. Empty where either side has no
    answers; a one-line error where they answered different docs."""
    cell, dense = answers(cell_units), answers(dense_units)
    if cell.empty or dense.empty:
        return pd.DataFrame(columns=COLUMNS)
    merged = cell.merge(dense[[*_KEYS, "answer"]], on=_KEYS, how="outer", suffixes=("", "_dense"), indicator=True)
    unpaired = merged[merged["_merge"] != "both"]
    if not unpaired.empty:
        first = unpaired.iloc[0]
        raise HFPruneError(f"flips: the cell and the dense model did not answer the same docs ({len(cell)} vs "
                           f"{len(dense)} docs, {len(merged) - len(unpaired)} shared; e.g. {first['group']} doc "
                           f"{first['unit']}): re-evaluate them with one config")
    return pd.DataFrame({"measure": "flip", "group": merged["group"], "unit": merged["unit"],
                         "cluster": merged["cluster"], "value": (merged["answer"] != merged["answer_dense"]).astype(float),
                         "weight": 1.0, "choice_loglik": None, "choice_norm": None}, columns=COLUMNS)
