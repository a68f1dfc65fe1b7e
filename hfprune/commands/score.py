"""Score every MLP neuron of one model with one criterion; writes <out>.safetensors + <out>.json (sidecar)."""

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.config import with_seed
from hfprune.validation import load_job_config

HELP = "score MLP neurons of a model with a criterion (once per model x criterion)"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--criterion", required=True, help="a criterion name (see the config schema)")
    parser.add_argument("--seed", type=int, help="calibration seed (default: the model's first calibration seed)")
    parser.add_argument("--ratio", type=float, help="the pruning ratio the scores serve: needed by a criterion with "
                        "per-ratio options (criterion_options.<c>.by_ratio), ignored by the others")
    parser.add_argument("--out", required=True, help="output PATH.safetensors (sidecar PATH.json next to it)")


def run(args) -> int:
    import time

    from hfprune import timing, tracking
    from hfprune.limits import check_job
    from hfprune.scorer import run_scoring

    cfg = with_seed(load_job_config(args.config), args.model, args.seed)
    check_job(cfg, args.model, "score", [args.criterion], source=args.config)  # before any weight or MLflow run
    start = time.perf_counter()
    with tracking.stage_run(cfg, model=args.model, stage="score", criterion=args.criterion,
                            output=args.out) as mlflow_run:
        timing.add("tracking", time.perf_counter() - start)
        summary = run_scoring(cfg, args.model, args.criterion, args.out, ratio=args.ratio)
        tracking.log_scores(mlflow_run, args.out)
    print(f"{args.out}: {summary['tokens']} tokens, {summary['seconds']} s, peak {summary['peak_memory_mb']} MiB")
    print(timing.line(summary["timing"], wall=timing.process_age()))  # "other": uploads and closing too
    return 0
