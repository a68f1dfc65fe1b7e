"""Workflows submitted through Snakemake's SLURM executor to a real one-node cluster (tests/slurm_cluster.py).

Skipped, with the reason, where SLURM cannot be brought up (packages missing: scripts/ci_setup_slurm.sh
installs them; not root).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow_server import check_grid_runs, server_fixture  # noqa: F401  (provides the fixture `mlflow_server`)
from slurm_cluster import SlurmCluster, slurm_fixture  # noqa: F401  (provides the fixture `slurm`)

from hfprune.config import cell_seeds
from hfprune.validation import validate_config

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# The options a one-node cluster without accounting needs (see docs/SLURM.md): sacct has no slurmdbd to ask,
# so job status must come from squeue, which keeps finished jobs for MinJobAge seconds.
SLURM_ARGS = ["--executor", "slurm", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "5", "--slurm-no-account"]
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def recover_process(workdir: Path) -> int:
    """The pid of the one `hfprune.cli recover` process running in `workdir` (the test's own job)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"recover" in cmdline and b"hfprune.cli" in cmdline and (proc / "cwd").resolve() == workdir.resolve():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    assert len(found) == 1, found
    return found[0]


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM is pending in process `pid` (its own or its thread group's pending set, /proc status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        pytest.fail(f"process {pid} ended without a pending SIGTERM (killed outright?)")
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
    return any(int(m, 16) & (1 << (signal.SIGTERM - 1)) for m in masks)


def snakemake_slurm(cluster: SlurmCluster, workdir: Path, *args: str, timeout: float) -> dict[str, str]:
    """Run snakemake through the SLURM executor in `workdir`; return {slurm job id: rule} of the jobs it
    submitted (read back from scontrol, so each id is a real job of this cluster)."""
    env = {**cluster.env, "PATH": f"{VENV_BIN}{os.pathsep}{cluster.env['PATH']}"}
    cmd = [str(VENV_BIN / "snakemake"), "--directory", str(workdir), *SLURM_ARGS, *args]
    res = subprocess.run(cmd, check=False, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"snakemake failed ({res.returncode}):\n{log[-6000:]}\n{cluster.logs()}"
    jobs = {}
    for job_id in SUBMITTED.findall(log):
        info = cluster.job_info(job_id)
        assert info["JobState"] == "COMPLETED", info
        assert info["Partition"] == cluster.partition and info["NodeList"] == cluster.node, info
        jobs[job_id] = info["Comment"].removeprefix("rule_").split("_wildcards_")[0]
    return jobs


def test_minimal_workflow_runs_under_slurm(slurm: SlurmCluster, tmp_path: Path):
    cluster = slurm
    # each job records the SLURM environment it ran in; `gpu` asks for a GPU through the plugin's `gpu`
    # resource (-> sbatch --gpus=1), which only a node with a GPU GRES can satisfy
    gpu_rule = textwrap.dedent("""
        rule gpu:
            output: "out/gpu.txt"
            resources: gpu=1
            shell: 'echo "$SLURM_JOB_ID $SLURM_GPUS_ON_NODE" > {output}'
    """) if cluster.gpus else ""
    (tmp_path / "Snakefile").write_text(textwrap.dedent("""
        rule all:
            input: expand("out/{name}.txt", name=["a", "b", "c"] + (["gpu"] if GPU else []))
        rule leaf:
            output: "out/{name,[ab]}.txt"
            shell: 'echo "$SLURM_JOB_ID $SLURM_JOB_PARTITION" > {output}'
        rule join:
            input: "out/a.txt", "out/b.txt"
            output: "out/c.txt"
            shell: 'echo "$SLURM_JOB_ID $SLURM_JOB_PARTITION" > {output}; cat {input} >> {output}'
    """).replace("GPU", str(bool(cluster.gpus))) + gpu_rule)

    jobs = snakemake_slurm(cluster, tmp_path, "--jobs", "3", "--default-resources",
                           f"slurm_partition={cluster.partition}", "mem_mb=200", timeout=300)

    expected = {"a": "leaf", "b": "leaf", "c": "join"} | ({"gpu": "gpu"} if cluster.gpus else {})
    recorded = {}
    for name, rule in expected.items():
        job_id, *rest = (tmp_path / "out" / f"{name}.txt").read_text().split("\n")[0].split()
        recorded[job_id] = rule
        assert rest == (["1"] if rule == "gpu" else [cluster.partition]), (name, rest)
    # every output was written inside the SLURM job snakemake submitted for it, one job per output
    assert recorded == jobs
    assert all(int(j) > 0 for j in jobs)
    c_lines = (tmp_path / "out" / "c.txt").read_text().splitlines()
    assert c_lines[1:] == [(tmp_path / "out" / f"{n}.txt").read_text().strip() for n in ("a", "b")]
    if cluster.gpus:
        gpu_job = next(j for j, rule in jobs.items() if rule == "gpu")
        info = cluster.job_info(gpu_job)
        assert info["TresPerJob"] == "gres:gpu:1", info


def _smoke_ready() -> str | None:
    missing = [p for p in ("Snakefile", "config/smoke.yaml", "profiles/slurm/config.yaml") if not (REPO / p).exists()]
    return f"the smoke workflow is not there yet: missing {', '.join(missing)}" if missing else None


@pytest.mark.slow
def test_smoke_workflow_through_slurm_profile(slurm: SlurmCluster, mlflow_server, tmp_path: Path):
    """The project's smoke grid, submitted with profiles/slurm and tracked on a real MLflow server (HTTP): one
    SLURM job per Snakemake job, each COMPLETED; all outputs there; every job's MLflow run FINISHED with its
    metrics and artifacts; the completeness check says complete."""
    if reason := _smoke_ready():
        pytest.skip(reason)
    cluster = slurm
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    exp = tmp_path / "results" / cfg["experiment"]
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["resources_dir"] = str(REPO / cfg["resources_dir"])  # the embedded models, already materialised
    cfg["tracking"] = {"enabled": True, "uri": mlflow_server.uri}
    # `auto` makes score/evaluate ask for a GPU (gpu=1 -> sbatch --gpus=1), which the node's GRES grants; on a
    # machine without CUDA the jobs still compute on the CPU
    cfg["device"] = "auto" if cluster.gpus else "cpu"
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(cfg))
    heavy = ("score", "evaluate_dense", "evaluate_pruned", "evaluate_recovered", "recover")

    jobs = snakemake_slurm(
        cluster, tmp_path, "--snakefile", str(REPO / "Snakefile"), "--configfile", str(tmp_path / "smoke.yaml"),
        "--profile", str(REPO / "profiles/slurm"), "--jobs", "2",
        # what the profile sizes for a real GPU partition, scaled down to this node (CLI values replace the
        # profile's): its partition, its CPUs, its memory
        "--max-threads", str(cluster.cpus),
        "--default-resources", f"slurm_partition={cluster.partition}", "runtime=30", "mem_mb=2000",
        "--set-resources", *(f"{rule}:mem_mb=4000" for rule in heavy),
        timeout=1800)

    full = validate_config(cfg)
    scored = [(m["name"], c, s) for m in full["models"] for c in full["criteria"] for s in cell_seeds(full, m["name"], c)]
    n_models, n_crit, n_cells = len(cfg["models"]), len(scored), len(scored) * len(cfg["ratios"])
    expected = {"score": n_crit, "plan": n_cells, "evaluate_dense": n_models, "evaluate_pruned": n_cells, "report": 1}
    assert Counter(jobs.values()) == expected, jobs
    for job_id, rule in jobs.items():
        gpu_request = cluster.job_info(job_id).get("TresPerJob")
        assert gpu_request == ("gres:gpu:1" if cluster.gpus and rule in heavy else None), (rule, gpu_request)
    if cluster.gpus:
        # each GPU job's log names the device SLURM granted it: the jobstep plugin strips SLURM_* and the node's
        # placeholder GRES sets no CUDA_VISIBLE_DEVICES, so hfprune.gpu asked scontrol for the job's IDX
        granted = re.compile(r"hfprune\.gpu: running on GPU (\d+) \(of \1, from SLURM grant, "
                             r"scontrol -d show job (\d+) \(IDX\)\)")
        seen = {}
        for log in (exp / "logs").rglob("*.log"):
            stage = log.relative_to(exp / "logs").parts[0]
            if stage in ("score", "evaluate"):
                device, job_id = granted.search(log.read_text()).groups()
                assert jobs[job_id].startswith(stage) and int(device) < cluster.gpus, (log, jobs.get(job_id))
                seen[job_id] = device
        assert len(seen) == n_crit + n_models + n_cells, seen

    assert (exp / "report" / "report.md").is_file()
    metrics = sorted((exp / "metrics").rglob("*.json"))
    assert len(metrics) == n_models + n_cells
    for path in metrics:
        cell = json.loads(path.read_text())["cell"]
        assert cell["model"] in {m["name"] for m in cfg["models"]}, path
    for model, criterion, seed in scored:
        assert (exp / "scores" / model / criterion / f"s{seed}.safetensors").is_file()
    # Snakemake's own marker in a directory output is expected; anything else hidden is an atomic_path leftover
    assert not [p for p in exp.rglob(".*") if p.name != ".snakemake_timestamp"], "atomic_path temp dirs left behind"

    runs = check_grid_runs(mlflow_server.uri, full)
    stages = Counter(r.data.tags.get("hfprune.stage") for r in runs.values())
    assert stages == {"score": n_crit, "evaluate": n_models + n_cells}, stages
    assert f"MLflow store {mlflow_server.uri}: complete ({len(runs)} finished job(s)" in (
        exp / "report" / "report.md").read_text()


@pytest.mark.slow
def test_recover_job_over_its_time_limit_is_retried_and_resumes(slurm: SlurmCluster, tmp_path: Path):
    """A recover job that outlives its SLURM time limit: SLURM stops it (TIMEOUT; its SIGTERM reaches hfprune
    through the job step), Snakemake resubmits it, it resumes from its checkpoint and finishes in the same MLflow
    run. Once the job has checkpointed, the test freezes the trainer (SIGSTOP) and cuts the limit to 1 minute
    (scontrol, as root): SLURM's kill then lands mid-training however fast this machine trains (a CI machine once
    finished all steps inside the minute). The trainer is thawed (SIGCONT) once SLURM's SIGTERM is pending in it
    (SLURM does not thaw it before its SIGKILL), so the signal is handled as in a running job; the retry keeps the
    rule's 10 minutes."""
    from mlflow import MlflowClient
    from test_recovery import KEEPS, make_cfg, random_plan
    from test_recovery_resume import tiny_local_model

    cluster = slurm
    steps = 120
    cfg = make_cfg(str(tiny_local_model(tmp_path / "model")), seq_len=32, num_samples=8, batch_size=2,
                   max_steps=steps, checkpoint_every=1, log_every=10,
                   lora={"target_modules": ["q_proj", "down_proj"]})
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(json.dumps(random_plan(96, KEEPS)))
    # every attempt appends to attempts.log (Snakemake empties a rule's `log:` when it reruns a job)
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        rule recover:
            output: directory("results/default/recovered/m")
            retries: 2
            resources: runtime=10, mem_mb=3000
            shell: "{sys.executable} -m hfprune.cli recover --config cfg.yaml --model m --plan plan.json "
                   "--out {{output}} >> attempts.log 2>&1"
    """))
    attempts = tmp_path / "attempts.log"
    env = {**cluster.env, "PATH": f"{VENV_BIN}{os.pathsep}{cluster.env['PATH']}", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([str(VENV_BIN / "snakemake"), "--directory", str(tmp_path), *SLURM_ARGS, "--jobs", "1",
                             "--default-resources", f"slurm_partition={cluster.partition}"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (attempts.exists() and "checkpoint at step 2/" in attempts.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, attempts.read_text()[-3000:]
        time.sleep(0.1)
    trainer = recover_process(tmp_path)
    os.kill(trainer, signal.SIGSTOP)
    first = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    try:
        assert len(first) == 1, first
        cluster.run("scontrol", "update", f"JobId={first[0]}", "TimeLimit=1")
        deadline = time.monotonic() + 300
        while not sigterm_pending(trainer):  # SLURM's SIGTERM waits in the stopped process until SIGCONT
            assert time.monotonic() < deadline, cluster.job_info(first[0])
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(trainer, signal.SIGCONT)
    out, _ = proc.communicate(timeout=900)
    log = attempts.read_text()
    assert proc.returncode == 0, f"{out[-4000:]}\n{log[-3000:]}\n{cluster.logs()}"
    states = [cluster.job_info(j)["JobState"] for j in SUBMITTED.findall(out)]
    assert states == ["TIMEOUT", "COMPLETED"], states
    assert "SIGTERM received" in log, log[-3000:]
    resumed = re.search(r"resuming from step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 2, log[-3000:]
    recovered = tmp_path / "results" / "default" / "recovered" / "m"
    info = json.loads((recovered / "recovery.json").read_text())
    assert len(info["loss_curve"]) == steps and info["resumed_from_step"] == int(resumed.group(1))
    assert not (tmp_path / "results" / "default" / "checkpoints").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("hfprune.stage") == "recover"] == ["FINISHED"]
