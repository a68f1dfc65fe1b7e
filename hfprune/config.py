"""Load and validate experiment configs against the JSON schema, filling defaults.

Every job of the grid and the Snakefile itself call `validate_config`, so an invalid value fails before any
job starts, with the offending field named (e.g. ``ratios[1]: 1.2 is not less than 1``).
"""

from __future__ import annotations

import copy
import glob
from functools import lru_cache
from pathlib import Path

import yaml

from hfprune.errors import ConfigError, HFPruneError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
    from hfprune.adapters import ADAPTERS

    sch = yaml.safe_load(SCHEMA_PATH.read_text())
    # the family enum is the adapter registry, so adding a family is a new adapter file + its registry line
    sch["properties"]["models"]["items"]["properties"]["family"]["enum"] = list(ADAPTERS)
    return sch


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
    if cfg["pruning"]["scope"] != "mlp":  # every criterion scores MLP neurons (and the criteria import torch)
        from hfprune.criteria import CRITERIA

        for crit in cfg["criteria"]:
            try:
                CRITERIA[crit].check_scope(cfg["pruning"]["scope"])
            except ConfigError as exc:
                raise ConfigError(f"{source}: invalid config field 'pruning.scope': {exc}") from None
    names = [m["name"] for m in cfg["models"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: invalid config field 'models': duplicate model name(s) {', '.join(dupes)}")
    _fill_families(cfg)
    _check_resources(cfg, source)
    _normalise_by_ratio(cfg, source)
    _check_text_sources(cfg, source)
    ev = cfg["evaluation"]
    if ev["include_path"] is not None and not Path(ev["include_path"]).is_dir():
        raise ConfigError(f"{source}: invalid config field 'evaluation.include_path': {ev['include_path']!r} is not "
                          "a folder")
    if ev["suite"] != "none":  # a task or metric typo fails here, not in the first evaluate job after hours of scoring
        from hfprune.tasks import resolve_suite

        try:
            specs = resolve_suite(ev["suite"], ev["tasks"], ev["include_path"])
        except HFPruneError as exc:
            raise ConfigError(f"{source}: invalid config field 'evaluation.tasks': {exc}") from None
        _check_task_data(ev["task_data"], [s.task for s in specs], source)
    if cfg["grid"]:  # known axis paths, and every variant a valid config
        from hfprune.grid import variants

        variants(cfg, source)
    return cfg


def _check_task_data(task_data: dict, names: list[str], source: str) -> None:
    """evaluation.task_data names tasks the grid evaluates and local files that exist (not in the first
    evaluate job, after the scoring)."""
    from hfprune.tasks import data_files

    unknown = sorted(set(task_data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: invalid config field 'evaluation.task_data': {', '.join(unknown)} not among "
                          f"the evaluated tasks ({', '.join(names)})")
    for field, path in data_files(task_data):
        if "://" not in path and not [p for p in glob.glob(path) if Path(p).is_file()]:  # a path or a pattern
            raise ConfigError(f"{source}: invalid config field {field!r}: no file {path!r}")


def _text_fields(cfg: dict) -> list[tuple[str, object, str]]:
    """(config field, text source value, role) of every text a grid reads."""
    ev = cfg["evaluation"]
    fields = [("calibration.source", cfg["calibration"]["source"], "calibration")]
    fields += [(f"evaluation.perplexity.sources[{i}]", v, "eval") for i, v in enumerate(ev["perplexity"]["sources"])]
    return fields + ([("evaluation.fidelity.source", ev["fidelity"]["source"], "eval")] if ev["fidelity"]["enabled"]
                     else [])


def _check_text_lengths(cfg: dict, spec, source: str) -> None:
    """Your own texts (mappings) cut into the windows asked for with the tokenizer of a model whose folder is here
    (an embedded model already materialised, a local folder): a text too short fails before any job. Hub texts and
    hub models are checked by their jobs."""
    from hfprune.data import eval_chunks, hub_datasets_dir, load_texts, sample_windows, text_source
    from hfprune.models import model_dir

    own = [(f, v, r) for f, v, r in _text_fields(cfg) if not isinstance(v, str)]
    path = model_dir(spec, cfg["resources_dir"]) if spec.kind != "hub" else None
    if not own or path is None or not (Path(path) / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cal, ev = cfg["calibration"], cfg["evaluation"]
    for field, value, role in own:
        text = text_source(value, role, hub_datasets_dir(cfg))
        try:
            if field == "calibration.source":
                sample_windows(tok, load_texts(text), cal["num_sequences"], cal["seq_len"], cal["seed"],
                               sampling=cal["sampling"])
            elif field == "evaluation.fidelity.source":
                sample_windows(tok, load_texts(text), ev["fidelity"]["num_prompts"], ev["fidelity"]["seq_len"], 0)
            else:
                ppl = ev["perplexity"]
                eval_chunks(tok, text, ppl["seq_len"], ppl["max_tokens"], ppl["protocol"])
        except HFPruneError as exc:
            named = str(exc) if repr(text.label) in str(exc) else f"text source {text.label!r}: {exc}"
            raise ConfigError(f"{source}: invalid config field {field!r} for model {spec.name!r}: {named}") from None


def _check_text_sources(cfg: dict, source: str) -> None:
    """Your own texts (mappings) are read here, so a missing file, a bad JSON line, a missing field or an empty
    text fails before any job; built-in texts are packaged, hub ones are checked when their job loads them."""
    from hfprune.data import check_source, hub_datasets_dir, text_source

    hub_dir = hub_datasets_dir(cfg)
    if hub_dir is not None and not Path(hub_dir).is_dir():
        raise ConfigError(f"{source}: invalid config field 'hub_datasets_dir': {hub_dir!r} is not a folder")
    labels: dict[str, str] = {}
    for field, value, role in _text_fields(cfg):
        try:
            label = text_source(value, role, hub_dir).label
            if not isinstance(value, str):
                check_source(value, role, hub_dir)
        except HFPruneError as exc:
            raise ConfigError(f"{source}: invalid config field {field!r}: {exc}") from None
        if field.startswith("evaluation.perplexity"):
            if label in labels:
                raise ConfigError(f"{source}: invalid config field {field!r}: label {label!r} is also "
                                  f"{labels[label]}'s; give one of them a `name`")
            labels[label] = field


def _fill_families(cfg: dict) -> None:
    """A model entry without `family` gets its checkpoint's, where config.json facts are readable (embedded
    models, local folders, cached hub models); otherwise the job that downloads the model resolves it."""
    missing = [entry for entry in cfg["models"] if "family" not in entry]
    if missing:
        from hfprune.models import ModelSpec, checkpoint_family

        for entry in missing:
            family = checkpoint_family(ModelSpec.from_config(entry), cfg["resources_dir"])
            if family is not None:
                entry["family"] = family


def check_models(cfg: dict, source: str = "config") -> None:
    """Sources that exist, families that match them, ratios every model can reach, sequence lengths within its
    positions and scoring within the device's memory (hfprune.limits), from config.json alone; and your own texts
    long enough for their windows, with the tokenizer of each model whose folder is here; of every grid variant.

    Called where a grid starts (the Snakefile, `hfprune validate`) so that it does not find out in its plan
    jobs, after hours of scoring; single jobs meet the same errors when they load the model.
    """
    from hfprune.grid import is_point, variants
    from hfprune.limits import check_model_limits
    from hfprune.models import ModelSpec, architecture
    from hfprune.plan import check_feasible

    if not is_point(cfg):  # every variant: an axis such as pruning.allocation decides what is feasible
        for name, variant in variants(cfg, source).items():
            check_models(variant, f"{source} (grid variant {name})")
        return
    pruning = cfg["pruning"]
    for i, entry in enumerate(cfg["models"]):
        spec = ModelSpec.from_config(entry)
        try:
            arch = architecture(spec, cfg["resources_dir"])
            if arch is not None:
                spec = spec.resolved(arch)
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
        _check_text_lengths(cfg, spec, source)


def load_config(path: str | Path) -> dict:
    from hfprune.runtime import reading

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with reading(path, "config file", ConfigError) as p:  # not UTF-8, not YAML: one line naming the file
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    return validate_config(raw, source=str(path))


def load_job_config(path: str | Path) -> dict:
    """`load_config` for a command on one grid point (a job, `compare`): a config of several variants is an
    error naming the file."""
    from hfprune.grid import point_values

    cfg = load_config(path)
    point_values(cfg, source=str(path))
    return cfg


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
    from hfprune.plan import format_ratio

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
    from hfprune.plan import format_ratio

    return [format_ratio(r) for r in cfg["ratios"]] if per_ratio(cfg, criterion) else [None]


def score_stem(criterion: str, seed, ratio=None) -> str:
    """`<criterion>/s<seed>` (+ `.r<ratio>` for a per-ratio criterion): the score file's path under scores/<model>/
    without its suffix."""
    return f"{criterion}/s{seed}" + (f".r{ratio}" if ratio is not None else "")


def criterion_options(cfg: dict, criterion: str, ratio=None) -> dict:
    """A criterion's options, with the by_ratio entry of `ratio` applied (a float or format_ratio label)."""
    from hfprune.plan import format_ratio

    opts = dict(cfg["criterion_options"].get(criterion, {}))
    by = opts.pop("by_ratio", None) or {}
    if by and ratio is None:
        raise ConfigError(f"criterion_options.{criterion}.by_ratio: options depend on the pruning ratio; score "
                          "with --ratio")
    if ratio is not None:
        opts.update(by.get(format_ratio(float(ratio)), {}))
    return opts
