"""Paper-format tables (markdown, CSV, LaTeX), plots and report.md of one experiment, from its metrics JSONs,
plans and score sidecars; the paper's published rows sit beside ours where a model has a matching paper_name."""

from hfprune.commands import add_config_argument
from hfprune.validation import load_config

HELP = "tables, plots and report.md of an experiment (results/<experiment>/report/)"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--out-dir", help="report folder, written atomically (default: <results>/<experiment>/report)")


def run(args) -> int:
    import time

    from hfprune import timing
    from hfprune.report import write_report

    cfg = load_config(args.config)
    start = time.perf_counter()
    path = write_report(cfg, args.out_dir)
    own = time.perf_counter() - start
    print(path)
    # benchmarks/bench_grid.py reads this line from the job's log
    print(f"report timing: {own:.2f} s of its own work (loading, statistics, tables, plots); "
          f"wall {timing.process_age():.1f} s since the process started")
    return 0
