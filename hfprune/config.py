"""Load and validate experiment configs against the JSON schema, filling defaults.

Every job of the grid and the Snakefile itself call `validate_config`, so an invalid value fails before any
job starts, with the offending field named (e.g. ``ratios[1]: 1.2 is not less than 1``).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

from hfprune.errors import ConfigError, HFPruneError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
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


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated deep copy of `config` with defaults filled in; raise ConfigError otherwise."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    validator = _validator_with_defaults()(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid config field {_field(e.absolute_path)!r}: {e.message}" for e in errors[:10]]
        raise ConfigError("\n".join(lines))
    names = [m["name"] for m in cfg["models"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: invalid config field 'models': duplicate model name(s) {', '.join(dupes)}")
    ev = cfg["evaluation"]
    if ev["suite"] != "none":  # a task typo fails here, not in the first evaluate job after hours of scoring
        from hfprune.tasks import resolve_suite

        try:
            resolve_suite(ev["suite"], ev["tasks"])
        except HFPruneError as exc:
            raise ConfigError(f"{source}: invalid config field 'evaluation.tasks': {exc}") from None
    return cfg


def check_models(cfg: dict, source: str = "config") -> None:
    """Sources that exist, families that match them, ratios every model can reach, sequence lengths within its
    positions and scoring within the device's memory (hfprune.limits), from config.json alone.

    Called where a grid starts (the Snakefile, `hfprune validate`) so that it does not find out in its plan
    jobs, after hours of scoring; single jobs meet the same errors when they load the model.
    """
    from hfprune.limits import check_model_limits
    from hfprune.models import ModelSpec, architecture, check_family
    from hfprune.plan import check_feasible

    pruning = cfg["pruning"]
    for i, entry in enumerate(cfg["models"]):
        spec = ModelSpec.from_config(entry)
        try:
            arch = architecture(spec, cfg["resources_dir"])
            if arch is not None:
                check_family(arch, spec)
        except HFPruneError as exc:
            raise ConfigError(f"{source}: invalid config field 'models[{i}]': {exc}") from None
        for j, ratio in enumerate(cfg["ratios"] if arch is not None else []):
            try:
                check_feasible(arch, ratio, spec.family, pruning["allocation"], pruning["scope"],
                               pruning["min_keep_fraction"], pruning["attn_kv_group_fraction"])
            except ConfigError as exc:
                raise ConfigError(f"{source}: invalid config field 'ratios[{j}]' for model {spec.name!r}: "
                                  f"{exc}") from None
        if arch is not None:
            check_model_limits(cfg, spec.name, arch, source=source)


def load_config(path: str | Path) -> dict:
    from hfprune.runtime import reading

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with reading(path, "config file", ConfigError) as p:  # not UTF-8, not YAML: one line naming the file
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    return validate_config(raw, source=str(path))


def model_entry(cfg: dict, name: str) -> dict:
    for entry in cfg["models"]:
        if entry["name"] == name:
            return entry
    raise ConfigError(f"model {name!r} is not in the config's models: {', '.join(m['name'] for m in cfg['models'])}")


def criterion_options(cfg: dict, criterion: str) -> dict:
    return dict(cfg["criterion_options"].get(criterion, {}))
