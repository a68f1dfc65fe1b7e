#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, client tools) and munge from Debian's packages for the SLURM integration
# test (tests/test_slurm.py). Idempotent: does nothing when the binaries are already there. Never fails the
# CI run: without apt (or root) it says why and exits 0, and the test then skips with that reason.
set -uo pipefail

needed=(munged mungekey slurmctld slurmd srun sbatch squeue scontrol scancel sinfo)
missing() { for b in "${needed[@]}"; do command -v "$b" >/dev/null 2>&1 || return 0; done; return 1; }

if ! missing; then
  echo "ci_setup_slurm: SLURM and munge already installed ($(slurmd -V 2>/dev/null))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_setup_slurm: apt-get not available; SLURM tests will be skipped" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "ci_setup_slurm: not root and no passwordless sudo; SLURM tests will be skipped" >&2
    exit 0
  fi
fi

start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
# The package scripts would start system munge/slurm services; the test runs its own daemons instead.
# policy-rc.d exit 101 tells invoke-rc.d not to start anything during this install.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null && "${SUDO[@]}" chmod +x "$policy"
  own_policy=1
fi
log=$(mktemp)
ok=1
"${SUDO[@]}" apt-get update -qq >"$log" 2>&1 || ok=0
if [ $ok = 1 ]; then
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 slurm-wlm munge >>"$log" 2>&1 \
    || ok=0
fi
[ $own_policy = 1 ] && "${SUDO[@]}" rm -f "$policy"

if [ $ok = 1 ] && ! missing; then
  echo "ci_setup_slurm: installed $(slurmd -V) and munge in $((SECONDS - start)) s"
else
  tail -n 20 "$log" >&2
  echo "ci_setup_slurm: apt-get could not install slurm-wlm/munge; SLURM tests will be skipped" >&2
fi
rm -f "$log"
exit 0
