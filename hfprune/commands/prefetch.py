"""Download, on a machine with network, every hub model, dataset and lm-eval task file the config's grid will read,
into the cache its jobs use (HF_HOME); then run the grid with HF_HUB_OFFLINE=1 (docs/SLURM.md)."""

from hfprune.commands import add_config_argument
from hfprune.validation import load_config

HELP = "download every hub model, dataset and task file a grid reads (run on a login node, then go offline)"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched, fetch nothing")


def run(args) -> int:
    from huggingface_hub import constants

    from hfprune.prefetch import fetch, go_online, hub_needs

    cfg = load_config(args.config)
    needs = hub_needs(cfg)
    if not needs:
        print(f"{args.config}: nothing to fetch: every model, text and task of the grid is local or embedded")
        return 0
    if not args.dry_run:
        go_online()
    for need in needs:
        print(f"{'would fetch' if args.dry_run else 'fetching'} {need.kind} {need.name}", flush=True)
        if not args.dry_run:
            fetch(need)
    if not args.dry_run:
        print(f"{len(needs)} fetched into {constants.HF_HOME}; run the grid with HF_HUB_OFFLINE=1 and the same HF_HOME")
    return 0
