"""Paper-format tables (markdown, CSV, LaTeX), plots and report.md of one experiment, from its metrics JSONs,
plans and score sidecars; the paper's published rows sit beside ours where a model has a matching paper_name."""

from hfprune.commands import add_config_argument
from hfprune.validation import load_config

HELP = "tables, plots and report.md of an experiment (results/<experiment>/report/)"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--out-dir", help="report folder, written atomically (default: <results>/<experiment>/report)")


def run(args) -> int:
    from hfprune.report import write_report

    print(write_report(load_config(args.config), args.out_dir))
    return 0
