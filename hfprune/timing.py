"""Where a job's seconds go: wall time since its process started (interpreter start-up and imports included),
split into start-up, named set-up phases and the timed compute stages.

`hfprune.cli` marks the start-up (process start until the command runs); a job wraps its set-up work (MLflow,
task building, checks) in `phase(name)` and passes its compute stages to `job_timing`, which it writes into its
output (metrics JSON `meta.timing`, score sidecar `timing`); `benchmarks/bench_grid.py` compares them with
Snakemake's benchmark files. Stdlib only: this module is imported before anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

_phases: dict[str, float] = {}
_startup: float | None = None
_IMPORTED = time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def mark_startup() -> None:
    """Called once the command is about to run: interpreter start, hfprune's and the command's imports."""
    global _startup
    _startup = process_age()


def add(name: str, seconds: float) -> None:
    """Count `seconds` of set-up work under `name` (accumulated per name)."""
    _phases[name] = _phases.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a block of set-up work."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def job_timing(stages: dict[str, float]) -> dict:
    """{wall, startup, <phase>..., stages: {...}, other}: seconds since process start, and what they were spent
    on; `other` is the rest (heavy imports inside the stages' modules, writing outputs, gaps)."""
    wall = process_age()
    startup = _startup or 0.0
    other = wall - startup - sum(_phases.values()) - sum(stages.values())
    return {"wall": round(wall, 3), "startup": round(startup, 3), **{k: round(v, 3) for k, v in _phases.items()},
            "stages": {k: round(v, 3) for k, v in stages.items()}, "other": round(other, 3)}


def line(timing: dict, wall: float | None = None) -> str:
    """One line for the job's log; `wall` (e.g. at the end of the command) replaces the recorded wall time."""
    wall = timing["wall"] if wall is None else wall
    parts = [f"{k} {v:.1f}" for k, v in timing.items() if k not in ("wall", "stages", "other")]
    stages = timing["stages"]
    rest = wall - sum(v for k, v in timing.items() if k not in ("wall", "stages", "other")) - sum(stages.values())
    return (f"timing: wall {wall:.1f} s = " + " + ".join(parts)
            + f" + stages {sum(stages.values()):.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            + f") + other {rest:.1f}")
