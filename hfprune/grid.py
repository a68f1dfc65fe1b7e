"""Grid axes (config `grid:`): dotted config paths -> value lists, expanded into variants.

The cartesian product of the axes is the set of variants. A variant is named by its axis values in grid order,
`<dotted path>-<value>` joined by `_` (e.g. `calibration.num_sequences-8_pruning.allocation-global`); a config
without `grid` has one variant, named "" (paths as without a grid; "default" in MLflow).

Each job depends only on the axes its stage chain reads (`CHAINS`, `READS`): a job's variant is the variant
projected onto those axes, so variants that differ only in an evaluation setting share their score and plan files,
and an allocation axis re-plans without rescoring. A variant's (or a projection's) config is the base config with
those axis values applied and `grid` narrowed to them (one value per axis): a "point", which names itself.
"""

from __future__ import annotations

import copy
import itertools
import json
import re

from hfprune.config import read_config, schema
from hfprune.errors import ConfigError

# the grid's own axes and per-experiment settings (which jobs exist, their resources): not something a variant
# can vary
FIXED = ("experiment", "results_dir", "resources_dir", "models", "criteria", "ratios", "calibration.seed",
         "calibration.seeds", "recovery.enabled", "device", "tracking", "report", "grid", "resources")
COMPUTE = ("seed", "dtype", "device", "device_map", "attn_implementation")
# settings under READS that say how a job runs, not what it computes: out of the jobs' settings digest
OPERATIONAL = ("evaluation.max_batch_tokens",)
# what a score job reads of `calibration`: its seed is the job's `seed` wildcard, not the seeds list
CALIBRATION = ("calibration.source", "calibration.sampling", "calibration.num_sequences", "calibration.seq_len",
               "calibration.batch_size")
# what a recover job reads of `recovery`: not how it runs (hfprune.checkpoints.OPERATIONAL: strategy,
# checkpoint_every, gradient_checkpointing, log_every), so changing that reruns nothing and a checkpoint stays valid
RECOVERY = tuple(f"recovery.{k}" for k in ("data", "recipe", "max_steps", "epochs", "seq_len", "batch_size",
                                            "grad_accum", "learning_rate", "schedule", "warmup_steps", "num_samples",
                                            "rows_per_step", "lora"))
# a variant names a folder and its config `configs/<name>.yaml`: 255 bytes per file name on common filesystems
MAX_NAME_BYTES = 250
OPTIONS = "criterion_options.{criterion}"  # a score job reads its own criterion's options only
# what each stage reads of the config itself (its inputs' settings come with its inputs)
READS = {
    "score": (*CALIBRATION, "scoring", "pruning.scope", OPTIONS, *COMPUTE),
    "plan": ("pruning",),
    "recover": (*RECOVERY, *COMPUTE),
    "evaluate": ("evaluation", *COMPUTE),
}
# the stages a job's output depends on, itself included
CHAINS = {
    "score": ("score",),
    "plan": ("score", "plan"),
    "recover": ("score", "plan", "recover"),
    "evaluate_dense": ("evaluate",),
    "evaluate_pruned": ("score", "plan", "evaluate"),
    "evaluate_recovered": ("score", "plan", "recover", "evaluate"),
}


def _overlaps(a: str, b: str) -> bool:
    """One dotted path equals the other or lies under it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _schema_node(path: str) -> dict | None:
    node = schema()
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def digest_value(key: str, value):
    """The value of config `key` as a job's settings digest sees it: without the OPERATIONAL settings under it."""
    drop = [p[len(key) + 1:].split(".") for p in OPERATIONAL if p.startswith(key + ".")]
    if not drop or not isinstance(value, dict):
        return value
    value = copy.deepcopy(value)
    for *parents, leaf in drop:
        node = value
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    return value


def axes(cfg: dict) -> dict[str, list]:
    return dict(cfg.get("grid") or {})


def check_axes(cfg: dict, source: str = "config") -> None:
    """Each axis is a known config path a variant may vary, and no axis lies under another (values are checked
    by `variants`)."""
    paths = list(axes(cfg))
    for path in paths:
        where = f"{source}: invalid config field 'grid.{path}'"
        if _schema_node(path) is None:
            raise ConfigError(f"{where}: {path!r} is not a config path (a dotted path of the config schema, e.g. "
                              "pruning.allocation or criterion_options.taylor_entropy_topk.k)")
        fixed = next((f for f in FIXED if _overlaps(path, f)), None)
        if fixed is not None:
            raise ConfigError(f"{where}: {fixed} cannot be a grid axis (models, criteria, ratios and "
                              "calibration.seeds are axes of their own; the rest is one per experiment)")
        other = next((p for p in paths if p != path and _overlaps(path, p)), None)
        if other is not None:
            raise ConfigError(f"{where}: overlaps the axis {other!r}")


def _slug(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"


def name(values: dict) -> str:
    """`<path>-<value>` of each axis joined by `_` (filesystem-safe); "" for no axes."""
    return "_".join(f"{path}-{_slug(value)}" for path, value in values.items())


def _apply(cfg: dict, values: dict) -> dict:
    out = copy.deepcopy(cfg)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return out


def point(cfg: dict, values: dict, source: str = "config", validate=read_config) -> dict:
    """The validated config of one combination of axis values (all axes or a projection): the base config with
    them applied and `grid` narrowed to them. `validate` checks it (hfprune.validation passes its own checks)."""
    out = validate(_apply({**cfg, "grid": {}}, values), source=source)
    out["grid"] = {path: [value] for path, value in values.items()}
    return out


def variants(cfg: dict, source: str = "config", validate=read_config) -> dict[str, dict]:
    """{variant name: its validated config} of the cartesian product of the axes ({"": cfg} without a grid).
    An axis value the schema rejects is a one-line error naming the axis and the value."""
    grid = axes(cfg)
    if not grid:
        return {"": cfg}
    check_axes(cfg, source)
    for path, values in grid.items():
        for value in values:
            try:
                point(cfg, {path: value}, source, validate)
            except ConfigError as exc:
                first = str(exc).splitlines()[0].removeprefix(f"{source}: ")
                raise ConfigError(f"{source}: invalid config field 'grid.{path}': value {value!r}: {first}") from None
    combos = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    names = [name(values) for values in combos]
    if len(set(names)) < len(names):  # values that differ only in odd characters
        raise ConfigError(f"{source}: invalid config field 'grid': values {grid} do not give distinct variant names")
    longest = max(names, key=lambda n: len(n.encode()))
    if len(longest.encode()) > MAX_NAME_BYTES:  # a folder and a `<name>.yaml`: a file name holds 255 bytes
        raise ConfigError(f"{source}: invalid config field 'grid': the variant name {longest[:60]!r}... is "
                          f"{len(longest.encode())} bytes, over the {MAX_NAME_BYTES} a folder name can take here; "
                          "use fewer axes or shorter values")
    return {n: point(cfg, values, f"{source} (grid variant {n})", validate) for n, values in zip(names, combos)}


def is_point(cfg: dict) -> bool:
    return all(len(values) == 1 for values in axes(cfg).values())


def point_values(cfg: dict, source: str = "config") -> dict:
    """{axis path: value} of a point config; a config with several variants is an error (a job runs one)."""
    if not is_point(cfg):
        n = len(list(itertools.product(*axes(cfg).values())))
        raise ConfigError(f"{source}: the grid has {n} variants and this command takes one: pass a variant's "
                          "config (<results_dir>/<experiment>/configs/<variant>.yaml, written by the workflow)")
    return {path: vals[0] for path, vals in axes(cfg).items()}


def depends(path: str, chain: str, criterion: str | None = None) -> bool:
    """Whether a job of `chain` (CHAINS) on `criterion` reads the axis `path` (itself or through its inputs)."""
    reads = [key.format(criterion=criterion) for stage in CHAINS[chain] for key in READS[stage]
             if criterion is not None or key != OPTIONS]
    return any(_overlaps(path, key) for key in reads)


def projection(cfg: dict, chain: str, criterion: str | None = None) -> dict:
    """The axis values of a point config that a job of `chain` depends on."""
    return {path: value for path, value in point_values(cfg).items() if depends(path, chain, criterion)}


def folder(point_name: str) -> str:
    """A point's path component: "<name>/", or "" for the point without axes (paths as without a grid)."""
    return f"{point_name}/" if point_name else ""


def folder_name(point_folder: str) -> str:
    return point_folder.removesuffix("/")


def variant_dir(cfg: dict, chain: str, criterion: str | None = None) -> str:
    """The path component of a job's outputs: the folder of its projected variant."""
    return folder(name(projection(cfg, chain, criterion)))


def points(cfg: dict, source: str = "config") -> dict[str, dict]:
    """{name: config} of every variant and every projection a job runs with ({"": cfg} without a grid)."""
    full = variants(cfg, source)
    if not axes(cfg):
        return full
    out = dict(full)
    for vcfg in full.values():
        for chain, stages in CHAINS.items():
            for criterion in cfg["criteria"] if "score" in stages else [None]:
                projected = projection(vcfg, chain, criterion)
                if name(projected) not in out:
                    out[name(projected)] = point(cfg, projected, source)
    return out
