"""CLI commands; each module defines HELP, add_arguments(parser) and run(args) -> int."""

from __future__ import annotations

import argparse


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment config YAML (validated against the schema)")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model `name` from the config's models list")
