"""A throw-away one-node SLURM cluster (munged + slurmctld + slurmd) for integration tests.

Everything lives in one temp dir: its own munge key and socket (so it never talks to a system munged), and
slurm.conf with its own ports, state, spool, logs and pid files. Clients find it through SLURM_CONF and
client shims first on PATH, both in `SlurmCluster.env` (docs/SLURM.md says why both). On exit it cancels its jobs and stops only the daemons it started (by PID).
Usage::

    with slurm_cluster() as cluster:           # raises SlurmUnavailable with the reason if it cannot start
        subprocess.run(["sbatch", ...], env=cluster.env)

`slurm_fixture` below is the pytest fixture `slurm`: it skips with that reason instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", *CLIENTS)
SETUP_HINT = "run scripts/ci_setup_slurm.sh (as root) to install slurm-wlm and munge"


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be brought up here; the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    node: str
    partition: str
    cpus: int
    memory_mb: int
    gpus: int  # count-only GPU GRES on the node (0 if slurmd rejected it)
    bringup_seconds: float = 0.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a flat dict (JobState, NodeList, TRES, ...); kept in memory after the job
        ends for MinJobAge seconds."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def logs(self) -> str:
        """Daemon logs, for failure messages."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            log = self.root / "log" / f"{name}.log"
            if log.exists():
                parts.append(f"--- {name}.log (tail) ---\n" + "\n".join(log.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


def _slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, gpus: int) -> str:
    d = {k: root / k for k in ("state", "spool", "log", "run", "munge")}
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return "\n".join([
        "ClusterName=hfprune-test",
        # loopback only: the node name is the real hostname (slurmd must recognise itself), the address is not
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d['munge']}/munge.sock",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={d['state']}",
        f"SlurmdSpoolDir={d['spool']}",
        f"SlurmctldPidFile={d['run']}/slurmctld.pid",
        f"SlurmdPidFile={d['run']}/slurmd.pid",
        f"SlurmctldLogFile={d['log']}/slurmctld.log",
        f"SlurmdLogFile={d['log']}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # jobs without --mem would otherwise claim the whole node and run one at a time
        f"DefMemPerCPU={memory_mb // cpus}",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1",
        "MinJobAge=3600",  # keep finished jobs visible to scontrol/squeue for the test's checks (a slow grid: 30 min)
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        *(["GresTypes=gpu"] if gpus else []),
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}{gres} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _start(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    with open(cluster.root / "log" / f"{name}.out", "w") as out:
        # own session: a Ctrl-C in the test terminal must not reach the daemons before teardown does
        cluster.procs[name] = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)


def _wait(what: str, cluster: SlurmCluster, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                out = (cluster.root / "log" / f"{name}.out").read_text()[-2000:]
                raise SlurmUnavailable(f"{name} exited with code {proc.returncode} while waiting for {what}:\n"
                                       f"{out}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def _node_state(cluster: SlurmCluster) -> str:
    try:
        res = cluster.run("sinfo", "-h", "-N", "-n", cluster.node, "-o", "%T", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _bring_up(cluster: SlurmCluster, timeout: float) -> None:
    root, conf = cluster.root, cluster.env["SLURM_CONF"]
    munge = root / "munge"
    subprocess.run(["mungekey", "-c", "-k", str(munge / "munge.key")], check=True, capture_output=True)
    _start(cluster, "munged", ["munged", "-F", f"--socket={munge}/munge.sock", f"--key-file={munge}/munge.key",
                               f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                               f"--log-file={root}/log/munged.log"])
    _wait("the munge socket", cluster, (munge / "munge.sock").exists, 15)
    # -i: ignore stale state; there is none in a fresh temp dir, but a crashed earlier run must not block
    _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
    _start(cluster, "slurmd", ["slurmd", "-D", "-f", conf])

    def idle() -> bool:
        state = _node_state(cluster)
        if state.startswith(("inval", "drain")):  # e.g. a GRES slurmd could not find: waiting will not help
            reason = cluster.run("sinfo", "-h", "-N", "-o", "%E", check=False).stdout.strip()
            raise SlurmUnavailable(f"node {cluster.node} is {state}: {reason}")
        return state == "idle"

    _wait(f"node {cluster.node} to be idle", cluster, idle, timeout)


def _tear_down(cluster: SlurmCluster) -> None:
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        # every job on this private cluster is ours; stop them so no slurmstepd outlives the test
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--partition", cluster.partition, "-u", str(os.getuid()),
                        check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    shutil.rmtree(cluster.root, ignore_errors=True)


def _launch(node: str, cpus: int, memory_mb: int, gpus: int, timeout: float) -> SlurmCluster:
    """Start the daemons in a fresh temp dir; on failure stop what started and raise SlurmUnavailable."""
    root = Path(tempfile.mkdtemp(prefix="hfprune-slurm-"))
    root.chmod(0o755)  # munged refuses a socket whose directory chain is not world-executable
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    # Snakemake's jobstep plugin strips SLURM_* (SLURM_CONF too) from the environment of the `srun` it runs
    # inside each job; a real cluster's clients then read /etc/slurm/slurm.conf. Rather than write there,
    # put shims first on PATH that point the client tools at this cluster's config.
    (root / "bin").mkdir()
    for tool in CLIENTS:
        shim = root / "bin" / tool
        shim.write_text(f'#!/bin/sh\nSLURM_CONF={root}/slurm.conf exec {shutil.which(tool)} "$@"\n')
        shim.chmod(0o755)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    cluster = SlurmCluster(root, env, node, "debug", cpus, memory_mb, gpus)
    (root / "slurm.conf").write_text(_slurm_conf(root, node, cpus, memory_mb, gpus))
    if gpus:
        # slurmd drops a gpu GRES without File= ("Removing file-less GPU", also with Flags=CountOnly), so point
        # it at placeholder files: it logs "not a valid character or block device" but counts them, and with
        # task/none nothing is bound. No NVML autodetection.
        (root / "dev").mkdir()
        for i in range(gpus):
            (root / "dev" / f"nvidia{i}").touch()
        (root / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={node} Name=gpu File={root}/dev/nvidia[0-{gpus - 1}]\n")
    start = time.monotonic()
    try:
        _bring_up(cluster, timeout)
    except BaseException as exc:
        _tear_down(cluster)
        if isinstance(exc, (subprocess.CalledProcessError, OSError)):
            raise SlurmUnavailable(f"{exc}") from exc
        raise
    cluster.bringup_seconds = time.monotonic() - start
    return cluster


@contextlib.contextmanager
def slurm_cluster(gpus: int = 2, timeout: float = 60) -> Iterator[SlurmCluster]:
    """Bring up a one-node cluster (partition `debug`, all CPUs, 90% of RAM, `gpus` count-only GPU GRES) and
    tear it down on exit; raise SlurmUnavailable if that is impossible here. If slurmd rejects the GRES, it
    retries without (cluster.gpus is then 0)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise SlurmUnavailable(f"SLURM/munge binaries not found: {', '.join(missing)}; {SETUP_HINT}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd must run as root to launch jobs; run the SLURM tests as root")
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))  # what slurmd detects (= nproc); more and the node is INVAL
    memory_mb = _memory_mb() * 9 // 10  # below physical memory, or slurmd drains the node as "Low RealMemory"
    try:
        cluster = _launch(node, cpus, memory_mb, gpus, timeout)
    except SlurmUnavailable as exc:
        if not gpus or "gres" not in str(exc).lower():
            raise
        cluster = _launch(node, cpus, memory_mb, 0, timeout)
    try:
        yield cluster
    finally:
        _tear_down(cluster)


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture() -> Iterator[SlurmCluster]:
    """Fixture `slurm`: a session-wide cluster; skips (with the reason) where SLURM cannot run. Import
    `slurm_fixture` into a test module to use it."""
    try:
        cm = slurm_cluster()
        cluster = cm.__enter__()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM cluster: {exc}")
    try:
        yield cluster
    finally:
        cm.__exit__(None, None, None)
