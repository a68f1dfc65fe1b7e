"""Log every finished job of a config that its MLflow store lacks (missing, or left incomplete when the store
failed mid-job), from the results folder; a second run adds nothing (hfprune/sync.py)."""

from hfprune.commands import add_config_argument
from hfprune.validation import load_config

HELP = "log the finished jobs the MLflow store lacks, from the results folder (idempotent)"


def add_arguments(parser):
    add_config_argument(parser)


def run(args) -> int:
    from hfprune import sync

    cfg = load_config(args.config)
    logged = sync.sync(cfg)
    for key in logged:
        print(f"logged {key}")
    complete, line = sync.summary(cfg, args.config)
    print(f"{len(logged)} job(s) logged. {line}")
    return 0 if complete else 1
