"""N GPUs per concurrent job, through lock-file slots, on one machine and under SLURM.

Snakemake's ``--resources gpu=N`` only limits how many GPUs are in use at once; it does not tell a local job
which devices to use, so every job would pick GPU 0. Each GPU job therefore runs under

    HFPRUNE_JOB_GPUS=N python -m hfprune.gpu -- <command ...>      (or: python -m hfprune.gpu --gpus N -- ...)

which takes N free device slots (an exclusive ``flock`` on ``<lock_dir>/gpu<device>.lock`` each, all or none, so
two jobs waiting for pairs never deadlock), sets ``CUDA_VISIBLE_DEVICES`` to those devices and ``exec``s the
command. The locked descriptors are inherited across ``exec``, so the slots are held exactly as long as the
command's process lives and the kernel frees them when the process ends, however it ends (a killed job never
leaves a stale slot). N = 0 (a CPU job) runs the command unchanged.

Devices, first that applies: the entries of ``CUDA_VISIBLE_DEVICES`` (set by a SLURM cluster that binds GPUs);
``range(HFPRUNE_NUM_GPUS)`` (tests simulate a device count with it); inside a SLURM job, the GPUs the scheduler
granted: ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS`` / ``GPU_DEVICE_ORDINAL``, which Snakemake's jobstep plugin strips
(it keeps only ``SLURM_JOB_ID`` for the ``srun`` it runs), else the ``IDX`` of ``scontrol -d show job`` (the
grant itself; such a job sees every device of the node, so the node's indices are the ones to use); where none
of these tells, the job refuses to guess (one line). Outside SLURM: NVML's device count (nvidia-ml-py), else
torch's. The default lock folder is per user and per SLURM job (``local`` outside SLURM), since device numbers are
only meaningful within one machine and one allocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hfprune.errors import HFPruneError

ENV_NUM_GPUS = "HFPRUNE_NUM_GPUS"
ENV_LOCK_DIR = "HFPRUNE_GPU_LOCK_DIR"
ENV_JOB_GPUS = "HFPRUNE_JOB_GPUS"  # the rule's `gpu` resource (workflow/rules/common.smk GPU_JOB)
SLURM_GPU_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL")
POLL_SECONDS = 0.5

log = logging.getLogger(__name__)


def _ids(listed: str) -> list[str]:
    return [d.strip() for d in listed.split(",") if d.strip()]


def _expand_idx(spec: str) -> list[str]:
    """SLURM's index list "0-1,3" -> ["0", "1", "3"]."""
    out = []
    for part in _ids(spec):
        lo, _, hi = part.partition("-")
        out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_granted(job_id: str) -> tuple[list[str], str]:
    """(device ids, where they came from) of the GPUs SLURM granted this job; ([], why) where nothing tells."""
    for var in SLURM_GPU_VARS:
        if os.environ.get(var):
            return _ids(os.environ[var]), var
    try:
        out = subprocess.run(["scontrol", "-d", "show", "job", job_id], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"scontrol failed ({exc})"
    idx = re.findall(r"GRES=\S*?gpu[^(\s]*\(IDX:([0-9,-]+)\)", out)
    if not idx:
        return [], f"neither {', '.join(SLURM_GPU_VARS)} nor `scontrol -d show job {job_id}` names its GPUs"
    return [d for spec in idx for d in _expand_idx(spec)], f"scontrol -d show job {job_id} (IDX)"


def _device_count() -> int:
    """Devices of this machine, without creating a CUDA context (NVML), else torch's count."""
    try:
        import pynvml
    except ImportError:
        import torch

        return torch.cuda.device_count()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: no GPU
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def visible_devices() -> tuple[list[str], str]:
    """(device ids this process may use, as CUDA_VISIBLE_DEVICES names them; where they came from)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return _ids(listed), "CUDA_VISIBLE_DEVICES"
    override = os.environ.get(ENV_NUM_GPUS)
    if override is not None:
        return [str(i) for i in range(int(override))], ENV_NUM_GPUS
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        devices, where = slurm_granted(job_id)
        if not devices:
            raise HFPruneError(f"SLURM job {job_id}: cannot tell which GPUs it was granted ({where}); refusing to "
                               "guess. Bind GPUs on the cluster (CUDA_VISIBLE_DEVICES) or set it for the job")
        return devices, f"SLURM grant, {where}"
    return [str(i) for i in range(_device_count())], "this machine's devices"


def default_lock_dir() -> Path:
    if os.environ.get(ENV_LOCK_DIR):
        return Path(os.environ[ENV_LOCK_DIR])
    scope = os.environ.get("SLURM_JOB_ID", "local")
    return Path(tempfile.gettempdir()) / f"hfprune-gpu-slots-{os.getuid()}-{scope}"


def _try_lock(lock_dir: Path, device: str) -> int | None:
    fd = os.open(lock_dir / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a human looking at the folder
    return fd


def acquire(devices: list[str], lock_dir: str | os.PathLike, timeout: float | None = None,
            count: int = 1) -> tuple[list[str], list[int]]:
    """Block until `count` of `devices` are free at once; return (those devices, fds of their locked slot files).

    All or none: a partial set is released before waiting, so jobs that each need several never hold some while
    waiting for the rest."""
    if count > len(devices):
        raise HFPruneError(f"a job needs {count} GPUs (resources.gpus_per_job) but only {len(devices)} are "
                           f"available to it ({', '.join(devices) or 'none'})")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start, waited = time.monotonic(), False
    while True:
        held: list[tuple[str, int]] = []
        for device in devices:
            fd = _try_lock(lock_dir, device)
            if fd is not None:
                held.append((device, fd))
                if len(held) == count:
                    return [d for d, _ in held], [f for _, f in held]
        for _, fd in held:
            os.close(fd)
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no {count} free GPU slots among {devices} in {lock_dir} after {timeout:.0f} s")
        if not waited:
            log.info("fewer than %d of the %d GPU slots in %s are free; waiting", count, len(devices), lock_dir)
            waited = True
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def gpu_slot(devices: list[str] | None = None, lock_dir: str | os.PathLike | None = None,
             timeout: float | None = None, count: int = 1) -> Iterator[list[str]]:
    """Hold `count` free GPUs and point CUDA_VISIBLE_DEVICES at them for the block; yields the devices ([]: no
    GPU). Enter it before anything initialises CUDA in this process: CUDA reads CUDA_VISIBLE_DEVICES once."""
    devices = visible_devices()[0] if devices is None else devices
    if not devices:
        yield []
        return
    held, fds = acquire(devices, lock_dir or default_lock_dir(), timeout, count)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)
    try:
        yield held
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        for fd in fds:
            os.close(fd)


def exec_with_slot(command: list[str], count: int = 1) -> None:
    """Take `count` slots and replace this process with `command`, which inherits the held locks."""
    if count > 0:
        devices, where = visible_devices()
        if devices:
            held, fds = acquire(devices, default_lock_dir(), count=count)
            for fd in fds:
                os.set_inheritable(fd, True)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA numbers as NVML, nvidia-smi and SLURM
            print(f"hfprune.gpu: running on GPU {','.join(held)} (of {','.join(devices)}, from {where})",
                  file=sys.stderr, flush=True)
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    count = os.environ.get(ENV_JOB_GPUS, "1")
    if args[:1] == ["--gpus"] and len(args) > 1:
        count, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or not count.isdigit():
        print("usage: [HFPRUNE_JOB_GPUS=N] python -m hfprune.gpu [--gpus N] [--] COMMAND [ARGS...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        exec_with_slot(args, int(count))
    except HFPruneError as exc:
        print(f"hfprune.gpu: error: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
