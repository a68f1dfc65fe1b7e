"""Recovery checkpoints: what a killed recover job needs to resume, written outside its directory() output.

A recover job's checkpoints live in `<results_dir>/<experiment>/checkpoints/<its output path under the
experiment folder>/step-<N>/` (Snakemake deletes a failed job's directory() output, not this folder). Each is
written whole into a temporary sibling and renamed (hfprune.runtime.atomic_path), then older ones are deleted,
so a job killed at any moment leaves the last complete one. It holds:
- state.pt: the trainable (LoRA) weights, optimizer, scheduler, loss/lr history, the data position (optimizer
  steps done: the micro-batch stream is seeded, so the rows done are the first steps x rows_per_step of it) and
  the RNG states of every process;
- meta.json: step, settings digest, plan sha256, process count, MLflow run id.
A checkpoint of another plan or other settings (`settings_digest`: what the job computes, not how it runs) is
refused in one line. The folder is removed once the recovered output is final.

Signals: SIGTERM (SLURM's time limit, scancel, torchrun forwarding) and SIGUSR1 (a scheduler's warning, e.g.
sbatch --signal=USR1@120) are caught; the training loop checkpoints after the step under way and stops non-zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from hfprune.errors import ConfigError, HFPruneError
from hfprune.runtime import atomic_path, write_json

log = logging.getLogger(__name__)

# how a recover job runs, not what it computes: out of the settings digest (a checkpoint stays valid)
OPERATIONAL = ("enabled", "strategy", "checkpoint_every", "gradient_checkpointing", "log_every")
COMPUTE = ("seed", "dtype", "device_map")  # the config's compute keys a recovery's result depends on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STEP_PREFIX = "step-"


class Stopped(HFPruneError):
    """A stop signal arrived; the checkpoint is written and the job exits non-zero (a rerun resumes)."""


def settings_digest(cfg: dict, model_entry: dict) -> str:
    """sha256 (16 hex) of what a recovery computes: its recovery settings less OPERATIONAL, the compute keys and
    the model entry. The plan is checked apart (its own sha256), so that error can name it."""
    used = {"recovery": {k: v for k, v in cfg["recovery"].items() if k not in OPERATIONAL},
            **{k: cfg.get(k) for k in COMPUTE}, "model": model_entry}
    return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_root(cfg: dict, out_dir: str | os.PathLike) -> Path:
    """The job's checkpoint folder: keyed by its output path under the experiment folder (else its absolute
    path's hash, for an --out elsewhere)."""
    exp = (Path(cfg["results_dir"]) / cfg["experiment"]).resolve()
    out = Path(out_dir).resolve()
    try:
        key = out.relative_to(exp)
    except ValueError:
        key = Path("other") / hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return exp / "checkpoints" / key


def _steps(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    steps = _steps(root)
    return steps[-1] if steps else None


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def check_meta(meta: dict, path: Path, digest: str, plan_sha256: str, plan_path) -> None:
    """Refuse a checkpoint of another plan or other settings, in one line naming the folder to remove."""
    if meta["plan_sha256"] != plan_sha256:
        raise ConfigError(f"checkpoint {path} was written for another plan (sha256 {meta['plan_sha256'][:12]}, not "
                          f"{plan_sha256[:12]} of {plan_path}); remove {path.parent} to start over")
    if meta["digest"] != digest:
        raise ConfigError(f"checkpoint {path} was written with other recovery settings (digest {meta['digest']}, "
                          f"now {digest}); restore them, or remove {path.parent} to start over")


def save(root: Path, step: int, state: dict, meta: dict) -> Path:
    """Write step-<step>/ atomically, then delete the older checkpoints."""
    import torch

    path = root / f"{STEP_PREFIX}{step}"
    with atomic_path(path) as tmp:
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        write_json(tmp / "meta.json", {**meta, "step": step})
    for old in _steps(root)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_state(path: Path) -> dict:
    import torch

    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def remove(root: Path) -> None:
    """Drop the job's checkpoints (its output is final) and the folders above it left empty, up to and
    including `checkpoints/`."""
    shutil.rmtree(root, ignore_errors=True)
    for parent in root.parents:
        if not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()
        if parent.name == "checkpoints":
            break


class StopFlag:
    """Which stop signal arrived (None: none yet)."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        if self.signal is None:
            log.warning("recovery: %s received; checkpointing after this step", signal.Signals(signum).name)
        self.signal = signum


@contextlib.contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """Catch STOP_SIGNALS for the block (then restore the previous handlers)."""
    flag = StopFlag()
    previous = {s: signal.signal(s, flag) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
