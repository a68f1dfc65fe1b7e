"""Validate a config file against the schema and print it with defaults filled in."""

import yaml

from hfprune.config import check_models, load_config

HELP = "validate a config (schema + semantic checks) and print it with defaults"


def add_arguments(parser):
    parser.add_argument("config", help="config YAML")


def run(args) -> int:
    cfg = load_config(args.config)
    check_models(cfg, source=args.config)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    return 0
