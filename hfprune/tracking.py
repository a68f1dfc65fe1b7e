"""MLflow tracking for grid jobs: one experiment per config `experiment`, a parent run per model, a child run
per job (score: model x criterion; evaluate and recover: one cell).

Usage in a command::

    with tracking.stage_run(cfg, model=name, stage="evaluate", criterion=c, ratio=r) as run:
        ...                              # the run is RUNNING in the UI from here on
        run.log_metrics({...}); run.log_artifact(path)

Disabled tracking (``tracking.enabled: false``) yields a run whose methods do nothing. The store is the
config's ``tracking.uri`` (default a SQLite file under results/; a relative SQLite path is resolved against
the working directory) unless ``MLFLOW_TRACKING_URI`` names another, e.g. a tracking server.

Concurrent jobs share one SQLite file: every write goes through an exclusive file lock next to the database
(so two jobs never create the same experiment or parent run twice, nor race on the schema migration that the
first client runs) and is retried if SQLite still reports "database is locked" (e.g. an `mlflow ui` reading).

A job killed outright (SIGKILL, OOM killer, a lost node) cannot close its run. Each job run is therefore tagged
with its host, pid and the process's start time, and `close_stale_runs` (the workflow's `onstart`) marks the
RUNNING runs whose process no longer exists on this host KILLED. A tracking server that cannot be reached
fails the job at once, before any work, naming the URI (MLflow itself would retry for minutes). A store that
fails once the job has started costs the tracking only: the job warns, stops logging and finishes; its run
stays RUNNING without the output digest, and `hfprune sync` (hfprune/sync.py) completes it from the files.

Every job run is keyed by its output (tag `hfprune.output`, the path under the experiment folder) and, once
the output is written, the output's content hash (`hfprune.output_sha256`): what `sync` and the completeness
check match the results folder against.

The store (URI, lock and retries, tags, output key and digest, stale runs) is hfprune/tracking_store.py; this
module holds the job-level runs and what each stage logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from hfprune.config import model_entry
from hfprune.errors import HFPruneError
from hfprune.runtime import package_versions
from hfprune.tracking_store import (
    DIGEST_TAG,
    HOST_TAG,
    MODEL_TAG,
    OUTPUT_TAG,
    PID_START_TAG,
    PID_TAG,
    ROLE_TAG,
    SEED_TAG,
    STAGE_TAG,
    VARIANT_TAG,
    Store,
    _process_start,
    _tags,
    mlflow_values,
    output_digest,
    output_key,
    tracking_uri,
)

# operational model-entry keys (docs/CONTRACTS.md): how a job runs, not what it is, so not on the parent run
_NOT_TAGGED = ("name", "resources")

log = logging.getLogger(__name__)


class StageRun:
    """One job's MLflow run; every method is a no-op when tracking is disabled (store None). In a job
    (`lenient`), the first store error after the run started is a warning and ends the logging: the job
    finishes, its run stays RUNNING without the output digest, and `hfprune sync` completes it."""

    def __init__(self, store: Store | None = None, run_id: str | None = None, lenient: bool = True,
                 logged_params: frozenset = frozenset()):
        self.store, self.run_id, self.lenient, self.logged_params = store, run_id, lenient, logged_params
        self.error: Exception | None = None

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.error is None

    def call(self, method: str, *args, **kwargs):
        try:
            return self.store.call(method, *args, **kwargs)
        except Exception as exc:  # a server restart or a locked file must not cost the job
            if not self.lenient:
                raise
            self.error = exc
            log.warning("MLflow store %s failed during this job (%s: %s): the job goes on untracked and its run "
                        "%s stays incomplete; `hfprune sync --config C` logs it from the results folder",
                        self.store.uri, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                        self.run_id)
            return None

    def log_params(self, params: dict) -> None:
        """Nested dicts become dotted names, other values JSON (`mlflow_values`). A run completed by `sync`
        keeps the params its job logged (MLflow refuses to change one)."""
        if not self.enabled:
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(k, v) for k, v in mlflow_values(params, MAX_PARAM_VAL_LENGTH).items()
                 if k not in self.logged_params]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.call("log_batch", self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """Numbers only (None, NaN and inf are left out); names must already be MLflow-safe."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_items([Metric(k, float(v), now, step) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])

    def _log_metric_items(self, items) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.call("log_batch", self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def log_series(self, name: str, values: list[float]) -> None:
        """A metric's history, one step per value (e.g. the training loss per optimizer step)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_items([Metric(name, float(v), now, i) for i, v in enumerate(values) if math.isfinite(v)])

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            from mlflow.entities import RunTag

            self.call("log_batch", self.run_id, tags=[RunTag(k, v) for k, v in _tags(tags).items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.call("log_artifact", self.run_id, str(path), artifact_path)


def run_name(stage: str, criterion: str | None, ratio: float | None, recovered: bool,
             seed: int | None = None, variant: str = "") -> str:
    from hfprune.plan import format_ratio

    cell = criterion or "dense"
    if seed is not None:
        cell += f" s{seed}"
    if ratio is not None:
        cell += f" r{format_ratio(ratio)}"
    return f"{stage}: {cell}{' +LoRA' if recovered else ''}{f' [{variant}]' if variant else ''}"


def variant_name(cfg: dict) -> str:
    """The grid point a job runs (hfprune.grid): its name, "default" without a grid axis."""
    from hfprune.grid import name, point_values

    return name(point_values(cfg)) or "default"


def job_params(cfg: dict, model: str, criterion: str | None, ratio: float | None, recovered: bool) -> dict:
    """What identifies a job's inputs: the cell, the settings that shape it, its grid point (variant name and
    axis values, `grid.<path>`) and package versions. `seed` is the calibration seed (the UI's filter on the
    calibration sample); `global_seed` the config's `seed`."""
    from hfprune.grid import point_values

    entry = model_entry(cfg, model)
    cal = cfg["calibration"]
    params = {
        "model": model, "family": entry.get("family"), "source": entry["source"],
        "criterion": criterion or "dense", "ratio": ratio if ratio is not None else 0.0, "recovered": recovered,
        "allocation": cfg["pruning"]["allocation"], "scope": cfg["pruning"]["scope"],
        "calibration": {**cal, "tokens": cal["num_sequences"] * cal["seq_len"]},
        "seed": cal["seed"], "global_seed": cfg["seed"], "variant": variant_name(cfg),
        "grid": point_values(cfg), "dtype": cfg["dtype"], "device": cfg["device"],
        "versions": package_versions(),
    }
    if criterion in cfg["criterion_options"]:
        params["criterion_options"] = cfg["criterion_options"][criterion]
    if recovered:  # what the recovery computes, not how it ran (processes, checkpoints: a resume logs the same)
        from hfprune.checkpoints import OPERATIONAL

        params["recovery"] = {k: v for k, v in cfg["recovery"].items() if k not in OPERATIONAL}
    return params


@contextlib.contextmanager
def stage_run(cfg: dict, *, model: str, stage: str, criterion: str | None = None, ratio: float | None = None,
              recovered: bool = False, output: str | os.PathLike | None = None,
              backfill: dict | None = None, resume_run_id: str | None = None) -> Iterator[StageRun]:
    """Open the job's child run (RUNNING) under the model's parent run; close it FINISHED, or FAILED/KILLED
    if the block raises (the exception propagates). Model, criterion, ratio, calibration seed and the grid
    variant are both params and tags, so the UI can filter on either. `output` keys the run (OUTPUT_TAG at the
    start, DIGEST_TAG once the block has written it). `backfill` ({"start", "end"} in ms, "resume": the run id
    of an incomplete run or None) is `hfprune.sync` logging a finished job: store errors then propagate.
    `resume_run_id`: the run of an interrupted job that resumes (a recover checkpoint's), reopened rather than a
    new one, where the store still has it."""
    variant = variant_name(cfg)
    if not cfg["tracking"]["enabled"]:
        yield StageRun()
        return
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    backfill = backfill or {}
    try:
        store = Store(tracking_uri(cfg))
        exp_id = store.experiment_id(cfg["experiment"])
        entry = {f"hfprune.{k}": v for k, v in model_entry(cfg, model).items() if k not in _NOT_TAGGED}
        parent_id = store.parent_run(exp_id, model, entry)
        child = None
        if backfill.get("resume"):
            child = store.call("get_run", backfill["resume"])
        elif resume_run_id:
            child = _reopen(store, exp_id, resume_run_id)
        if child is None:
            tags = {MLFLOW_PARENT_RUN_ID: parent_id, MODEL_TAG: model, STAGE_TAG: stage, ROLE_TAG: "job",
                    "hfprune.criterion": criterion or "dense", "hfprune.recovered": str(recovered),
                    SEED_TAG: str(cfg["calibration"]["seed"]), VARIANT_TAG: variant}
            if ratio is not None:
                tags["hfprune.ratio"] = str(ratio)
            if output is not None:
                tags[OUTPUT_TAG] = output_key(cfg, output)
            if not backfill:
                tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
                             PID_START_TAG: str(_process_start(os.getpid()))})
            seed = cfg["calibration"]["seed"] if criterion else None  # the dense row has no calibration draw
            label = "" if variant == "default" else variant
            child = store.call("create_run", exp_id, run_name=run_name(stage, criterion, ratio, recovered, seed,
                                                                       label),
                               start_time=backfill.get("start"), tags=_tags(tags))
    except HFPruneError:
        raise  # an unreachable server: stop before any work rather than run a grid nobody can follow
    except Exception as exc:  # the job's files are the results; a broken store must not cost them
        if backfill:
            raise
        log.warning("MLflow tracking unavailable (%s: %s); this job runs untracked", type(exc).__name__, exc)
        child = None
    if child is None:
        yield StageRun()
        return
    run = StageRun(store, child.info.run_id, lenient=not backfill, logged_params=frozenset(child.data.params))
    status = "FAILED"
    try:
        run.log_params(job_params(cfg, model, criterion, ratio, recovered))  # a reopened run's are skipped
        yield run
        if output is not None:
            run.set_tags({OUTPUT_TAG: output_key(cfg, output), DIGEST_TAG: output_digest(output)})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run.enabled:  # after a store error the run stays RUNNING: `sync` completes it
            run.call("set_terminated", run.run_id, status, end_time=backfill.get("end"))
        if run.enabled:
            try:
                store.finish_parent_if_idle(exp_id, parent_id)
            except Exception as exc:  # as above
                if backfill:
                    raise
                log.warning("MLflow store %s failed closing the parent run (%s)", store.uri, exc)


def _reopen(store: Store, exp_id: str, run_id: str):
    """The run `run_id` of experiment `exp_id` set RUNNING again, or None if the store does not have it."""
    try:
        run = store.call("get_run", run_id)
    except Exception:  # noqa: BLE001 - e.g. a store reset since the checkpoint: the job gets a new run
        return None
    if run.info.experiment_id != exp_id:
        return None
    store.call("update_run", run_id, status="RUNNING")
    log.info("MLflow: continuing run %s", run_id)
    return run


@contextlib.contextmanager
def cell_run(cfg: dict, model: str, stage: str, plan_path: str | os.PathLike | None = None,
             recovered: bool = False, output: str | os.PathLike | None = None,
             backfill: dict | None = None, resume_run_id: str | None = None) -> Iterator[StageRun]:
    """`stage_run` for a job on one cell: criterion and ratio come from its plan (none: the dense row), and
    the plan is logged. A missing or unreadable plan is left to the command to report (inside the run)."""
    plan = None
    if plan_path is not None and Path(plan_path).is_file():
        with contextlib.suppress(ValueError):
            plan = json.loads(Path(plan_path).read_text())
    criterion = plan.get("criterion") if plan else None
    ratio = plan.get("ratio") if plan else None
    if plan and plan.get("seed") is not None:  # the cell's calibration draw, for its params and tags
        cfg = {**cfg, "calibration": {**cfg["calibration"], "seed": plan["seed"]}}
    with stage_run(cfg, model=model, stage=stage, criterion=criterion, ratio=ratio, recovered=recovered,
                   output=output, backfill=backfill, resume_run_id=resume_run_id) as run:
        if plan and not resume_run_id:
            log_plan(run, plan, plan_path)
        yield run


# ---- what each stage logs (one place, so the commands stay small)

def log_plan(run: StageRun, plan: dict, plan_path: str | os.PathLike | None = None) -> None:
    """Neurons kept (total and per layer), allocation and parameter counts of a plan; the plan JSON and a
    neurons-per-layer plot as artifacts."""
    if not run.enabled:
        return
    kept = [len(layer["mlp_keep"]) for layer in plan["layers"]]
    run.log_params({"neurons_kept": sum(kept), "neurons_kept_per_layer": kept,
                    "intermediate_size": plan.get("intermediate_size_dense")})
    run.log_metrics({"params_dense": plan.get("params_dense"), "params_pruned": plan.get("params_pruned"),
                     "achieved_ratio": plan.get("achieved_ratio"), "neurons_kept": sum(kept)})
    if plan_path is not None:
        run.log_artifact(plan_path, "plan")
    from hfprune.plots import plot_neurons_kept

    with _scratch() as tmp:
        png = plot_neurons_kept({f"{plan['criterion']} r{plan['ratio']}": plan}, tmp / "neurons_kept.png",
                                title=plan["model"])
        run.log_artifact(png, "plots")


def log_cell_metrics(run: StageRun, metrics: dict, metrics_path: str | os.PathLike | None = None) -> None:
    """A metrics JSON (docs/CONTRACTS.md) as flat MLflow metrics, plus the file and its per-unit records."""
    if not run.enabled:
        return
    from hfprune.evaluation import flatten_metrics
    from hfprune.evaluation.records import records_path

    run.log_metrics(flatten_metrics(metrics))
    if metrics_path is not None:  # one upload: both files, linked (not copied) into one folder
        with _scratch() as tmp:
            (tmp / "metrics").mkdir()
            for path in (Path(metrics_path), records_path(metrics_path)):
                (tmp / "metrics" / path.name).symlink_to(path.resolve())
            run.log_artifact(tmp / "metrics")


def log_scores(run: StageRun, scores_path: str | os.PathLike) -> None:
    """Scoring time and peak memory as metrics, the sidecar JSON and a per-layer score plot as artifacts."""
    if not run.enabled:
        return
    from safetensors.torch import load_file

    from hfprune.plots import plot_layer_scores

    sidecar = Path(scores_path).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    run.log_metrics({"score_seconds": meta.get("seconds"), "score_peak_memory_mb": meta.get("peak_memory_mb"),
                     "calibration_tokens": (meta.get("calibration") or {}).get("tokens")})
    run.log_artifact(sidecar, "scores")
    with _scratch() as tmp:
        png = plot_layer_scores(load_file(str(scores_path)), tmp / "layer_scores.png",
                                title=f"{meta.get('model')}: {meta.get('criterion')} scores")
        run.log_artifact(png, "plots")


def log_recovery(run: StageRun, summary: dict, out_dir: str | os.PathLike) -> None:
    """The training loss per optimizer step (a metric history), time and steps, and recovery.json."""
    if not run.enabled:
        return
    run.log_series("recovery_loss", summary.get("loss_curve") or [])
    run.log_metrics({"recovery_seconds": summary.get("seconds"), "recovery_steps": len(summary.get("loss_curve") or []),
                     **{f"recovery_peak_gpu_memory_gb_{i}": gb
                        for i, gb in enumerate(summary.get("peak_gpu_memory_gb") or [])}})
    run.log_artifact(Path(out_dir) / "recovery.json", "recovery")


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hfprune-mlflow-") as tmp:
        yield Path(tmp)
