"""The smoke grid against a real `mlflow server` over HTTP (tests/mlflow_server.py), with a model's own `seeds`
list: the server stopped during a job and started again, the completeness check naming the gap, `hfprune sync`
filling it (a second sync adds nothing), then the rest of the grid; every job's run, metrics and artifacts read
back through MlflowClient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer, check_grid_runs, server_fixture  # noqa: F401  (the fixture `mlflow_server`)

from hfprune.validation import validate_config

pytestmark = [pytest.mark.workflow]

ROOT = Path(__file__).resolve().parents[1]


def _env(server: MlflowServer, **extra: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": server.uri, **extra}


def _snakemake(workdir: Path, config: Path, *targets: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(config), "--workflow-profile", str(ROOT / "profiles/local"),
           *targets]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _hfprune(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfprune.cli", *args], capture_output=True, text=True, env=env,
                          check=False, timeout=600)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-6000:]
    return out


def _running_job(server: MlflowServer, experiment: str, timeout: float = 600) -> None:
    """Wait until the experiment has a RUNNING job run (the job has started and logged to the server)."""
    from mlflow import MlflowClient

    client, deadline = MlflowClient(server.uri), time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        if exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                      "tags.`hfprune.role` = 'job'"):
            return
        time.sleep(0.5)
    raise AssertionError("no job run became RUNNING")


@pytest.mark.slow
def test_smoke_grid_on_a_server_that_restarts_mid_job(mlflow_server, tmp_path, smollm2_dir):
    server = mlflow_server
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    seeds = cfg["calibration"].pop("seeds")
    # the model's own seeds list reached a parent-run tag and left every job of that model untracked
    cfg["models"][0]["seeds"] = seeds
    cfg.update(experiment="smoke-server", results_dir=str(tmp_path / "results"),
               resources_dir=str(Path(smollm2_dir).resolve().parent.parent))
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(cfg))
    full = validate_config(cfg)
    exp = tmp_path / "results" / cfg["experiment"]
    dense = exp / "metrics/smollm2-135m/dense.json"
    run_config = str(exp / "config.yaml")
    # MLflow's own HTTP retries would ride out a short restart; none here, so the job meets the stopped server
    env = _env(server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")

    # 1. one job; the server stops once its run is RUNNING and starts again after the run ended
    proc = _snakemake(tmp_path, config, str(dense), env=env)
    try:
        _running_job(server, cfg["experiment"])
        server.stop()
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    assert dense.is_file() and json.loads(dense.read_text())["average"] is not None  # the job's results
    job_log = (exp / "logs/evaluate/smollm2-135m/dense.log").read_text()
    assert f"MLflow store {server.uri} failed during this job" in job_log, job_log[-3000:]
    # the end of Snakemake's output says the store could not be checked (it was still down)
    assert f"hfprune workflow: WARNING: MLflow tracking not checked (HFPruneError: MLflow tracking server " \
           f"{server.uri} is unreachable" in out, out[-3000:]

    # 2. with the server back, one more job: the end of Snakemake's output and `validate --tracking` name the
    # incomplete run; sync completes it
    score = exp / "scores/smollm2-135m/magnitude/s0.safetensors"
    ended = _finish(_snakemake(tmp_path, config, str(score), env=env))
    gap = "metrics/smollm2-135m/dense.json (RUNNING, incomplete)"
    assert "hfprune workflow: WARNING: " in ended and gap in ended, ended[-3000:]
    check = _hfprune("validate", run_config, "--tracking", env=env)
    assert check.returncode == 1 and "INCOMPLETE, 1 of 2 finished job(s)" in check.stdout and gap in check.stdout
    first = _hfprune("sync", "--config", run_config, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    logged = [line for line in first.stdout.splitlines() if line.startswith("logged ")]  # (MLflow prints links)
    assert logged == ["logged metrics/smollm2-135m/dense.json"], first.stdout
    assert "1 job(s) logged" in first.stdout and ": complete (2 finished job(s)" in first.stdout
    second = _hfprune("sync", "--config", run_config, env=env)
    assert second.returncode == 0 and second.stdout.startswith("0 job(s) logged"), second.stdout
    # the job's own run, completed with the metrics JSON's metrics, not a second one
    dense_run = check_grid_runs(server.uri, full)["metrics/smollm2-135m/dense.json"]
    assert dense_run.data.tags["hfprune.pid"].isdigit()

    # 3. the rest of the grid with the server up: every run FINISHED; the report and Snakemake say complete
    out = _finish(_snakemake(tmp_path, config, env=_env(server)))
    assert "hfprune workflow: MLflow store" in out and ": complete (" in out, out[-3000:]
    runs = check_grid_runs(server.uri, full)
    assert len(runs) == 3 + 4  # score: magnitude s0, taylor_entropy s0/s1; evaluate: dense + 3 cells
    report = (exp / "report/report.md").read_text()
    assert f"MLflow store {server.uri}: complete (7 finished job(s)" in report.split("## Verdicts")[0]
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    parent_id = dense_run.data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and json.loads(parent.data.tags["hfprune.seeds"]) == seeds
    artifacts = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {"report/report.md", "report/tables"} <= artifacts, artifacts
    tables = {a.path for a in client.list_artifacts(parent_id, "report/tables")}
    assert "report/tables/smollm2-135m.verdict.r0.2.csv" in tables, tables
    check = _hfprune("validate", run_config, "--tracking", env=env)
    assert check.returncode == 0 and ": complete (7 finished job(s)" in check.stdout

    # `hfprune ui` on a server's URI gives the server's link to the runs table; the server answers for it
    ui = _hfprune("ui", "--config", run_config, env=env)
    exp_id = client.get_experiment_by_name(cfg["experiment"]).experiment_id
    assert ui.stdout.strip() == f"{server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
