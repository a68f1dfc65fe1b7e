"""GPU slot assignment with a simulated device count: real processes contending for real lock files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hfprune import gpu

# A job that records which device it was given and when it ran.
JOB = r"""
import json, os, sys, time
start = time.time()
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "w") as f:
    json.dump({"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, f)
"""


def _env(lock_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", gpu.ENV_NUM_GPUS, gpu.ENV_JOB_GPUS, "SLURM_JOB_ID", *gpu.SLURM_GPU_VARS)}
    env[gpu.ENV_LOCK_DIR] = str(lock_dir)
    env.update(extra)
    return env


def _launch(tmp_path, name: str, seconds: float, env: dict, gpus: int | None = None) -> tuple[subprocess.Popen, object]:
    out = tmp_path / f"{name}.json"
    count = [] if gpus is None else ["--gpus", str(gpus)]
    cmd = [sys.executable, "-m", "hfprune.gpu", *count, "--", sys.executable, "-c", JOB, str(out), str(seconds)]
    return subprocess.Popen(cmd, env=env), out


def test_concurrent_jobs_get_distinct_devices_and_wait_for_a_free_one(tmp_path):
    env = _env(tmp_path / "locks", **{gpu.ENV_NUM_GPUS: "2"})
    jobs = [_launch(tmp_path, f"job{i}", 1.5, env) for i in range(5)]
    for proc, _ in jobs:
        assert proc.wait(timeout=60) == 0
    runs = [json.loads(out.read_text()) for _, out in jobs]
    assert {r["device"] for r in runs} == {"0", "1"}
    # a device never runs two jobs at once ...
    for device in ("0", "1"):
        spans = sorted((r["start"], r["end"]) for r in runs if r["device"] == device)
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(spans)), spans
    # ... and both devices were busy at the same time (the slots do not serialise everything)
    first = {d: min(r["start"] for r in runs if r["device"] == d) for d in ("0", "1")}
    ends = {d: min(r["end"] for r in runs if r["device"] == d) for d in ("0", "1")}
    assert max(first.values()) < min(ends.values())


def test_two_gpu_jobs_get_disjoint_pairs_and_a_third_waits(tmp_path):
    env = _env(tmp_path / "locks", **{gpu.ENV_NUM_GPUS: "4", gpu.ENV_JOB_GPUS: "2"})
    jobs = [_launch(tmp_path, f"pair{i}", 1.5, env) for i in range(3)]  # the count from the rule's environment
    for proc, _ in jobs:
        assert proc.wait(timeout=60) == 0
    runs = [json.loads(out.read_text()) for _, out in jobs]
    pairs = [set(r["device"].split(",")) for r in runs]
    assert all(len(p) == 2 for p in pairs), pairs
    for a, b in itertools.combinations(range(3), 2):  # overlapping in time -> disjoint devices
        if runs[a]["start"] < runs[b]["end"] and runs[b]["start"] < runs[a]["end"]:
            assert not pairs[a] & pairs[b], (runs[a], runs[b])
    first, second = sorted(runs, key=lambda r: r["start"])[:2]
    assert second["start"] < first["end"]  # two pairs of the four devices ran at once ...
    assert max(r["start"] for r in runs) >= min(r["end"] for r in runs) - 0.2  # ... and the third waited for one


def test_a_job_needing_more_gpus_than_visible_fails_in_one_line(tmp_path):
    env = _env(tmp_path / "locks", **{gpu.ENV_NUM_GPUS: "2"})
    cmd = [sys.executable, "-m", "hfprune.gpu", "--gpus", "3", "--", sys.executable, "-c", "pass"]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "needs 3 GPUs (resources.gpus_per_job)" in res.stderr


def test_slurm_job_takes_the_granted_gpus_or_refuses_to_guess(tmp_path):
    env = _env(tmp_path / "locks", SLURM_JOB_ID="77", SLURM_STEP_GPUS="2,3", **{gpu.ENV_JOB_GPUS: "2"})
    proc, out = _launch(tmp_path, "granted", 0.0, env)
    assert proc.wait(timeout=60) == 0
    assert json.loads(out.read_text())["device"] == "2,3"
    # nothing tells (no variable, no scontrol to ask): one line, no guess, the command never runs
    env = _env(tmp_path / "locks", SLURM_JOB_ID="77", PATH=str(tmp_path))
    cmd = [sys.executable, "-m", "hfprune.gpu", "--", sys.executable, "-c", JOB, str(tmp_path / "no.json"), "0"]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "SLURM job 77: cannot tell which GPUs it was granted" in res.stderr and "refusing to guess" in res.stderr
    assert not (tmp_path / "no.json").exists()


def test_slots_map_onto_cuda_visible_devices(tmp_path):
    env = _env(tmp_path / "locks", CUDA_VISIBLE_DEVICES="5,7")
    jobs = [_launch(tmp_path, f"job{i}", 1.0, env) for i in range(2)]
    for proc, _ in jobs:
        assert proc.wait(timeout=60) == 0
    assert sorted(json.loads(out.read_text())["device"] for _, out in jobs) == ["5", "7"]


def test_no_gpu_runs_the_command_unchanged(tmp_path):
    env = _env(tmp_path / "locks", **{gpu.ENV_NUM_GPUS: "0"})
    proc, out = _launch(tmp_path, "cpu", 0.0, env)
    assert proc.wait(timeout=60) == 0
    assert json.loads(out.read_text())["device"] is None
    assert not (tmp_path / "locks").exists()


def test_exit_status_is_the_commands(tmp_path):
    env = _env(tmp_path / "locks", **{gpu.ENV_NUM_GPUS: "1"})
    cmd = [sys.executable, "-m", "hfprune.gpu", "--", sys.executable, "-c", "import sys; sys.exit(3)"]
    assert subprocess.run(cmd, check=False, env=env).returncode == 3


def test_a_killed_job_frees_its_slot(tmp_path):
    lock_dir = tmp_path / "locks"
    env = _env(lock_dir, **{gpu.ENV_NUM_GPUS: "1"})
    holder, _ = _launch(tmp_path, "holder", 60.0, env)
    deadline = time.monotonic() + 30
    while not (lock_dir / "gpu0.lock").exists() or not (lock_dir / "gpu0.lock").read_text().strip():
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    with pytest.raises(TimeoutError):
        gpu.acquire(["0"], lock_dir, timeout=0.5)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    devices, fds = gpu.acquire(["0"], lock_dir, timeout=5)
    os.close(fds[0])
    assert devices == ["0"]


def test_gpu_slot_context_sets_and_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with gpu.gpu_slot(lock_dir=tmp_path) as first:
        assert first == ["2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        with gpu.gpu_slot(["2", "3"], lock_dir=tmp_path) as second:
            assert second == ["3"]  # the first slot is held (flock is per open file, so this holds in-process)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    with gpu.gpu_slot(lock_dir=tmp_path, count=2) as both:
        assert both == ["2", "3"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpu.gpu_slot(lock_dir=tmp_path / "none") as none:
        assert none == []
