"""Paper-format tables (markdown, CSV, LaTeX), plots and report.md of one experiment, from its metrics JSONs,
plans and score sidecars; the paper's published rows sit beside ours where a model has a matching paper_name.
With --tracking (the workflow's report job) and tracking on, `hfprune sync` runs first (when the store is
reachable), the report's header says whether every finished job has its MLflow run, and each model's parent run
gets the report and its verdict tables."""

import logging

from hfprune.commands import add_config_argument
from hfprune.validation import load_config

HELP = "tables, plots and report.md of an experiment (results/<experiment>/report/)"
log = logging.getLogger(__name__)


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--out-dir", help="report folder, written atomically (default: <results>/<experiment>/report)")
    parser.add_argument("--tracking", action="store_true", help="sync the MLflow store first, say in the header "
                        "whether it is complete, and log the report to each model's parent run")


def run(args) -> int:
    import time

    from hfprune import sync, timing
    from hfprune.report.assembly import write_report

    cfg = load_config(args.config)
    notes, reachable = sync.report_notes(cfg, args.config) if args.tracking else ([], False)
    for line in notes[:1]:  # bold: a gap or an unchecked store
        log.log(logging.WARNING if line.startswith("**") else logging.INFO, "%s", line.replace("**", ""))
    start = time.perf_counter()
    path = write_report(cfg, args.out_dir, notes=notes)
    own = time.perf_counter() - start
    if reachable:
        try:
            sync.log_report(cfg, path.parent)
        except Exception as exc:  # noqa: BLE001 - the report is written; a failing store costs its artifacts only
            log.warning("MLflow: the report could not be logged to the parent runs (%s: %s)", type(exc).__name__, exc)
    print(path)
    # benchmarks/bench_grid.py reads this line from the job's log (the sync before and the upload after are not
    # the report's own work)
    print(f"report timing: {own:.2f} s of its own work (loading, statistics, tables, plots); "
          f"wall {timing.process_age():.1f} s since the process started")
    return 0
