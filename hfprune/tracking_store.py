"""The MLflow store of the grid (see hfprune/tracking.py's docstring): the tracking URI, the lock and retries
around a shared SQLite file (`Store`: experiment and parent runs), the one flattening rule for param and tag
values, the run tags, the output key and digest that match runs to files, and `close_stale_runs`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from hfprune.errors import HFPruneError

ROLE_TAG, MODEL_TAG, STAGE_TAG = "hfprune.role", "hfprune.model", "hfprune.stage"
HOST_TAG, PID_TAG, PID_START_TAG = "hfprune.host", "hfprune.pid", "hfprune.pid_start"
SEED_TAG, VARIANT_TAG = "hfprune.seed", "hfprune.variant"
OUTPUT_TAG, DIGEST_TAG = "hfprune.output", "hfprune.output_sha256"
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


def mlflow_values(mapping: dict, limit: int) -> dict[str, str]:
    """The one rule for every param and tag value: nested dicts become dotted names, strings stay, anything
    else (lists, numbers, None, bools) is JSON text, cut to MLflow's `limit` (SQLite rejects a list outright)."""
    return {k: (v if isinstance(v, str) else json.dumps(v, default=str))[:limit] for k, v in _flat("", mapping)}


def _tags(mapping: dict) -> dict[str, str]:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return mlflow_values(mapping, MAX_TAG_VAL_LENGTH)


def output_key(cfg: dict, path: str | os.PathLike) -> str:
    """A job's output as its run's key: the path under <results_dir>/<experiment>/ (absolute outside it)."""
    exp = (Path(cfg["results_dir"]) / cfg["experiment"]).resolve()
    path = Path(path).resolve()
    return str(path.relative_to(exp)) if path.is_relative_to(exp) else str(path)


def output_digest(path: str | os.PathLike) -> str:
    """sha256 of a job's output file; of a recovered folder, its recovery.json (written last, holding the loss
    curve and the time, so it differs per training run) rather than gigabytes of weights."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with open(path / "recovery.json" if path.is_dir() else path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
                         tags=_tags({ROLE_TAG: "parent", MODEL_TAG: model, **tags}))
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
        if OUTPUT_TAG in tags and (Path(cfg["results_dir"]) / cfg["experiment"] / tags[OUTPUT_TAG]).exists():
            continue  # its job finished, its store failed mid-job (outputs are atomic): `sync` completes the run
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
