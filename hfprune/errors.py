"""Errors that carry a message meant for the user (the CLI prints them without a traceback)."""


class HFPruneError(Exception):
    """Base class: bad input, a missing asset, an invalid config value."""


class AssetError(HFPruneError):
    """A packaged model or dataset is missing, corrupted or unknown."""


class ConfigError(HFPruneError):
    """A config value is invalid; the message names the field."""


class UnsupportedModelError(HFPruneError):
    """The architecture has no adapter; the message lists the supported ones."""


class ScoreError(HFPruneError):
    """Scoring produced NaN/inf or could not run."""


def stop_workflow(error: HFPruneError):
    """End a Snakemake run with the error's own lines, without Snakemake's traceback of the Snakefile."""
    raise SystemExit(f"hfprune workflow: error: {error}")
