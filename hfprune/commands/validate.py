"""Validate a config file against the schema and print it with defaults (and models' families) filled in."""

import sys

import yaml

from hfprune.validation import check_models, load_config

HELP = "validate a config (schema + semantic checks) and print it with defaults"


def add_arguments(parser):
    parser.add_argument("config", help="config YAML")


def run(args) -> int:
    cfg = load_config(args.config)
    check_models(cfg, source=args.config)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    for entry in cfg["models"]:
        if "family" not in entry:  # check_models passed: a hub model that is not in the local cache yet
            print(f"models: {entry['name']!r}: family not known until {entry['source']!r} is downloaded; "
                  "its first job resolves it", file=sys.stderr)
    return 0
