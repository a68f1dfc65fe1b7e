"""Zero-shot accuracy through lm-eval with an in-memory model (`HFLM(pretrained=<model object>)`).

A `limit` draws a seeded random subset of each task's evaluation docs (never the first N: those are not
representative, e.g. 17 of BoolQ's first 20 labels are "yes"). The subset goes to lm-eval's own
`samples={task: [doc indices]}` argument, so prompts, batching and metrics stay lm-eval's. The indices are
drawn per task from (seed, task name), so a task gets the same docs whatever suite it is part of. A task built
by hfprune.tasks.offline is instead built from those docs alone (drawn over its full split's size, so the same
docs): lm-eval then prepares 5 docs, not 10,042 (HellaSwag), and its doc ids are mapped back to the split's.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from hfprune.errors import ConfigError
from hfprune.tasks import task_manager_for
from hfprune.windows import bos_prefix


def subsample(n_docs: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """Sorted seeded random doc indices, or None for all docs. Sorted: lm-eval maps the i-th selected doc
    (in dataset order) back to samples[i], which is only right for an increasing list."""
    if limit is None or limit >= n_docs:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(task.encode()))
    return sorted(torch.randperm(n_docs, generator=gen)[:limit].tolist())


@dataclass
class TaskSelection:
    """Loaded lm-eval tasks with the metric reported for each and the docs to evaluate."""

    tasks: dict  # leaf task name -> lm_eval Task (a group's tasks included)
    metrics: dict[str, str]  # reported task or group -> metric
    columns: dict[str, str]
    docs_total: dict[str, int]
    samples: dict[str, list[int]] = field(default_factory=dict)  # per leaf task
    limit: int | None = None
    seed: int = 0
    task_manager: object = None
    backend: str = "shared"  # evaluation.backend: the lm-eval model class (hfprune.evaluation.backend.lm_class)
    members: dict[str, list[str]] = field(default_factory=dict)  # reported name -> its leaf tasks (a group: many)
    objects: list = field(default_factory=list)  # what lm-eval evaluates: Tasks, and Groups (which aggregate)
    preselected: set[str] = field(default_factory=set)  # leaf tasks holding only their samples' docs

    def doc_id(self, task: str, doc_id: int) -> int:
        """The doc's index in the task's full split, from lm-eval's doc id (a preselected task's own index)."""
        return self.samples[task][doc_id] if task in self.preselected and task in self.samples else doc_id

    def lm_eval_samples(self) -> dict | None:
        """lm-eval's `samples` argument: the doc indices of the tasks that hold their whole split."""
        return {t: idx for t, idx in self.samples.items() if t not in self.preselected} or None


def select_tasks(specs, limit: int | None, seed: int, metric_overrides: dict | None = None,
                 task_manager=None, backend: str = "shared", include_path: str | None = None,
                 task_data: dict | None = None, preselect: bool = True) -> TaskSelection:
    """Load the tasks (and groups) of resolved specs (no model needed; `task_data`: evaluation.task_data), check
    metrics, draw the subsets (per leaf task; a group is reported by lm-eval's own aggregation over its tasks).
    `preselect`: offline tasks are built from their drawn docs only (False: whole, as lm-eval loads any task)."""
    from hfprune.tasks import load_tasks

    overrides = dict(metric_overrides or {})
    names = [s.task for s in specs]
    unknown = sorted(set(overrides) - set(names) - {s.column for s in specs})
    if unknown:
        raise ConfigError(f"evaluation.metrics: task(s) {', '.join(unknown)} are not in the suite "
                          f"({', '.join(names)})")
    unknown = sorted(set(task_data or {}) - set(names))
    if unknown:
        raise ConfigError(f"evaluation.task_data: task(s) {', '.join(unknown)} are not in the suite "
                          f"({', '.join(names)})")
    tm = task_manager or task_manager_for(names, include_path)
    try:
        built = load_tasks(tm, names, task_data, pick=(lambda task, n: subsample(n, limit, seed, task))
                           if preselect else None)
    except ValueError as exc:  # e.g. a task both alone and inside a requested group
        raise ConfigError(f"evaluation.tasks: {exc}") from None
    loaded, groups = built["tasks"], built["groups"]
    metrics, columns, docs_total, samples, members, objects = {}, {}, {}, {}, {}, []
    for spec in specs:
        metric = overrides.get(spec.task, overrides.get(spec.column, spec.metric))
        if spec.task in groups:
            group = groups[spec.task]
            leaves = [t.task_name for t in group.get_all_tasks()]
            available = sorted(a.metric for a in group.aggregate_metric_list or [])
            objects.append(group)
        else:
            leaves = [spec.task]
            available = sorted(loaded[spec.task].aggregation())
            objects.append(loaded[spec.task])
        metric = metric or (available[0] if available else None)
        if metric not in available:
            raise ConfigError(f"evaluation.metrics: task {spec.task!r} has no metric {metric!r}; "
                              f"it reports {', '.join(available) or 'nothing'}")
        metrics[spec.task], columns[spec.task], members[spec.task] = metric, spec.column, leaves
        for leaf in leaves:
            full = built["docs_total"]  # a preselected task's full split: its eval_docs are the drawn docs
            docs_total[leaf] = full[leaf] if leaf in full else len(loaded[leaf].eval_docs)
            idx = subsample(docs_total[leaf], limit, seed, leaf)
            if idx is not None:
                samples[leaf] = idx
    return TaskSelection(tasks=loaded, metrics=metrics, columns=columns, docs_total=docs_total,
                         samples=samples, limit=limit, seed=seed, task_manager=tm, backend=backend,
                         members=members, objects=objects, preselected=set(built["docs_total"]) & set(loaded))


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None  # lm-eval writes "N/A" where it has no stderr


def _metric_value(task_results: dict, metric: str, suffix: str = "") -> object:
    """lm-eval keys are "<metric>[_stderr],<filter>"; zero-shot log-likelihood tasks use filter "none"."""
    for key, value in task_results.items():
        name, _, _ = key.partition(",")
        if name == metric + suffix:
            return value
    return None


def evaluate_tasks(model, tokenizer, selection: TaskSelection, batch_size: int = 8,
                   log_samples: bool = False, max_batch_tokens: int | None = None) -> tuple[dict, dict, dict]:
    """Run lm-eval on `model`; returns (tasks JSON, meta, lm-eval's raw results). `max_batch_tokens`: the
    shared backend's tokens per forward (None: its default for the device)."""
    import lm_eval

    from hfprune.evaluation.backend import lm_class

    # lm-eval's HFLM prepends BOS only if asked; follow the tokenizer (LLaMA-2: yes, as in the paper; Qwen and
    # SmolLM2: no), the same as HFLM loading the folder by path with add_bos_token unset.
    add_bos = bool(bos_prefix(tokenizer))
    sized = {"max_batch_tokens": max_batch_tokens} if selection.backend == "shared" else {}
    lm = lm_class(selection.backend)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                     add_bos_token=add_bos, **sized)
    res = lm_eval.simple_evaluate(model=lm, tasks=selection.objects or list(selection.tasks.values()),
                                  task_manager=selection.task_manager, samples=selection.lm_eval_samples(),
                                  log_samples=log_samples)
    tasks = {}
    for name, metric in selection.metrics.items():
        row = res["results"][name]
        leaves = selection.members.get(name, [name])
        tasks[name] = {"metric": metric, "value": _number(_metric_value(row, metric)),
                       "stderr": _number(_metric_value(row, metric, "_stderr")),
                       "n": sum(int(res["n-samples"][leaf]["effective"]) for leaf in leaves),
                       "column": selection.columns[name], **({"tasks": leaves} if leaves != [name] else {})}
    meta = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "task_versions": {n: res["versions"].get(n) for n in [*selection.metrics, *selection.tasks]},
            "docs_total": selection.docs_total,
            "docs_evaluated": {n: t["n"] for n, t in tasks.items()},
            "limit": selection.limit, "subsample_seed": selection.seed,
            "subsample_indices": selection.samples, "add_bos_token": add_bos, "batch_size": batch_size,
            "max_batch_tokens": getattr(lm, "max_batch_tokens", None),
            "num_fewshot": 0, "backend": selection.backend}
    return tasks, meta, res
