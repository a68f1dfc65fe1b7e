"""Paired comparisons of grid cells from their per-unit records: the Verdict tables of the report and
`hfprune compare` compute the same numbers here.

A cell is (model, criterion, ratio, recovered) and holds one record file per calibration seed (one for the
dense row and for criteria that do not depend on the seed). Two cells are compared on every measure their
records share: the per-unit differences A - B are pooled over seeds (seed s of A with seed s of B; a cell with
one draw pairs with every draw of the other) and go to `hfprune.stats.paired_difference`, clustered by the
unit's context (the same doc under several seeds is one cluster), stratified by task for averages. That
interval is conditional on the calibration sets that were drawn; with >= 3 seed pairs a second interval clusters
by the seed pair too (two-way), covering the variation over calibration draws. The marks (hfprune.equivalence:
equivalent / better / worse / undecided) use the first (`report.seed_effect: fixed`) or the second (`random`);
each row names its inference target. CrowS-Pairs' pct_stereotype is lower-is-better: its own rows say so, and
task averages leave it out. A pruned cell's records gain its answer flips against the dense row when that is
evaluated (`hfprune.flips`), so flip rates are compared as any other measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hfprune import equivalence
from hfprune.config import format_ratio
from hfprune.errors import HFPruneError
from hfprune.evaluation.records import read_records, records_path
from hfprune.flips import flip_records
from hfprune.stats import Paired, paired_difference

DENSE = "dense"
# what the dense model scores against itself (exact by construction: hfprune.evaluation.fidelity)
IDENTITY = {"js": 0.0, "jaccard": 1.0, "kl": 0.0, "top1": 1.0, "flip": 0.0}
# tasks whose metric is lower-is-better (lm-eval's pct_stereotype): out of task averages, direction flipped
LOWER_IS_BETTER_TASKS = ("crows_pairs",)
MIN_SEEDS = 3  # seed pairs needed for an interval over calibration draws
FIXED, RANDOM = "these calibration draws", "over calibration draws"


def lower_is_better_task(group: str | None) -> bool:
    return group is not None and any(t in group for t in LOWER_IS_BETTER_TASKS)


@dataclass(frozen=True)
class Measure:
    """One compared quantity: a record measure, on one group (task / text source) or averaged over groups."""

    measure: str
    group: str | None  # None: the unweighted mean over the measure's groups (tasks)

    @property
    def key(self) -> str:
        return f"{self.measure}:{self.group or 'average'}"

    @property
    def higher_is_better(self) -> bool:
        return self.measure in ("acc", "gold_prob", "jaccard", "top1") and not lower_is_better_task(self.group)

    @property
    def scale(self) -> float:
        # accuracies, probabilities and rates in percentage points
        return 100.0 if self.measure in ("acc", "gold_prob", "flip", "top1") else 1.0

    @property
    def label(self) -> str:
        names = {"logppl": "log-ppl", "js": "JS", "jaccard": "top-k Jaccard", "kl": "KL", "acc": "acc (pp)",
                 "gold_prob": "gold prob (pp)", "flip": "flips (pp)", "top1": "top-1 agreement (pp)"}
        return f"{names.get(self.measure, self.measure)} {self.group or 'average'}"


# the measures a Verdict table shows, in order; per-task ones go to the detail CSV
HEADLINE = ("logppl", "js", "jaccard", "top1", "gold_prob", "acc", "flip")


ORDER = ("logppl", "js", "jaccard", "kl", "top1", "gold_prob", "acc", "flip")
PER_TASK = ("acc", "gold_prob", "flip")  # averaged over tasks


def present(frames) -> set[tuple[str, str]]:
    """(measure, group) pairs found in every record frame."""
    out = None
    for frame in frames:
        pairs = set(map(tuple, frame[["measure", "group"]].drop_duplicates().to_numpy()))
        out = pairs if out is None else out & pairs
    return out or set()


def measures(pairs: set[tuple[str, str]], headline: bool = False) -> list[Measure]:
    """Measures of (measure, group) pairs in report order (perplexity, fidelity, tasks), task averages first;
    `headline`: only what a Verdict table shows (HEADLINE, task averages)."""
    out = []
    for name in ORDER:
        groups = sorted(g for m, g in pairs if m == name)
        if not groups or (headline and name not in HEADLINE):
            continue
        if name in PER_TASK:
            if any(not lower_is_better_task(g) for g in groups):
                out.append(Measure(name, None))
            if not headline:
                out += [Measure(name, g) for g in groups]
        else:
            out += [Measure(name, g) for g in groups]
    return out


def pair_measures(a: dict, b: dict, headline: bool = False) -> list[Measure]:
    """What two cells can be compared on: the measures both have, plus fidelity when B is the dense row
    (which has none: its fidelity to itself is exact)."""
    shared = present([*a.values(), *b.values()])
    fid_a, fid_b = ({(m, g) for m, g in present(side.values()) if m in IDENTITY} for side in (a, b))
    if not fid_a or not fid_b:  # one side is the dense row
        shared |= fid_a | fid_b
    return measures(shared, headline)


# ---- which files hold a cell

def cell_files(cfg: dict, model: str, criterion: str, ratio, recovered: bool = False) -> dict:
    """{seed: metrics JSON path} of a cell's evaluated draws under the experiment folder (seed None for the
    dense row); only the seeds the config asks for. `cfg` is one grid point (a variant's config)."""
    from hfprune import layout
    from hfprune.config import cell_seeds
    from hfprune.grid import variant_dir

    exp = Path(cfg["results_dir"]) / cfg["experiment"]
    if criterion == DENSE:
        return {None: Path(layout.dense_metrics(exp, variant_dir(cfg, "evaluate_dense"), model))}
    v = variant_dir(cfg, "evaluate_recovered" if recovered else "evaluate_pruned", criterion)
    return {s: Path(layout.cell_metrics(exp, v, model, criterion, s, format_ratio(ratio), recovered))
            for s in cell_seeds(cfg, model, criterion)}


def load_cell(cfg: dict, model: str, criterion: str, ratio, recovered: bool = False) -> dict[object, pd.DataFrame]:
    """{seed: per-unit records} of a cell, a pruned cell's with its flips against the dense row where that has
    been evaluated; a one-line error naming the first missing file."""
    files = cell_files(cfg, model, criterion, ratio, recovered)
    out = {}
    for seed, path in files.items():
        if not path.is_file():
            what = f"{model} / {criterion}" + ("" if criterion == DENSE else f" / ratio {format_ratio(ratio)} / "
                                                f"seed {seed}{' / recovered' if recovered else ''}")
            raise HFPruneError(f"cell {what} has not been evaluated: {path} does not exist")
        out[seed] = read_records(records_path(path))
    dense = cell_files(cfg, model, DENSE, 0.0)[None]
    if criterion != DENSE and dense.is_file():
        dense_units = read_records(records_path(dense))
        out = {seed: _with_flips(units, dense_units) for seed, units in out.items()}
    return out


def _with_flips(units: pd.DataFrame, dense_units: pd.DataFrame) -> pd.DataFrame:
    flips = flip_records(units, dense_units)
    return units if flips.empty else pd.concat([units, flips], ignore_index=True)


# ---- comparing two cells

def _seed_pairs(a: dict, b: dict) -> list[tuple]:
    if len(a) == 1 or len(b) == 1:
        return [(sa, sb) for sa in a for sb in b]
    common = [s for s in a if s in b]
    if not common:
        raise HFPruneError(f"the two cells share no calibration seed ({sorted(a)} vs {sorted(b)})")
    return [(s, s) for s in common]


def _rows(frame: pd.DataFrame, measure: Measure) -> pd.DataFrame:
    rows = frame[frame["measure"] == measure.measure]
    if measure.group is None:  # a task average: lower-is-better tasks stay out of it
        return rows[~rows["group"].map(lower_is_better_task)] if measure.measure in PER_TASK else rows
    return rows[rows["group"] == measure.group]


def differences(a: dict, b: dict, measure: Measure) -> pd.DataFrame:
    """Per-unit differences A - B of a measure, pooled over seed pairs: columns d, cluster, stratum, pair."""
    parts = []
    for i, (sa, sb) in enumerate(_seed_pairs(a, b)):
        left = _rows(a[sa], measure)
        right = _rows(b[sb], measure)
        if measure.measure in IDENTITY:  # the dense row's fidelity to itself is exact
            if right.empty:
                right = left.assign(value=IDENTITY[measure.measure])
            elif left.empty:
                left = right.assign(value=IDENTITY[measure.measure])
        keys = ["group", "unit"]
        merged = left.merge(right[keys + ["value"]], on=keys, suffixes=("_a", "_b"), validate="one_to_one")
        if len(merged) != len(left) or len(merged) != len(right):
            raise HFPruneError(f"the two cells were not evaluated on the same units for {measure.label} "
                               f"({len(left)} vs {len(right)} units, {len(merged)} shared): re-evaluate them "
                               "with one config")
        parts.append(pd.DataFrame({"d": merged["value_a"] - merged["value_b"], "cluster": merged["cluster"],
                                   "stratum": merged["group"], "pair": i}))
    return pd.concat(parts, ignore_index=True)


def compare(a: dict, b: dict, measure: Measure) -> tuple[Paired, Paired | None, float, int, int]:
    """(paired inference A - B conditional on the calibration draws, the same over calibration draws (two-way
    clustered by seed pair; None with fewer than MIN_SEEDS seed pairs), fraction of seed pairs in which A is
    better on their own mean difference, number of seed pairs, number of strata (tasks of an average))."""
    diffs = differences(a, b, measure)
    result = paired_difference(diffs["d"], diffs["cluster"], diffs["stratum"])
    per_pair = diffs.groupby("pair").apply(lambda g: g.groupby("stratum")["d"].mean().mean(), include_groups=False)
    over = (paired_difference(diffs["d"], diffs["cluster"], diffs["stratum"], seeds=diffs["pair"])
            if len(per_pair) >= MIN_SEEDS else None)
    better = per_pair > 0 if measure.higher_is_better else per_pair < 0
    return result, over, float(better.mean()), len(per_pair), int(diffs["stratum"].nunique())


def comparison_table(cells: dict[str, dict], pairs: list[tuple[str, str]], headline: bool = False,
                     margins: dict[str, float] | None = None, seed_effect: str = "fixed") -> pd.DataFrame:
    """Every pair (A, B) of `cells` (name -> {seed: records}) on every measure both have, one row each, marked
    (hfprune.equivalence) at `margins` (default: the defaults) on the interval `seed_effect` names (`random`:
    over calibration draws where estimable, else conditional on them, as the row's `target` says); the table's
    difference tests form one Holm family, its equivalence tests another."""
    rows = []
    for a, b in pairs:
        for m in pair_measures(cells[a], cells[b], headline):
            result, over, wins, n_pairs, strata = compare(cells[a], cells[b], m)
            decide = over if seed_effect == "random" and over is not None else result
            margin = equivalence.margin_for(m.measure, margins)
            draws = {f"{k}_draws": getattr(over, k) if over is not None else math.nan
                     for k in ("lo", "hi", "se", "p", "df")}
            rows.append({"a": a, "b": b, "measure": m.key, "label": m.label, **result.as_dict(), **draws,
                         "wins": wins, "pairs": n_pairs, "strata": strata, "higher_is_better": m.higher_is_better, "scale": m.scale,
                         "margin": margin, "target": RANDOM if decide is over else FIXED,
                         "p_decide": decide.p, "p_tost": equivalence.tost(decide, margin)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = equivalence.add_marks(table, p="p_decide")
    return table


def format_value(value: float, scale: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * scale:+.1f}" if scale != 1.0 else f"{value:+.3f}"


def format_difference(row) -> str:
    """'-0.047 [-0.081, -0.013]' (accuracies in percentage points)."""
    return (f"{format_value(row['diff'], row['scale'])} "
            f"[{format_value(row['lo'], row['scale'])}, {format_value(row['hi'], row['scale'])}]")


def mark(verdict_word: str) -> str:
    """A mark as the tables print it: decided ones in bold."""
    return f"**{verdict_word}**" if verdict_word in ("better", "worse", "equivalent") else verdict_word
