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
fails the job at once, before any work, naming the URI (MLflow itself would retry for minutes).
"""

from __future__ import annotations

import contextlib
import fcntl
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

ROLE_TAG, MODEL_TAG, STAGE_TAG = "hfprune.role", "hfprune.model", "hfprune.stage"
HOST_TAG, PID_TAG, PID_START_TAG = "hfprune.host", "hfprune.pid", "hfprune.pid_start"
SEED_TAG, VARIANT_TAG = "hfprune.seed", "hfprune.variant"
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; this value opens the runs table
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SQLITE_PREFIX = "sqlite:///"
_RETRIES = 8

log = logging.getLogger(__name__)


def tracking_uri(cfg: dict) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg["tracking"]["uri"]
    if uri.startswith(SQLITE_PREFIX):
        path = Path(uri[len(SQLITE_PREFIX):])
        if not path.is_absolute():
            uri = SQLITE_PREFIX + str(path.resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(SQLITE_PREFIX):]) if uri.startswith(SQLITE_PREFIX) else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise at once, naming the URI, if an http(s) tracking server does not accept connections."""
    from urllib.parse import urlsplit

    url = urlsplit(uri)
    if url.scheme not in ("http", "https"):
        return
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            pass
    except OSError as exc:
        raise HFPruneError(f"MLflow tracking server {uri} is unreachable ({exc}); start it, fix tracking.uri "
                           "or MLFLOW_TRACKING_URI, or set tracking.enabled: false") from None


def _retry(fn, *args, **kwargs):
    for attempt in range(_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MLflow wraps SQLAlchemy's OperationalError in its own exception types
            if "database is locked" not in str(exc) or attempt == _RETRIES - 1:
                raise
            time.sleep(0.1 * 2**attempt)


def _flat(prefix: str, value) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _flat(f"{prefix}.{key}" if prefix else str(key), sub)
    else:
        yield prefix, value


class Store:
    """An MlflowClient plus the lock that serialises writes to a shared SQLite file."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri = uri
        check_reachable(uri)
        db = sqlite_path(uri)
        self.lock_path = db.with_name(db.name + ".lock") if db else None
        if db:
            db.parent.mkdir(parents=True, exist_ok=True)
        with self.locked():  # the first client of a new file creates and migrates the schema
            self.client = _retry(MlflowClient, uri)
            _retry(self.client.search_experiments, max_results=1)

    @contextlib.contextmanager
    def locked(self):
        if self.lock_path is None:
            yield
            return
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def call(self, method: str, *args, **kwargs):
        with self.locked():
            return _retry(getattr(self.client, method), *args, **kwargs)

    def experiment_id(self, name: str) -> str:
        """Find or create the experiment, tagged to open on its runs table (also when an older run made it)."""
        with self.locked():
            exp = _retry(self.client.get_experiment_by_name, name)
            if exp is not None:
                if EXPERIMENT_KIND_TAG not in exp.tags:
                    _retry(self.client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return exp.experiment_id
            db = sqlite_path(self.uri)
            # next to the database rather than MLflow's default ./mlruns in whatever folder a job runs in
            location = (db.parent / "mlartifacts" / name).as_uri() if db else None
            return _retry(self.client.create_experiment, name, artifact_location=location,
                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})

    def parent_run(self, experiment_id: str, model: str, tags: dict) -> str:
        """Find or create the model's parent run (under the lock, so concurrent jobs agree on one)."""
        with self.locked():
            found = _retry(self.client.search_runs, [experiment_id], max_results=1,
                           filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{MODEL_TAG}` = '{model}'")
            if found:
                run_id = found[0].info.run_id
                _retry(self.client.update_run, run_id, status="RUNNING")
                return run_id
            run = _retry(self.client.create_run, experiment_id, run_name=model,
                         tags={ROLE_TAG: "parent", MODEL_TAG: model, **tags})
            return run.info.run_id

    def finish_parent_if_idle(self, experiment_id: str, parent_id: str) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        with self.locked():
            running = _retry(self.client.search_runs, [experiment_id], max_results=1,
                             filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' "
                                           "and attributes.status = 'RUNNING'")
            if not running:
                _retry(self.client.set_terminated, parent_id, "FINISHED")


def _process_start(pid: int) -> str | None:
    """Start time of a live process (clock ticks since boot, from /proc), so a reused pid is not mistaken for
    the job; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in (...) may hold spaces


def close_stale_runs(cfg: dict) -> list[str]:
    """Mark the experiment's RUNNING job runs started on this host whose process is gone as KILLED, and finish
    their parent runs if nothing else runs under them; returns the runs closed. Runs of other hosts (SLURM
    nodes) are left as they are: their processes cannot be seen from here."""
    if not cfg["tracking"]["enabled"]:
        return []
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return []
    try:
        store = Store(uri)
        exp = store.call("get_experiment_by_name", cfg["experiment"])
        host = socket.gethostname()
        running = [] if exp is None else store.call(
            "search_runs", [exp.experiment_id], max_results=50_000,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'job' and tags.`{HOST_TAG}` = '{host}'")
    except HFPruneError:
        raise  # an unreachable server: the grid stops before any job
    except Exception as exc:  # noqa: BLE001 - as in stage_run, a broken store costs the tracking, not the grid
        log.warning("MLflow store %s unusable (%s: %s); stale runs not checked", uri, type(exc).__name__, exc)
        return []
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    closed, parents = [], set()
    for run in running:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if pid.isdigit() and str(_process_start(int(pid))) == tags.get(PID_START_TAG):
            continue  # still working (a job of another Snakemake run here); without /proc: "None", kept
        store.call("set_tag", run.info.run_id, "hfprune.closed", "process gone; closed by close_stale_runs")
        store.call("set_terminated", run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
        parents.add(tags.get(MLFLOW_PARENT_RUN_ID))
    for parent in parents - {None}:
        store.finish_parent_if_idle(exp.experiment_id, parent)
    if closed:
        log.warning("closed %d stale MLflow run(s) of experiment %r as KILLED: %s", len(closed), cfg["experiment"],
                    ", ".join(closed))
    return closed


class StageRun:
    """One job's MLflow run; every method is a no-op when tracking is disabled (store None)."""

    def __init__(self, store: Store | None = None, run_id: str | None = None):
        self.store, self.run_id = store, run_id

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def log_params(self, params: dict) -> None:
        """Nested dicts become dotted names; values are stringified (MLflow params are strings)."""
        if not self.enabled:
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM_VAL_LENGTH])
                 for k, v in _flat("", params)]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.store.call("log_batch", self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

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
            self.store.call("log_batch", self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

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

            self.store.call("log_batch", self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.store.call("log_artifact", self.run_id, str(path), artifact_path)


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
    if recovered:
        params["recovery"] = cfg["recovery"]
    return params


@contextlib.contextmanager
def stage_run(cfg: dict, *, model: str, stage: str, criterion: str | None = None, ratio: float | None = None,
              recovered: bool = False) -> Iterator[StageRun]:
    """Open the job's child run (RUNNING) under the model's parent run; close it FINISHED, or FAILED/KILLED
    if the block raises (the exception propagates). Model, criterion, ratio, calibration seed and the grid
    variant are both params and tags, so the UI can filter on either."""
    variant = variant_name(cfg)
    if not cfg["tracking"]["enabled"]:
        yield StageRun()
        return
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    try:
        store = Store(tracking_uri(cfg))
        exp_id = store.experiment_id(cfg["experiment"])
        # the model's identity: not how its jobs run (`resources`)
        entry = {f"hfprune.{k}": v for k, v in model_entry(cfg, model).items() if k not in ("name", "resources")}
        parent_id = store.parent_run(exp_id, model, entry)
        tags = {MLFLOW_PARENT_RUN_ID: parent_id, MODEL_TAG: model, STAGE_TAG: stage, ROLE_TAG: "job",
                "hfprune.criterion": criterion or "dense", "hfprune.recovered": str(recovered),
                SEED_TAG: str(cfg["calibration"]["seed"]), VARIANT_TAG: variant}
        if ratio is not None:
            tags["hfprune.ratio"] = str(ratio)
        seed = cfg["calibration"]["seed"] if criterion else None  # the dense row has no calibration draw
        tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
                     PID_START_TAG: str(_process_start(os.getpid()))})
        label = "" if variant == "default" else variant
        child = store.call("create_run", exp_id, run_name=run_name(stage, criterion, ratio, recovered, seed, label),
                           tags=tags)
    except HFPruneError:
        raise  # an unreachable server: stop before any work rather than run a grid nobody can follow
    except Exception as exc:  # noqa: BLE001 - the job's files are the results; a broken store must not cost them
        log.warning("MLflow tracking unavailable (%s: %s); this job runs untracked", type(exc).__name__, exc)
        child = None
    if child is None:
        yield StageRun()
        return
    run = StageRun(store, child.info.run_id)
    status = "FAILED"
    try:
        run.log_params(job_params(cfg, model, criterion, ratio, recovered))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        store.call("set_terminated", run.run_id, status)
        store.finish_parent_if_idle(exp_id, parent_id)


@contextlib.contextmanager
def cell_run(cfg: dict, model: str, stage: str, plan_path: str | os.PathLike | None = None,
             recovered: bool = False) -> Iterator[StageRun]:
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
    with stage_run(cfg, model=model, stage=stage, criterion=criterion, ratio=ratio, recovered=recovered) as run:
        if plan:
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
    from hfprune.report import plot_neurons_kept

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
    if metrics_path is not None:
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(records_path(metrics_path), "metrics")


def log_scores(run: StageRun, scores_path: str | os.PathLike) -> None:
    """Scoring time and peak memory as metrics, the sidecar JSON and a per-layer score plot as artifacts."""
    if not run.enabled:
        return
    from safetensors.torch import load_file

    from hfprune.report import plot_layer_scores

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
    run.log_metrics({"recovery_seconds": summary.get("seconds"), "recovery_steps": len(summary.get("loss_curve") or [])})
    run.log_artifact(Path(out_dir) / "recovery.json", "recovery")


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hfprune-mlflow-") as tmp:
        yield Path(tmp)
