"""Evaluate one grid cell (dense, base model + plan pruned in memory, or a recovered folder) and write its
metrics JSON: lm-eval zero-shot accuracy, perplexity, fidelity to the dense model and efficiency."""

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.validation import load_job_config

HELP = "zero-shot accuracy, perplexity, fidelity and speed of one cell -> metrics JSON"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--plan", help="plan JSON; the base model is pruned in memory (omit for the dense row)")
    parser.add_argument("--recovered", help="merged recovered model folder (needs --plan, which names the cell)")
    parser.add_argument("--out", required=True, help="metrics JSON to write (atomically)")


def run(args) -> int:
    import time

    from hfprune import timing, tracking
    from hfprune.evaluation import run_evaluation
    from hfprune.limits import check_job

    cfg = load_job_config(args.config)
    check_job(cfg, args.model, "evaluate", source=args.config)
    start = time.perf_counter()
    with tracking.cell_run(cfg, args.model, "evaluate", args.plan, recovered=args.recovered is not None,
                           output=args.out) as mlflow_run:
        timing.add("tracking", time.perf_counter() - start)
        result = run_evaluation(cfg, args.model, plan_path=args.plan, recovered_dir=args.recovered, out_path=args.out)
        tracking.log_cell_metrics(mlflow_run, result, args.out)
    print(f"{args.out}: average {result['average']}, "
          + ", ".join(f"ppl/{s} {v['ppl']:.3f}" for s, v in result["perplexity"].items()))
    print(timing.line(result["meta"]["timing"], wall=timing.process_age()))  # "other": uploads and closing too
    return 0
