# Shared names and helpers of the grid: paths, wildcard constraints, how jobs call hfprune.

import hashlib
import json
import os
import re
import shlex
import sys

import yaml
from snakemake.settings.types import DeploymentMethod

from hfprune import grid, layout
from hfprune.assets import ASSET_MARKER, EMBEDDED_MODELS
from hfprune.config import GPU_STAGES, cell_seeds, format_ratio, gpus_per_job, per_ratio, score_ratios, threads_per_job
from hfprune.data import content_digest
from hfprune.errors import ConfigError
from hfprune.evaluation.records import records_path
from hfprune.models import ModelSpec, embedded_dir
from hfprune.runtime import atomic_path

EXP = f"{config['results_dir']}/{config['experiment']}"
# The validated config (defaults filled in, --config overrides applied); written by `onstart` below, i.e. not on
# dry runs, and only when its content changes. Without a `grid` every job reads it.
RUN_CONFIG = f"{EXP}/config.yaml"
# Grid variants (hfprune.grid): each job runs with a "point", its variant projected onto the axes its stage chain
# reads, and writes under `<stage>/<point>/`; the point "" (no axis) keeps the paths of a grid-less config.
VARIANTS = grid.variants(config)  # name -> config of every variant ({"": config} without a grid)
POINTS = grid.points(config)  # name -> config of every variant and projection a job runs with
LOGS, BENCH = f"{EXP}/logs", f"{EXP}/benchmarks"
REPORT = f"{EXP}/report"  # the folder: report.md, tables/, plots/ (written at once)

MODELS = {m["name"]: m for m in config["models"]}
CRITERIA = config["criteria"]
RATIOS = [format_ratio(r) for r in config["ratios"]]  # the `ratio` wildcard: "0.2" in .../r0.2.json
RECOVERY = config["recovery"]["enabled"]

# GPU jobs ask for `resources.gpus_per_job` devices (`--resources gpu=N` caps how many are in use at once; under
# SLURM it becomes --gpus=N) and lock that many free ones through lock-file slots (hfprune.gpu sets
# CUDA_VISIBLE_DEVICES); a CPU config needs neither.
GPU = 0 if config["device"] == "cpu" else 1
# Every rule names the conda environment matching the config's device (used with `--sdm conda`, paths are
# relative to this folder); jobs then run that environment's python. Without conda, jobs run the hfprune of
# the Python that runs Snakemake (`make run` does not activate the venv).
ENV = "../../envs/cuda.yaml" if GPU else "../../envs/cpu.yaml"
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PY = "python" if CONDA else shlex.quote(sys.executable)
HFPRUNE = f"{PY} -m hfprune.cli"
HFPRUNE_GPU = HFPRUNE if GPU == 0 else f"{PY} -m hfprune.gpu -- {HFPRUNE}"
# how a GPU rule's shell starts: the slot wrapper takes the job's GPU count from its `gpu` resource and torch its
# thread pools from the rule's threads (both shell template fields, so changing them reruns nothing)
GPU_JOB = "HFPRUNE_JOB_GPUS={resources.gpu} {params.hfprune} --threads {threads}"


def gpus(stage):
    """A rule's `gpu` resource: resources.gpus_per_job of its model and stage (0 on CPU)."""
    return lambda wildcards: gpus_per_job(config, wildcards.model, stage)


def job_threads(default=4):
    """A score or evaluate rule's threads: resources.threads_per_job of its model, else `default` (capped at --cores)."""
    return lambda wildcards: threads_per_job(config, wildcards.model, default)


def check_gpu_budget():
    """A job that needs more GPUs than `--resources gpu=N` allows could never start: stop here, naming the field."""
    budget = workflow.global_resources.get("gpu")
    budget = getattr(budget, "value", budget)
    if budget is None or GPU == 0:
        return
    for model in MODELS:
        for stage in GPU_STAGES:
            need = gpus_per_job(config, model, stage)
            if need > budget:
                stop_workflow(ConfigError(
                    f"{_source}: invalid config field 'resources.gpus_per_job': {stage} jobs of model {model!r} "
                    f"need {need} GPUs, more than --resources gpu={budget}; lower it or raise --resources gpu"))


check_gpu_budget()


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    v=f"(?:{_alternatives(map(grid.folder, POINTS))})",  # the point's folder: "" or "<name>/"
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


def _point_name(wildcards):
    return grid.folder_name(wildcards.v) if "v" in wildcards.keys() else None


def point(wildcards):
    """The config of a job's point (the run's config for a job without the `v` wildcard)."""
    name = _point_name(wildcards)
    return config if name is None else POINTS[name]


def config_file(name):
    """The config file the jobs of point `name` read: the run's config without a grid (or for name None)."""
    return RUN_CONFIG if not config["grid"] or name is None else f"{EXP}/configs/{name or 'base'}.yaml"


def job_config(wildcards):
    return config_file(_point_name(wildcards))


def _lookup(cfg, key):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def settings(*keys):
    """A params value that changes when the config values a job depends on (sections or dotted keys such as
    "pruning.scope"), its model entry or its criterion's options change, so Snakemake's params rerun trigger
    reruns exactly the jobs affected by a config edit."""

    def digest(wildcards):
        cfg = point(wildcards)
        used = {key: grid.digest_value(key, _lookup(cfg, key)) for key in keys if key != grid.OPTIONS}
        names = wildcards.keys()
        # a model's seed list is an axis (the `seed` wildcard), its resources how its jobs run: neither is a setting
        used["model"] = ({k: v for k, v in MODELS[wildcards.model].items() if k not in ("seeds", "resources")}
                         if "model" in names else None)
        crit = wildcards.criterion if "criterion" in names else None
        used["options"] = cfg["criterion_options"].get(crit)
        texts = content_digest(used)  # the content of the config's own text files, not only their paths
        if texts:
            used["texts"] = texts
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]

    return digest


def with_records(metrics):
    """A metrics JSON and, beside it, its per-unit records (the evaluate rules' named outputs)."""
    return {"metrics": metrics, "units": str(records_path(metrics))}


def _input_point(wildcards, chain):
    """The `v` of a job's input made by the stage chain `chain`: the job's point projected onto that chain."""
    return grid.variant_dir(point(wildcards), chain, wildcards.criterion)


def plan_scores(w):
    """The score file a plan reads: the ratio's own for a per-ratio criterion, else the shared one."""
    ratio = w.ratio if per_ratio(point(w), w.criterion) else None
    return layout.score_file(EXP, _input_point(w, "score"), w.model, w.criterion, w.seed, ratio)


def cell_plan(w):
    return layout.plan_file(EXP, _input_point(w, "plan"), w.model, w.criterion, w.seed, w.ratio)


def cell_recovered(w):
    return layout.recovered_dir(EXP, _input_point(w, "recover"), w.model, w.criterion, w.seed, w.ratio)


def cells(cfg):
    """(model, criterion, seed) of every scored cell: seeded criteria once per calibration seed of the model."""
    return [(m, c, s) for m in MODELS for c in CRITERIA for s in cell_seeds(cfg, m, c)]


def report_inputs():
    """What the report reads of every variant: metrics (dense once per model, criterion x seed x ratio,
    recovered ones if enabled), plans and score sidecars."""
    paths = []
    for cfg in VARIANTS.values():
        for m in MODELS:
            paths += with_records(layout.dense_metrics(EXP, grid.variant_dir(cfg, "evaluate_dense"), m)).values()
        for m, c, s in cells(cfg):
            v = {chain: grid.variant_dir(cfg, chain, c) for chain in grid.CHAINS}
            paths += [layout.score_file(EXP, v["score"], m, c, s, r, ".json") for r in score_ratios(cfg, c)]
            for r in RATIOS:
                paths.append(layout.plan_file(EXP, v["plan"], m, c, s, r))
                paths += with_records(layout.cell_metrics(EXP, v["evaluate_pruned"], m, c, s, r)).values()
                if RECOVERY:
                    recovered = layout.cell_metrics(EXP, v["evaluate_recovered"], m, c, s, r, recovered=True)
                    paths += with_records(recovered).values()
    return list(dict.fromkeys(paths))  # variants share the files of their common points


def _write(path, cfg):
    text = yaml.safe_dump(dict(cfg), sort_keys=False)
    if not os.path.isfile(path) or open(path).read() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)


onstart:
    # runs left RUNNING by jobs killed in an earlier run (SIGKILL, OOM, power loss) are closed as KILLED
    from hfprune.tracking_store import close_stale_runs

    try:
        close_stale_runs(config)
    except HFPruneError as e:
        stop_workflow(e)
    _write(RUN_CONFIG, config)
    if config["grid"]:  # every point's config, where job_config finds it
        for name, cfg in POINTS.items():
            _write(config_file(name), cfg)


def _tracking_check():
    """The MLflow completeness check (hfprune/sync.py), in Snakemake's own output at the end of the run: any
    finished job without its FINISHED run is named, whether the run succeeded or not."""
    if not config["tracking"]["enabled"]:
        return
    from hfprune import sync

    try:
        complete, line = sync.summary(config, RUN_CONFIG)
    except Exception as e:  # an unreachable server at the end must not hide the run's own outcome
        complete, line = False, f"MLflow tracking not checked ({type(e).__name__}: {str(e).splitlines()[0]})"
    print(f"hfprune workflow: {'' if complete else 'WARNING: '}{line}", file=sys.stderr)


onsuccess:
    _tracking_check()


onerror:
    _tracking_check()
