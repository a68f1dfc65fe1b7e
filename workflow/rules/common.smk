# Shared names and helpers of the grid: paths, wildcard constraints, how jobs call hfprune.

import hashlib
import json
import os
import re
import shlex
import sys

import yaml
from snakemake.settings.types import DeploymentMethod

from hfprune.assets import ASSET_MARKER, EMBEDDED_MODELS
from hfprune.config import cell_seeds, per_ratio, score_ratios, score_stem
from hfprune.data import content_digest
from hfprune.models import ModelSpec, embedded_dir
from hfprune.plan import format_ratio
from hfprune.runtime import atomic_path

EXP = f"{config['results_dir']}/{config['experiment']}"
# The validated config (defaults filled in, --config overrides applied) that every job reads; written by
# `onstart` below, i.e. not on dry runs, and only when its content changes.
RUN_CONFIG = f"{EXP}/config.yaml"
LOGS, BENCH = f"{EXP}/logs", f"{EXP}/benchmarks"
REPORT = f"{EXP}/report"  # the folder: report.md, tables/, plots/ (written at once)

MODELS = {m["name"]: m for m in config["models"]}
CRITERIA = config["criteria"]
RATIOS = [format_ratio(r) for r in config["ratios"]]  # the `ratio` wildcard: "0.2" in .../r0.2.json
RECOVERY = config["recovery"]["enabled"]

# GPU jobs ask for one device (`--resources gpu=N` caps how many run at once) and take a free one through a
# lock-file slot (hfprune.gpu sets CUDA_VISIBLE_DEVICES); a CPU config needs neither.
GPU = 0 if config["device"] == "cpu" else 1
# Every rule names the conda environment matching the config's device (used with `--sdm conda`, paths are
# relative to this folder); jobs then run that environment's python. Without conda, jobs run the hfprune of
# the Python that runs Snakemake (`make run` does not activate the venv).
ENV = "../../envs/cuda.yaml" if GPU else "../../envs/cpu.yaml"
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PY = "python" if CONDA else shlex.quote(sys.executable)
HFPRUNE = f"{PY} -m hfprune.cli"
HFPRUNE_GPU = HFPRUNE if GPU == 0 else f"{PY} -m hfprune.gpu -- {HFPRUNE}"


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=_alternatives(MODELS),
    criterion=_alternatives(CRITERIA),
    ratio=_alternatives(RATIOS),
    seed=r"\d+",
    source=_alternatives(EMBEDDED_MODELS),


def asset_output(source):
    return str(embedded_dir(config["resources_dir"], source) / ASSET_MARKER)


def asset_marker(wildcards):
    """Embedded models are materialised by the assets rule first; local folders and hub ids need no job."""
    spec = ModelSpec.from_config(MODELS[wildcards.model])
    return asset_output(spec.source) if spec.kind == "embedded" else []


def _lookup(key):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def settings(*keys):
    """A params value that changes when the config values a job depends on (sections or dotted keys such as
    "pruning.scope"), its model entry or its criterion's options change, so Snakemake's params rerun trigger
    reruns exactly the jobs affected by a config edit."""

    def digest(wildcards):
        used = {key: _lookup(key) for key in keys}
        names = wildcards.keys()
        # a model's seed list is an axis (the `seed` wildcard), not a setting of its jobs
        used["model"] = {k: v for k, v in MODELS[wildcards.model].items() if k != "seeds"} if "model" in names else None
        crit = wildcards.criterion if "criterion" in names else None
        used["options"] = config["criterion_options"].get(crit)
        texts = content_digest(used)  # the content of the config's own text files, not only their paths
        if texts:
            used["texts"] = texts
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]

    return digest


COMPUTE = ("seed", "dtype", "device", "device_map")
# what a score job reads of `calibration`: its seed is the job's `seed` wildcard, not the seeds list
CALIBRATION = ("calibration.source", "calibration.sampling", "calibration.num_sequences", "calibration.seq_len", "calibration.batch_size")


def score_path(model, criterion, seed, ratio=None):
    """A criterion with per-ratio options (criterion_options.<c>.by_ratio) has one score file per ratio."""
    return f"{EXP}/scores/{model}/{score_stem(criterion, seed, ratio)}.safetensors"


def plan_scores(wildcards):
    """The score file a plan reads: the ratio's own for a per-ratio criterion, else the shared one."""
    ratio = wildcards.ratio if per_ratio(config, wildcards.criterion) else None
    return score_path(wildcards.model, wildcards.criterion, wildcards.seed, ratio)


def score_sidecars():
    return [f"{EXP}/scores/{m}/{score_stem(c, s, r)}.json" for m, c, s in cells() for r in score_ratios(config, c)]


def plan_path(model, criterion, seed, ratio):
    return f"{EXP}/plans/{model}/{criterion}/s{seed}/r{ratio}.json"


def cell_metrics(model, criterion, seed, ratio, recovered=False):
    """A pruned cell's metrics JSON and, beside it, its per-unit records (the evaluate rules' named outputs)."""
    base = f"{EXP}/metrics/{model}/{criterion}/s{seed}/r{ratio}{'.recovered' if recovered else ''}"
    return {"metrics": f"{base}.json", "units": f"{base}.units.parquet"}


def cells():
    """(model, criterion, seed) of every scored cell: seeded criteria once per calibration seed of the model."""
    return [(m, c, s) for m in MODELS for c in CRITERIA for s in cell_seeds(config, m, c)]


def metrics_paths():
    """Every cell the report needs: dense once per model, criterion x seed x ratio, recovered ones if enabled."""
    paths = [f"{EXP}/metrics/{m}/dense.{ext}" for m in MODELS for ext in ("json", "units.parquet")]
    for m, c, s in cells():
        for r in RATIOS:
            paths += cell_metrics(m, c, s, r).values()
            if RECOVERY:
                paths += cell_metrics(m, c, s, r, recovered=True).values()
    return paths


onstart:
    # runs left RUNNING by jobs killed in an earlier run (SIGKILL, OOM, power loss) are closed as KILLED
    from hfprune.tracking import close_stale_runs

    close_stale_runs(config)
    text = yaml.safe_dump(dict(config), sort_keys=False)
    if not os.path.isfile(RUN_CONFIG) or open(RUN_CONFIG).read() != text:
        with atomic_path(RUN_CONFIG) as tmp:
            tmp.write_text(text)
