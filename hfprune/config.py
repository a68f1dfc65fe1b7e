"""Read experiment configs: the JSON schema with defaults filled in, the config's own consistency, and the answers
jobs ask of it (model entries, seeds, criterion options, per-ratio values).

The bottom layer: it imports nothing of hfprune but errors and runtime (and, in `cell_seeds`, the criteria
registry, which imports nothing of hfprune's stages). What a config means for models, data,
tasks and the device is checked above the stages, in hfprune.validation (which every command and the Snakefile
call), so an invalid value fails before any job starts, with the offending field named (e.g. ``ratios[1]: 1.2 is
not less than 1``).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

from hfprune.errors import ConfigError
from hfprune.runtime import reading

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
    """The schema file as written (hfprune.validation.schema adds the family enum from the adapter registry)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator_with_defaults():
    from jsonschema import Draft202012Validator, validators

    base_props = Draft202012Validator.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from base_props(validator, properties, instance, sch)

    return validators.extend(Draft202012Validator, {"properties": fill_defaults})


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def read_config(config: dict, source: str = "config", sch: dict | None = None) -> dict:
    """Return a deep copy of `config` checked against the schema `sch` (default: `schema()`) with defaults filled
    in and its own fields consistent; raise ConfigError otherwise."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    validator = _validator_with_defaults()(schema() if sch is None else sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid config field {_field(e.absolute_path)!r}: {e.message}" for e in errors[:10]]
        raise ConfigError("\n".join(lines))
    cal, raw_cal = cfg["calibration"], config.get("calibration") or {}
    if cal["seeds"] is not None:
        if "seed" not in raw_cal:
            cal["seed"] = cal["seeds"][0]  # the one-seed field agrees with the axis (and a reload of this copy)
        elif cal["seed"] not in cal["seeds"]:
            raise ConfigError(f"{source}: invalid config field 'calibration.seed': {cal['seed']} is not in "
                              f"calibration.seeds {cal['seeds']}; give one of the two")
    baseline = cfg["report"]["baseline"]
    if baseline is not None and baseline not in cfg["criteria"]:
        raise ConfigError(f"{source}: invalid config field 'report.baseline': {baseline!r} is not one of the "
                          f"grid's criteria ({', '.join(cfg['criteria'])})")
    names = [m["name"] for m in cfg["models"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: invalid config field 'models': duplicate model name(s) {', '.join(dupes)}")
    _check_resources(cfg, source)
    _normalise_by_ratio(cfg, source)
    return cfg


def read_config_file(path: str | Path) -> object:
    """The YAML content of a config file (checked by `read_config` or hfprune.validation.validate_config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with reading(path, "config file", ConfigError) as p:  # not UTF-8, not YAML: one line naming the file
        return yaml.safe_load(p.read_text(encoding="utf-8"))


def format_ratio(ratio: float) -> str:
    """0.2 -> '0.2', 0.25 -> '0.25' (floating noise removed): the `r<ratio>` part of output paths."""
    return f"{round(float(ratio), 6):g}"


def model_entry(cfg: dict, name: str) -> dict:
    for entry in cfg["models"]:
        if entry["name"] == name:
            return entry
    raise ConfigError(f"model {name!r} is not in the config's models: {', '.join(m['name'] for m in cfg['models'])}")


GPU_STAGES = ("score", "recover", "evaluate")


def model_resources(cfg: dict, model: str) -> dict:
    """The `resources` a model's jobs run with: the top-level section, with the keys of the model's own
    `resources` replacing those (operational settings, out of every digest and MLflow identity)."""
    return {**cfg["resources"], **(model_entry(cfg, model).get("resources") or {})}


def gpus_per_job(cfg: dict, model: str, stage: str) -> int:
    """GPUs one job of `stage` (score | recover | evaluate) on `model` holds; 0 with device cpu."""
    if stage not in GPU_STAGES:
        raise ConfigError(f"unknown stage {stage!r} for gpus_per_job; one of {', '.join(GPU_STAGES)}")
    if cfg["device"] == "cpu":
        return 0
    gpus = model_resources(cfg, model)["gpus_per_job"]
    return gpus.get(stage, 1) if isinstance(gpus, dict) else gpus


def threads_per_job(cfg: dict, model: str, default: int) -> int:
    """CPU threads one score or evaluate job on `model` takes: resources.threads_per_job, else `default`."""
    return model_resources(cfg, model).get("threads_per_job") or default


# one device map per job: what the job splits over its GPUs; recover trains data-parallel (one copy per GPU)
SPLIT_STAGES = ("score", "evaluate")


def _check_resources(cfg: dict, source: str = "config") -> None:
    """Several GPUs for a score or evaluate job are only used through a device map: without one, a job would
    hold GPUs it never touches."""
    if cfg["device_map"] is not None:
        return
    for entry in cfg["models"]:
        for stage in SPLIT_STAGES:
            n = gpus_per_job(cfg, entry["name"], stage)
            if n > 1:
                raise ConfigError(f"{source}: invalid config field 'resources.gpus_per_job': {stage} jobs of model "
                                  f"{entry['name']!r} hold {n} GPUs but device_map is null, so they would use one; "
                                  "set device_map: auto or gpus_per_job 1")


def calibration_seeds(cfg: dict, model: str) -> list[int]:
    """The calibration draws of a model: its own `seeds`, else calibration.seeds, else [calibration.seed]."""
    cal = cfg["calibration"]
    return list(model_entry(cfg, model).get("seeds") or cal["seeds"] or [cal["seed"]])


def cell_seeds(cfg: dict, model: str, criterion: str) -> list[int]:
    """Seeds a criterion is scored with: every draw if its scores depend on the seed (calibration data or
    randomness), else only the first (magnitude is scored once)."""
    from hfprune.criteria import CRITERIA

    seeds = calibration_seeds(cfg, model)
    return seeds if CRITERIA[criterion].seeded else seeds[:1]


def with_seed(cfg: dict, model: str, seed: int | None) -> dict:
    """The config a job of one calibration draw runs with: calibration.seed set to `seed` (None: the model's
    first seed), so scoring, tracking and sidecars all see the cell's seed."""
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed {seed} must be >= 0")
    cfg = copy.deepcopy(cfg)
    cfg["calibration"]["seed"] = calibration_seeds(cfg, model)[0] if seed is None else seed
    return cfg


def baseline_criterion(cfg: dict) -> str:
    """report.baseline, else the paper's CE where the grid has it, else the first criterion."""
    chosen = cfg["report"]["baseline"]
    if chosen is not None:
        return chosen
    return "taylor_ce" if "taylor_ce" in cfg["criteria"] else cfg["criteria"][0]


def _normalise_by_ratio(cfg: dict, source: str) -> None:
    """criterion_options.<c>.by_ratio keys (YAML floats or strings) -> format_ratio strings ("0.2")."""
    for crit, opts in cfg["criterion_options"].items():
        by = opts.get("by_ratio")
        if not by:
            continue
        out = {}
        for key, value in by.items():
            try:
                ratio = float(key)
            except (TypeError, ValueError):
                ratio = -1.0
            if not 0 < ratio < 1:
                raise ConfigError(f"{source}: invalid config field 'criterion_options.{crit}.by_ratio': key "
                                  f"{key!r} is not a pruning ratio in (0, 1)")
            out[format_ratio(ratio)] = value
        opts["by_ratio"] = out


def per_ratio(cfg: dict, criterion: str) -> bool:
    """Whether a criterion's options differ by pruning ratio (criterion_options.<c>.by_ratio): its scores are
    then computed once per ratio instead of once for every ratio."""
    return bool(cfg["criterion_options"].get(criterion, {}).get("by_ratio"))


def score_ratios(cfg: dict, criterion: str) -> list:
    """The ratio labels of a criterion's score files: [None] (one file serves every ratio) or each ratio."""
    return [format_ratio(r) for r in cfg["ratios"]] if per_ratio(cfg, criterion) else [None]


def score_stem(criterion: str, seed, ratio=None) -> str:
    """`<criterion>/s<seed>` (+ `.r<ratio>` for a per-ratio criterion): the score file's path under scores/<model>/
    without its suffix."""
    return f"{criterion}/s{seed}" + (f".r{ratio}" if ratio is not None else "")


def criterion_options(cfg: dict, criterion: str, ratio=None) -> dict:
    """A criterion's options, with the by_ratio entry of `ratio` applied (a float or format_ratio label)."""
    opts = dict(cfg["criterion_options"].get(criterion, {}))
    by = opts.pop("by_ratio", None) or {}
    if by and ratio is None:
        raise ConfigError(f"criterion_options.{criterion}.by_ratio: options depend on the pruning ratio; score "
                          "with --ratio")
    if ratio is not None:
        opts.update(by.get(format_ratio(float(ratio)), {}))
    return opts
