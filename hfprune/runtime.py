"""Small shared pieces every stage needs: devices, seeding, package versions, atomic output writes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from hfprune.errors import HFPruneError

if TYPE_CHECKING:  # imported where used: the plan job and config checks run without torch
    import torch

VERSIONED_PACKAGES = ("hfprune", "torch", "transformers", "accelerate", "lm_eval", "datasets", "peft",
                      "safetensors", "snakemake", "mlflow", "pandas", "numpy")


@cache
def git_commit() -> str:
    """Commit of the checkout hfprune runs from, or "no git" (an installed copy, no git binary); git's own
    complaints ("fatal: not a git repository") never reach the terminal."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "no git"
    return proc.stdout.strip() if proc.returncode == 0 else "no git"


@contextlib.contextmanager
def quiet_lm_eval_git():
    """lm-eval records `git describe` of the working directory and lets git print "fatal: not a git repository"
    outside a checkout; within the block it records `git_commit()` instead."""
    from lm_eval import evaluator

    saved, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, git_commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "hfprune_git": git_commit()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch's deps here
        pass


def deterministic_algorithms() -> None:
    """torch's deterministic algorithms (scoring.deterministic), with the cuBLAS workspace setting they need; call it
    before CUDA starts (cuBLAS reads the variable when it creates its handle). An op without a deterministic
    kernel warns instead of stopping the job."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda")


def io_reason(exc: BaseException) -> str:
    """One line saying why a file could not be read, parsed or written (the messages of json, yaml, codecs and
    safetensors span several lines or name no file; the caller names it)."""
    import yaml

    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"not valid YAML ({exc.problem or exc.context}{where})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if type(exc).__name__ == "SafetensorError":
        text = " ".join(str(exc).split())
        os_error = re.search(r"I/O error: (.*?) \(os error \d+\)", text)  # a failed write: the OS's reason
        return os_error.group(1) if os_error else f"not a readable safetensors file ({text})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file", error: type[HFPruneError] = HFPruneError):
    """Within the block, a failure to read or parse `path` (missing, unreadable, not UTF-8, bad JSON/YAML,
    a truncated safetensors file) becomes one `error` line that names it: "<what> '<path>': <reason>"."""
    import yaml

    try:
        yield Path(path)
    except (OSError, ValueError, yaml.YAMLError, _safetensor_error()) as exc:
        raise error(f"{what} {str(path)!r}: {io_reason(exc)}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; move it onto `path` only if the block succeeds.

    Works for files and folders, so a killed or failing job never leaves an output that looks complete. A write
    that fails in the block (no space left, permission denied, file too large) is reported as one line naming
    `path`; errors about other files pass through unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:  # e.g. a parent that is a file, a read-only mount, no space left
        raise HFPruneError(f"cannot write {str(path)!r}: {exc.strerror} ({exc.filename})") from None
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(str(tmp_dir)):
            raise
        raise HFPruneError(f"cannot write {str(path)!r}: {io_reason(exc)}") from None
    except _safetensor_error() as exc:  # safetensors reports a failed write as its own error, without the path
        raise HFPruneError(f"cannot write {str(path)!r}: {io_reason(exc)}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    with reading(path, what) as p:
        return json.loads(p.read_text(encoding="utf-8"))


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file", framework: str = "pt") -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file; a truncated or corrupt file is one line naming it.
    `framework` "numpy" reads numpy arrays without importing torch."""
    from safetensors import safe_open

    with reading(path, what) as p, safe_open(str(p), framework) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a mapping)
