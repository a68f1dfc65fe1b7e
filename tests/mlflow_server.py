"""A real `mlflow server` (SQLite backend, artifact root in a temp dir, a free loopback port) for tests, and the
check that a grid's every finished job has exactly one FINISHED run with its metrics and artifacts.

`server_fixture` below is the pytest fixture `mlflow_server` (one server per test module); import it into a
test module to use it. `stop()` / `start()` restart it on the same port and database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.root / "server.log", "a") as log:
            # own session: stop() ends the server and its workers, nothing else
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text()[-3000:] if path.exists() else ""


@pytest.fixture(scope="module", name="mlflow_server")
def server_fixture(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def check_grid_runs(uri: str, cfg: dict) -> dict:
    """Every finished job of the config's grid (hfprune.sync.grid_jobs) has exactly one run in the store at
    `uri`, FINISHED, keyed by its output and its output's digest; evaluate runs carry the metrics JSON's
    metrics and its files, score runs the sidecar. Returns {output key: run}."""
    from mlflow import MlflowClient

    from hfprune import sync, tracking_store
    from hfprune.evaluation import flatten_metrics
    from hfprune.runtime import read_json

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    jobs = [r for r in runs if r.data.tags.get("hfprune.role") == "job"]
    by_key = Counter(r.data.tags.get(tracking_store.OUTPUT_TAG) for r in jobs)
    assert all(n == 1 for n in by_key.values()), by_key  # nothing duplicated
    out = {}
    done = [j for j in sync.grid_jobs(cfg) if sync.finished(j)]
    for job in done:
        key = tracking_store.output_key(job.cfg, job.output)
        (run,) = [r for r in jobs if r.data.tags.get(tracking_store.OUTPUT_TAG) == key]
        assert run.info.status == "FINISHED", (key, run.info.status)
        assert run.data.tags[tracking_store.DIGEST_TAG] == tracking_store.output_digest(job.output), key
        assert run.info.end_time >= run.info.start_time, key
        arts = {a.path for d in ("metrics", "scores", "plan", "plots") for a in client.list_artifacts(run.info.run_id, d)}
        if job.stage == "evaluate":
            expected = flatten_metrics(read_json(job.output))
            assert {k: run.data.metrics[k] for k in expected} == expected, key  # nothing lost
            name = Path(job.output).name
            assert {f"metrics/{name}", f"metrics/{name.removesuffix('.json')}.units.parquet"} <= arts, arts
            if job.plan:
                assert {"plan/" + Path(job.plan).name, "plots/neurons_kept.png"} <= arts, arts
        elif job.stage == "score":
            assert run.data.metrics["score_seconds"] > 0 and "plots/layer_scores.png" in arts, key
        out[key] = run
    assert len(out) == len(jobs), (sorted(out), sorted(by_key))  # no run beside the grid's jobs
    return out
