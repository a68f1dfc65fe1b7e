"""Faults a grid meets: concurrent writers to one MLflow SQLite store, a scoring job killed with SIGKILL
(resume), and determinism of plans and evaluations across separate processes.

Same-seed scoring gives byte-identical score files: tests/test_scorer.py::
test_same_seed_gives_byte_identical_score_files (not repeated here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import experiment_runs
from safetensors.torch import save_file

from hfprune import tracking, tracking_store
from hfprune.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


# ---- 8 jobs logging to one SQLite store at once ---------------------------------------------------------

WORKER = """
import json, sys, time
from pathlib import Path
from hfprune import tracking
import mlflow  # noqa: F401 - imported before the start line, so the jobs really start together
cfg, i, go, art_dir = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
Path(art_dir / f"ready{i}").touch()
while not go.exists():
    time.sleep(0.005)
with tracking.stage_run(cfg, model="tiny", stage="evaluate", criterion="magnitude", ratio=(i + 1) / 10) as run:
    run.log_params({"worker": i, "extra": {"a": i, "b": f"w{i}"}})
    run.log_metrics({f"m{k}": i + k / 10 for k in range(5)})
    run.log_series("curve", [i, i + 1, i + 2])
    art = art_dir / f"out{i}.txt"
    art.write_text(f"worker {i}")
    run.log_artifact(art, "out")
"""

N_JOBS = 8


@pytest.mark.slow
def test_eight_concurrent_jobs_lose_no_run_param_or_metric(tmp_path):
    """A fresh store: the 8 jobs also race on the schema migration, the experiment and the parent run."""
    cfg = validate_config({"experiment": "conc", "results_dir": str(tmp_path / "results"),
                           "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path / "tiny")}],
                           "criteria": ["magnitude"], "ratios": [0.2],
                           "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    go, arts = tmp_path / "go", tmp_path / "arts"
    arts.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "cfg.json"), str(i), str(go), str(arts)],
                              env=_env(), stderr=subprocess.PIPE, text=True) for i in range(N_JOBS)]
    deadline = time.monotonic() + 120
    while len(list(arts.glob("ready*"))) < N_JOBS and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * N_JOBS, errors
    # stage_run degrades to an untracked job on store errors (a warning): none may have happened
    assert not any("tracking unavailable" in e for e in errors), errors

    client = _client(tracking_store.tracking_uri(cfg))
    exps = client.search_experiments(filter_string="name = 'conc'")
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("hfprune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hfprune.role") == "job"]
    assert len(parents) == 1 and len(children) == N_JOBS and len(runs) == N_JOBS + 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_worker = {int(c.data.params["worker"]): c for c in children}
    assert sorted(by_worker) == list(range(N_JOBS))
    for i, child in by_worker.items():
        p, m = child.data.params, child.data.metrics
        assert (p["extra.a"], p["extra.b"], p["model"], p["ratio"]) == (str(i), f"w{i}", "tiny", str((i + 1) / 10))
        assert p["versions.mlflow"] and p["calibration.tokens"] == str(16 * 128)
        assert {k: m[k] for k in m if k.startswith("m")} == {f"m{k}": i + k / 10 for k in range(5)}
        history = client.get_metric_history(child.info.run_id, "curve")
        assert sorted((h.step, h.value) for h in history) == [(0, i), (1, i + 1), (2, i + 2)]
        local = client.download_artifacts(child.info.run_id, f"out/out{i}.txt", str(tmp_path))
        assert Path(local).read_text() == f"worker {i}"
        assert child.data.tags[tracking_store.PID_TAG] == str(procs[i].pid)  # what close_stale_runs checks


# ---- a scoring job killed with SIGKILL, then the grid resumed -------------------------------------------

def _snakemake_cmd(workdir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", "--configfile", str(config), "--workflow-profile", str(ROOT / "profiles/local")]


def _score_process(workdir: Path) -> int | None:
    """Pid of the `hfprune.cli score` job running in `workdir` (the cwd tells it from other people's jobs)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"hfprune.cli" in cmd and b"score" in cmd and os.readlink(entry / "cwd") == str(workdir):
                return int(entry.name)
        except OSError:  # the process ended while we looked
            continue
    return None


@pytest.mark.slow
@pytest.mark.workflow
def test_scoring_killed_midway_then_the_grid_resumes(tmp_path, smollm2_dir):
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg.update(experiment="resume", resources_dir=str(Path(smollm2_dir).resolve().parent.parent),
               criteria=["taylor_entropy"],
               # 4 one-sequence batches: the kill lands after the first, before the file is written
               calibration={"source": "calibration", "num_sequences": 4, "seq_len": 32, "batch_size": 1, "seed": 0},
               evaluation={"suite": "offline7", "tasks": ["boolq"], "limit": 1, "batch_size": 4,
                           "perplexity": {"sources": ["wiki"], "seq_len": 64, "max_tokens": 128},
                           "fidelity": {"enabled": False}, "efficiency": {"enabled": False}})
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(cfg))
    exp = tmp_path / "results" / "resume"
    scores = exp / "scores" / "smollm2-135m"
    log = exp / "logs" / "score" / "smollm2-135m" / "taylor_entropy" / "s0.log"

    first = subprocess.Popen(_snakemake_cmd(tmp_path, config), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and first.poll() is None:
        progress = re.findall(r"\| *(\d+)/4", log.read_text()) if log.is_file() else []
        if progress and 1 <= int(progress[-1]) < 4 and (pid := _score_process(tmp_path)):
            os.kill(pid, signal.SIGKILL)  # mid-scoring: some batches done, the file not yet written
            killed = pid
        time.sleep(0.02)
    output = first.communicate(timeout=600)[0]
    assert killed is not None, f"never saw the scoring job mid-way:\n{output[-3000:]}"
    assert first.returncode != 0  # the killed job failed the run (the other jobs went on: keep-going)
    # nothing that looks complete: neither output, nor a leftover temp file beside them
    assert not scores.exists() or sorted(p.name for p in scores.iterdir() if "taylor_entropy" in p.name) == []
    assert (exp / "metrics/smollm2-135m/dense.json").is_file() and not (exp / "report/report.md").exists()
    runs = {r.info.run_id: r for r in experiment_runs(tmp_path / "results/mlflow.db", "resume")}
    dead = [r for r in runs.values() if r.data.tags.get(tracking_store.PID_TAG) == str(killed)]
    assert len(dead) == 1 and dead[0].info.status == "RUNNING"  # nobody could close it

    second = subprocess.run(_snakemake_cmd(tmp_path, config), env=_env(), capture_output=True, text=True,
                            timeout=600, check=False)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert scores.joinpath("taylor_entropy/s0.safetensors").is_file()
    assert scores.joinpath("taylor_entropy/s0.json").is_file()
    report = (exp / "report/report.md").read_text()
    assert "have no metrics" not in report
    after = {r.info.run_id: r for r in experiment_runs(tmp_path / "results/mlflow.db", "resume")}
    stale = after[dead[0].info.run_id]
    assert stale.info.status == "KILLED" and "closed by close_stale_runs" in stale.data.tags["hfprune.closed"]
    assert {r.info.status for i, r in after.items() if i != stale.info.run_id} == {"FINISHED"}  # parent too
    rescored = [r for r in after.values() if r.data.tags.get("hfprune.stage") == "score" and r.info.run_id not in runs]
    assert len(rescored) == 1 and rescored[0].data.metrics["calibration_tokens"] == 4 * 32  # entropy: every position


def test_close_stale_runs_keeps_live_jobs(tmp_path):
    """Only runs whose process is gone are closed: a live job (this test's process) is left RUNNING, and a
    pid that now belongs to another process (a different start time) counts as gone."""
    cfg = validate_config({"experiment": "stale", "results_dir": str(tmp_path),
                           "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path)}],
                           "criteria": ["magnitude"], "ratios": [0.2],
                           "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    assert tracking_store.close_stale_runs(cfg) == []  # no store yet: nothing to do, nothing created
    assert not (tmp_path / "mlflow.db").exists()
    with (tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as live,
          tracking.stage_run(cfg, model="tiny", stage="score", criterion="random") as reused):
        reused.set_tags({tracking_store.PID_START_TAG: "0"})  # same pid, another process's start time
        assert tracking_store.close_stale_runs(cfg) == [reused.run_id]
        client = _client(tracking_store.tracking_uri(cfg))
        assert client.get_run(live.run_id).info.status == "RUNNING"
        assert client.get_run(reused.run_id).info.status == "KILLED"


# ---- determinism across processes ------------------------------------------------------------------------

def _hfprune(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tiny_config(tmp_path: Path, model_dir, **changes) -> Path:
    cfg = {"models": [{"name": "m", "family": "llama", "source": str(model_dir)}], "criteria": ["magnitude"],
           "ratios": [0.005], "device": "cpu", "resources_dir": str(ROOT / "resources"),
           "tracking": {"enabled": False}, **changes}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_same_scores_give_a_byte_identical_plan(tmp_path, tiny_llama_dir):
    """Two processes (different hash seeds); scores full of ties, global allocation: the tie-breaking must
    not depend on anything but the scores."""
    gen = torch.Generator().manual_seed(0)
    scores = tmp_path / "s.safetensors"
    save_file({f"mlp.{i}": torch.randint(0, 4, (96,), generator=gen).float() for i in range(2)}, str(scores))
    config = _tiny_config(tmp_path, tiny_llama_dir, pruning={"allocation": "global"})
    for name in ("a", "b"):
        _hfprune("plan", "--config", config, "--model", "m", "--scores", scores, "--ratio", "0.005",
                 "--out", tmp_path / f"{name}.json")
    a = (tmp_path / "a.json").read_bytes()
    assert a == (tmp_path / "b.json").read_bytes()
    assert sum(len(layer["mlp_keep"]) for layer in json.loads(a)["layers"]) < 2 * 96


def _without_timings(metrics: dict) -> dict:
    out = json.loads(json.dumps(metrics))
    out.pop("efficiency", None)  # wall-clock speed
    out["meta"].pop("seconds", None)
    out["meta"].pop("timing", None)  # where the job's wall time went
    return out


@pytest.mark.slow
def test_same_subsample_seed_gives_the_same_metrics(tmp_path, tiny_llama_dir):
    """`hfprune evaluate` of one pruned cell in two processes: every metric (accuracy with its subsample,
    perplexity, fidelity) and the doc indices agree exactly; only timings may differ."""
    gen = torch.Generator().manual_seed(0)
    scores = tmp_path / "s.safetensors"
    save_file({f"mlp.{i}": torch.rand(96, generator=gen) for i in range(2)}, str(scores))
    config = _tiny_config(tmp_path, tiny_llama_dir, evaluation={
        "tasks": ["arc_easy", "boolq"], "limit": 3, "subsample_seed": 7, "batch_size": 4,
        "perplexity": {"sources": ["wiki"], "seq_len": 32, "max_tokens": 256},
        "fidelity": {"num_prompts": 3, "seq_len": 16},
        "efficiency": {"prefill_tokens": 8, "decode_batch": 1, "decode_tokens": 2, "repeats": 1}})
    _hfprune("plan", "--config", config, "--model", "m", "--scores", scores, "--ratio", "0.005",
             "--out", tmp_path / "plan.json")
    results = []
    for name in ("a", "b"):
        _hfprune("evaluate", "--config", config, "--model", "m", "--plan", tmp_path / "plan.json",
                 "--out", tmp_path / f"{name}.json")
        results.append(json.loads((tmp_path / f"{name}.json").read_text()))
    a, b = map(_without_timings, results)
    assert a == b
    assert set(a["tasks"]) == {"offline_arc_easy", "offline_boolq"} and a["fidelity"]["js_distance"] > 0
    assert a["meta"]["subsample_seed"] == 7 and all(len(v) == 3 for v in a["meta"]["subsample_indices"].values())
