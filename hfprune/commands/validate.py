"""Validate a config file against the schema and print it with defaults (and models' families) filled in; with
--tracking, check instead that every finished job in its results folder has a FINISHED MLflow run."""

import sys

import yaml

from hfprune.validation import check_models, load_config

HELP = "validate a config (schema + semantic checks) and print it with defaults; --tracking: MLflow completeness"


def add_arguments(parser):
    parser.add_argument("config", help="config YAML")
    parser.add_argument("--tracking", action="store_true",
                        help="compare the finished jobs in the results folder with the runs in the MLflow store; "
                             "exit 1 naming each job that is missing or not FINISHED")


def run(args) -> int:
    cfg = load_config(args.config)
    if args.tracking:
        from hfprune import sync

        complete, line = sync.summary(cfg, args.config)
        print(line)
        return 0 if complete else 1
    check_models(cfg, source=args.config)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    for entry in cfg["models"]:
        if "family" not in entry:  # check_models passed: a hub model that is not in the local cache yet
            print(f"models: {entry['name']!r}: family not known until {entry['source']!r} is downloaded; "
                  "its first job resolves it", file=sys.stderr)
    return 0
