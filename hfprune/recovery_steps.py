"""Recovery's step arithmetic from the config alone (no torch): rows per optimizer step, micro-batches per process,
steps of a job. The trainer, the recover command and hfprune.estimates share it."""

from __future__ import annotations

import math

from hfprune.errors import ConfigError

CE_CHUNK_BYTES = 2**28  # fp32 logits of one cross-entropy chunk (256 MiB): full-vocabulary logits never exist


def rows_per_step(rcfg: dict) -> int:
    return rcfg.get("rows_per_step") or rcfg["batch_size"] * rcfg["grad_accum"]


def accumulation(rcfg: dict, processes: int) -> int:
    """Micro-batches per process per step: rows_per_step / (processes x batch_size), which must divide."""
    rows, bs = rows_per_step(rcfg), rcfg["batch_size"]
    if rows % (processes * bs):
        raise ConfigError(f"recovery.rows_per_step: {rows} rows per step do not split into {processes} processes x "
                          f"batch_size {bs}; make it a multiple of {processes * bs}")
    return rows // (processes * bs)


def check_settings(rcfg: dict) -> None:
    """Step settings that the schema cannot express (it rejects non-positive values of each field)."""
    max_steps, epochs = rcfg.get("max_steps"), rcfg.get("epochs")
    if max_steps is None and epochs is None:
        raise ConfigError("recovery: set recovery.max_steps or recovery.epochs (both are null)")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"recovery.max_steps must be a positive number of steps, got {max_steps}")
    if max_steps is None and epochs <= 0:
        raise ConfigError(f"recovery.epochs must be positive, got {epochs}")


def num_steps(rcfg: dict, num_rows: int) -> int:
    """Optimizer steps: `max_steps` if set, else `epochs` passes over the rows (rounded up), each step taking
    `rows_per_step` rows in micro-batches of `batch_size`."""
    check_settings(rcfg)
    if rcfg.get("max_steps") is not None:
        return rcfg["max_steps"]
    micro_batches = math.ceil(num_rows / rcfg["batch_size"])
    return max(1, math.ceil(rcfg["epochs"] * micro_batches / (rows_per_step(rcfg) // rcfg["batch_size"])))
