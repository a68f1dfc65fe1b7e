"""Materialise the config's embedded packaged models as safetensors folders under <resources_dir>/models/."""

from hfprune.commands import add_config_argument
from hfprune.config import load_config, model_entry
from hfprune.models import ModelSpec, ensure_available

HELP = "turn packaged GGUF models into safetensors folders (checksummed, once)"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--model", action="append", help="only this model name (repeatable; default: all)")


def run(args) -> int:
    cfg = load_config(args.config)
    names = args.model or [m["name"] for m in cfg["models"]]
    for name in names:
        spec = ModelSpec.from_config(model_entry(cfg, name))
        print(f"{name}: {ensure_available(spec, cfg['resources_dir'])}")
    return 0
