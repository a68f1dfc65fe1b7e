"""Output paths under <results_dir>/<experiment>/ (docs/CONTRACTS.md), shared by the workflow's rules and the
readers (report, compare). `v` is a job's point folder (hfprune.grid.variant_dir): "" or "<name>/"; every
argument may also be a Snakemake wildcard such as "{model}"."""

from __future__ import annotations

from hfprune.config import score_stem


def score_file(exp, v, model, criterion, seed, ratio=None, suffix=".safetensors") -> str:
    return f"{exp}/scores/{v}{model}/{score_stem(criterion, seed, ratio)}{suffix}"


def plan_file(exp, v, model, criterion, seed, ratio) -> str:
    return f"{exp}/plans/{v}{model}/{criterion}/s{seed}/r{ratio}.json"


def recovered_dir(exp, v, model, criterion, seed, ratio) -> str:
    return f"{exp}/recovered/{v}{model}/{criterion}/s{seed}/r{ratio}"


def dense_metrics(exp, v, model) -> str:
    return f"{exp}/metrics/{v}{model}/dense.json"


def cell_metrics(exp, v, model, criterion, seed, ratio, recovered=False) -> str:
    return f"{exp}/metrics/{v}{model}/{criterion}/s{seed}/r{ratio}{'.recovered' if recovered else ''}.json"
