"""Physically prune a model with a plan and save it as an HF folder (uniform plans load with plain HF)."""

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.config import model_entry
from hfprune.validation import load_job_config

HELP = "apply a plan: slice the model's Linear layers and save the pruned checkpoint"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--plan", required=True, help="plan JSON written by `hfprune plan`")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> int:
    from transformers import AutoConfig

    from hfprune.models import ModelSpec, ensure_available, load_model
    from hfprune.surgery import prune_model, read_plan, save_pruned

    cfg = load_job_config(args.config)
    spec = ModelSpec.from_config(model_entry(cfg, args.model))
    plan = read_plan(args.plan, spec.name, AutoConfig.from_pretrained(ensure_available(spec, cfg["resources_dir"])))
    model, tok = load_model(spec, cfg["resources_dir"], dtype=cfg["dtype"])
    prune_model(model, plan)
    save_pruned(model, tok, args.out)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters())} parameters")
    return 0
