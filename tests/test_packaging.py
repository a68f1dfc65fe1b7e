"""The conda environment files mirror pyproject.toml's pins exactly, and ship what the workflow needs."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)$")


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, version = PIN.match(dep).groups()
        pins[name.lower()] = version
    return pins


@pytest.mark.parametrize("env", ["cpu", "cuda"])
def test_env_file_pins_match_pyproject(env):
    spec = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())
    assert spec["name"] == f"hfprune-{env}"
    pip_sections = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict)]
    assert len(pip_sections) == 1
    pins, options = {}, []
    for line in pip_sections[0]:
        match = PIN.match(line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
        else:
            options.append(line)
    assert pins == _pyproject_pins()
    # the lock file and the package itself, by paths relative to envs/ (conda runs pip from there)
    assert "-c ../requirements/lock.txt" in options and (ROOT / "envs" / "../requirements/lock.txt").is_file()
    assert "-e .." in options and (ROOT / "envs" / ".." / "pyproject.toml").is_file()
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    major, minor = map(int, python.split("=")[1].split(".")[:2])
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert (major, minor) >= tuple(map(int, required.removeprefix(">=").split(".")))
    # CPU: torch's CPU wheel index; CUDA: PyPI's default (CUDA) torch
    has_cpu_index = any("download.pytorch.org/whl/cpu" in o for o in options)
    assert has_cpu_index == (env == "cpu")


def test_lock_file_agrees_with_pyproject_pins():
    lock = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            lock[match.group(1).lower().replace("_", "-")] = match.group(2)
    for name, version in _pyproject_pins().items():
        assert lock.get(name.replace("_", "-")) == version, name


def test_reference_tables_ship_as_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["hfprune"]
    assert "reference/*.csv" in patterns
    assert sorted(p.name for p in (ROOT / "hfprune" / "reference").glob("*.csv"))


def _torch_source(tmp_path, mode: str | None, driver: bool) -> subprocess.CompletedProcess:
    """install.sh's choice of torch (--print-torch-source installs nothing), with or without an nvidia-smi on PATH."""
    import os

    bin_dir = tmp_path / ("gpu" if driver else "cpu")
    bin_dir.mkdir(exist_ok=True)
    if driver:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = ":".join([str(bin_dir)] + [p for p in os.environ["PATH"].split(":")
                                     if not (Path(p) / "nvidia-smi").exists()])
    env = {**os.environ, "PATH": path, **({"HFPRUNE_TORCH": mode} if mode is not None else {})}
    return subprocess.run(["bash", str(ROOT / "scripts/install.sh"), "--print-torch-source"], env=env,
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("mode, driver, expected", [
    (None, False, "(cpu)"),  # auto on a login node without a driver: the CPU build
    ("auto", True, "(pypi): PyPI"),
    ("cpu", True, "(cpu)"),
    ("cu126", False, "(cu126): --index-url https://download.pytorch.org/whl/cu126"),
])
def test_install_picks_the_torch_build(tmp_path, mode, driver, expected):
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in pin if d.startswith("torch=="))
    proc = _torch_source(tmp_path, mode, driver)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{torch_pin} {expected}"), proc.stdout + proc.stderr


def test_install_rejects_an_unknown_torch_build_in_one_line(tmp_path):
    proc = _torch_source(tmp_path, "cuda12", False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "HFPRUNE_TORCH=cuda12 is not one of" in proc.stderr
