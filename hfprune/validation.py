"""Validation on top of the stages: what a config means for the models, families, limits, data sources, tasks,
grid axes and feasibility it names, checked before any job runs.

hfprune.config reads the file, fills the defaults and answers questions about it; this module composes the checks
of the rooms that own each concept. Every command loads its config through `load_config` / `load_job_config`
(cheap: config.json facts, your own texts, task names); the Snakefile and `hfprune validate` also run
`check_models` (every model and grid variant, with the tokenizers of local models), and each job runs its own
stage's limits before it loads a weight (hfprune.limits.check_job).
"""

from __future__ import annotations

import copy
import glob
from functools import lru_cache
from pathlib import Path

from hfprune.adapters import ADAPTERS
from hfprune.config import read_config, read_config_file
from hfprune.config import schema as config_schema
from hfprune.data import check_source, hub_datasets_dir, load_texts, text_source
from hfprune.equivalence import check_margins
from hfprune.errors import ConfigError, HFPruneError
from hfprune.grid import is_point, point_values, variants
from hfprune.limits import check_model_limits
from hfprune.models import ModelSpec, architecture, checkpoint_family, model_dir
from hfprune.plan import check_feasible
from hfprune.tasks import data_files, resolve_suite
from hfprune.windows import eval_chunks, sample_windows


@lru_cache(maxsize=1)
def schema() -> dict:
    """The config schema, its family enum filled from the adapter registry (adding a family is a new adapter file
    and its registry line)."""
    sch = copy.deepcopy(config_schema())
    sch["properties"]["models"]["items"]["properties"]["family"]["enum"] = list(ADAPTERS)
    return sch


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated deep copy of `config` with defaults filled in (hfprune.config.read_config) and what it
    names checked: criteria's scope, families, text sources, tasks, every grid variant; raise ConfigError
    otherwise."""
    cfg = read_config(config, source, schema())
    if cfg["pruning"]["scope"] != "mlp":  # every criterion scores MLP neurons (and the criteria import torch)
        from hfprune.criteria import CRITERIA

        for crit in cfg["criteria"]:
            try:
                CRITERIA[crit].check_scope(cfg["pruning"]["scope"])
            except ConfigError as exc:
                raise ConfigError(f"{source}: invalid config field 'pruning.scope': {exc}") from None
    _fill_families(cfg)
    check_margins(cfg, source)
    _check_text_sources(cfg, source)
    ev = cfg["evaluation"]
    if ev["include_path"] is not None and not Path(ev["include_path"]).is_dir():
        raise ConfigError(f"{source}: invalid config field 'evaluation.include_path': {ev['include_path']!r} is not "
                          "a folder")
    if ev["suite"] != "none":  # a task or metric typo fails here, not in the first evaluate job after hours of scoring
        try:
            specs = resolve_suite(ev["suite"], ev["tasks"], ev["include_path"])
        except HFPruneError as exc:
            raise ConfigError(f"{source}: invalid config field 'evaluation.tasks': {exc}") from None
        _check_task_data(ev["task_data"], [s.task for s in specs], source)
    if cfg["grid"]:  # known axis paths, and every variant a valid config
        variants(cfg, source, validate_config)
    return cfg


def load_config(path: str | Path) -> dict:
    return validate_config(read_config_file(path), source=str(path))


def load_job_config(path: str | Path) -> dict:
    """`load_config` for a command on one grid point (a job, `compare`): a config of several variants is an
    error naming the file."""
    cfg = load_config(path)
    point_values(cfg, source=str(path))
    return cfg


def check_models(cfg: dict, source: str = "config") -> None:
    """Sources that exist, families that match them, ratios every model can reach, sequence lengths within its
    positions and scoring within the device's memory (hfprune.limits), from config.json alone; and your own texts
    long enough for their windows, with the tokenizer of each model whose folder is here; of every grid variant.

    Called where a grid starts (the Snakefile, `hfprune validate`) so that it does not find out in its plan
    jobs, after hours of scoring; single jobs meet the same errors when they load the model.
    """
    if not is_point(cfg):  # every variant: an axis such as pruning.allocation decides what is feasible
        for name, variant in variants(cfg, source, validate_config).items():
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


def _fill_families(cfg: dict) -> None:
    """A model entry without `family` gets its checkpoint's, where config.json facts are readable (embedded
    models, local folders, cached hub models); otherwise the job that downloads the model resolves it."""
    missing = [entry for entry in cfg["models"] if "family" not in entry]
    if missing:
        for entry in missing:
            family = checkpoint_family(ModelSpec.from_config(entry), cfg["resources_dir"])
            if family is not None:
                entry["family"] = family


def _check_text_sources(cfg: dict, source: str) -> None:
    """Your own texts (mappings) are read here, so a missing file, a bad JSON line, a missing field or an empty
    text fails before any job; built-in texts are packaged, hub ones are checked when their job loads them."""
    hub_dir = hub_datasets_dir(cfg)
    if hub_dir is not None and not Path(hub_dir).is_dir():
        raise ConfigError(f"{source}: invalid config field 'hub_datasets_dir': {hub_dir!r} is not a folder")
    labels: dict[str, str] = {}
    for field, value, role in text_fields(cfg):
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


def text_fields(cfg: dict) -> list[tuple[str, object, str]]:
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
    own = [(f, v, r) for f, v, r in text_fields(cfg) if not isinstance(v, str)]
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


def _check_task_data(task_data: dict, names: list[str], source: str) -> None:
    """evaluation.task_data names tasks the grid evaluates and local files that exist (not in the first
    evaluate job, after the scoring)."""
    unknown = sorted(set(task_data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: invalid config field 'evaluation.task_data': {', '.join(unknown)} not among "
                          f"the evaluated tasks ({', '.join(names)})")
    for field, path in data_files(task_data):
        if "://" not in path and not [p for p in glob.glob(path) if Path(p).is_file()]:  # a path or a pattern
            raise ConfigError(f"{source}: invalid config field {field!r}: no file {path!r}")
