"""LoRA recovery fine-tuning of a pruned model: prune the config's model by a plan, train LoRA adapters with the
config's `recovery` settings and write OUT/ (an HF checkpoint with pruned shapes, loadable with
hfprune.surgery.load_pruned) + OUT/recovery.json (loss per step, settings, data). `recovery.recipe: compact`
merges the adapters into the checkpoint; `released` (the released HFPrune scripts' recipe) saves the checkpoint
untouched and the adapter unmerged in OUT/adapter/ (hfprune.recovery.load_recovered loads both).
The offline default data (`recovery.data: calibration`) is a smoke recovery; `lamini` is the paper's."""

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.config import load_job_config

HELP = "LoRA recovery fine-tuning of a pruned model; saves the checkpoint (merged, or + unmerged adapter) + recovery.json"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--plan", required=True, help="plan JSON (from `hfprune plan`) to prune the model by")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")


def run(args) -> int:
    from hfprune import tracking
    from hfprune.limits import check_job
    from hfprune.recovery import run_recovery

    cfg = load_job_config(args.config)
    check_job(cfg, args.model, "recover", source=args.config)
    with tracking.cell_run(cfg, args.model, "recover", args.plan, recovered=True, output=args.out) as mlflow_run:
        summary = run_recovery(cfg, args.model, args.plan, args.out)
        tracking.log_recovery(mlflow_run, summary, args.out)
    losses = summary["loss_curve"]
    print(f"{args.out}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"{summary['seconds']:.1f} s")
    return 0
