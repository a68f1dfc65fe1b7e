"""The conda environment files mirror pyproject.toml's pins exactly, and ship what the workflow needs."""

from __future__ import annotations

import re
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
