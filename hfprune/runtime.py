"""Small shared pieces every stage needs: devices, seeding, package versions, atomic output writes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import random
import shutil
import tempfile
from pathlib import Path

import torch

from hfprune.errors import HFPruneError

VERSIONED_PACKAGES = ("hfprune", "torch", "transformers", "accelerate", "lm_eval", "datasets", "peft",
                      "safetensors", "snakemake", "mlflow", "pandas", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch's deps here
        pass


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; move it onto `path` only if the block succeeds.

    Works for files and folders, so a killed or failing job never leaves an output that looks complete.
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
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())
