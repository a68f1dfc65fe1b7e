"""One GPU per concurrent job on a single machine, through lock-file slots.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it does not tell a local job
which device to use, so every job would pick GPU 0. Each GPU job therefore runs under

    python -m hfprune.gpu -- <command ...>

which takes a free device slot (an exclusive ``flock`` on ``<lock_dir>/gpu<device>.lock``), sets
``CUDA_VISIBLE_DEVICES`` to that device and ``exec``s the command. The locked descriptor is inherited across
``exec``, so the slot is held exactly as long as the command's process lives and the kernel frees it when
the process ends, however it ends (a killed job never leaves a stale slot). With no GPU it is a no-op.

Devices: the entries of ``CUDA_VISIBLE_DEVICES`` if set (e.g. a SLURM allocation), else
``range(HFPRUNE_NUM_GPUS)`` if set (tests simulate a device count with it), else
``range(torch.cuda.device_count())``. The default lock folder is per user and per SLURM job (``local``
outside SLURM), since device numbers are only meaningful within one machine and one allocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ENV_NUM_GPUS = "HFPRUNE_NUM_GPUS"
ENV_LOCK_DIR = "HFPRUNE_GPU_LOCK_DIR"
POLL_SECONDS = 0.5

log = logging.getLogger(__name__)


def visible_devices() -> list[str]:
    """Device ids this process may use, as CUDA_VISIBLE_DEVICES would name them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    override = os.environ.get(ENV_NUM_GPUS)
    if override is not None:
        return [str(i) for i in range(int(override))]
    import torch  # only here: the override and CUDA_VISIBLE_DEVICES paths stay cheap

    return [str(i) for i in range(torch.cuda.device_count())]


def default_lock_dir() -> Path:
    if os.environ.get(ENV_LOCK_DIR):
        return Path(os.environ[ENV_LOCK_DIR])
    scope = os.environ.get("SLURM_JOB_ID", "local")
    return Path(tempfile.gettempdir()) / f"hfprune-gpu-slots-{os.getuid()}-{scope}"


def acquire(devices: list[str], lock_dir: str | os.PathLike, timeout: float | None = None) -> tuple[str, int]:
    """Block until one of `devices` is free; return (device, fd of its locked slot file)."""
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start, waited = time.monotonic(), False
    while True:
        for device in devices:
            fd = os.open(lock_dir / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a human looking at the folder
            return device, fd
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no free GPU slot among {devices} in {lock_dir} after {timeout:.0f} s")
        if not waited:
            log.info("all %d GPU slots in %s are taken; waiting for one", len(devices), lock_dir)
            waited = True
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def gpu_slot(devices: list[str] | None = None, lock_dir: str | os.PathLike | None = None,
             timeout: float | None = None) -> Iterator[str | None]:
    """Hold a free GPU and point CUDA_VISIBLE_DEVICES at it for the block; yields the device (None: no GPU).

    Enter it before anything initialises CUDA in this process: CUDA reads CUDA_VISIBLE_DEVICES once.
    """
    devices = visible_devices() if devices is None else devices
    if not devices:
        yield None
        return
    device, fd = acquire(devices, lock_dir or default_lock_dir(), timeout)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        yield device
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        os.close(fd)


def exec_with_slot(command: list[str]) -> None:
    """Take a slot and replace this process with `command`, which inherits the held lock."""
    devices = visible_devices()
    if devices:
        device, fd = acquire(devices, default_lock_dir())
        os.set_inheritable(fd, True)
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        print(f"hfprune.gpu: running on GPU {device} (slot lock fd {fd})", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m hfprune.gpu [--] COMMAND [ARGS...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exec_with_slot(args)
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
