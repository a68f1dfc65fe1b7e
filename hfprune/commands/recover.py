"""LoRA recovery fine-tuning of a pruned model: prune the config's model by a plan, train LoRA adapters with the
config's `recovery` settings and write OUT/ (an HF checkpoint with pruned shapes, loadable with
hfprune.surgery.load_pruned) + OUT/recovery.json (loss per step, settings, data). `recovery.recipe: compact`
merges the adapters into the checkpoint; `released` (the released HFPrune scripts' recipe) saves the checkpoint
untouched and the adapter unmerged in OUT/adapter/ (hfprune.recovery.load_recovered loads both).
The offline default data (`recovery.data: calibration`) is a smoke recovery; `lamini` is the paper's.

Processes: --nproc, else $HFPRUNE_RECOVER_NPROC, else resources.gpus_per_job of `recover` (1 on CPU). With more
than one the command replaces itself by `torchrun --standalone --nproc_per_node N` running the same command
(DDP through accelerate; torchrun forwards SIGTERM to every process, which checkpoint and stop)."""

import os
import sys

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.validation import load_job_config

HELP = "LoRA recovery fine-tuning of a pruned model; saves the checkpoint (merged, or + unmerged adapter) + recovery.json"
NPROC_ENV = "HFPRUNE_RECOVER_NPROC"
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--plan", required=True, help="plan JSON (from `hfprune plan`) to prune the model by")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--nproc", type=int, help=f"training processes (default: ${NPROC_ENV}, else "
                        "resources.gpus_per_job of recover on GPUs, 1 on CPU)")


def processes(cfg: dict, args) -> int:
    from hfprune.config import gpus_per_job
    from hfprune.errors import ConfigError

    n = args.nproc or os.environ.get(NPROC_ENV) or max(1, gpus_per_job(cfg, args.model, "recover"))
    try:
        n = int(n)
    except ValueError:
        raise ConfigError(f"${NPROC_ENV}={n!r} is not a number of processes") from None
    if n < 1:
        raise ConfigError(f"--nproc / ${NPROC_ENV}: {n} processes; give at least 1")
    return n


def run(args) -> int:
    from hfprune import tracking
    from hfprune.limits import check_job
    from hfprune.recovery import resume_point, run_recovery
    from hfprune.recovery_steps import accumulation

    cfg = load_job_config(args.config)
    check_job(cfg, args.model, "recover", source=args.config)
    n = processes(cfg, args)
    accumulation(cfg["recovery"], n)  # rows per step that do not split: one line, before any process starts
    if n > 1 and "LOCAL_RANK" not in os.environ:
        # torchrun forwards these to every process (and waits up to the timeout for their checkpoint)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               f"--signals_to_handle={TORCHRUN_SIGNALS}", "--shutdown_timeout=300", "-m", "hfprune.cli", "recover",
               "--config", args.config, "--model", args.model, "--plan", args.plan, "--out", args.out]
        sys.stdout.flush()
        os.execv(sys.executable, cmd)
    if int(os.environ.get("RANK", "0")) != 0:  # only the main process tracks, logs and writes
        run_recovery(cfg, args.model, args.plan, args.out)
        return 0
    resume = resume_point(cfg, args.model, args.plan, args.out)[1] if os.path.isfile(args.plan) else None
    with tracking.cell_run(cfg, args.model, "recover", args.plan, recovered=True, output=args.out,
                           resume_run_id=resume and resume.get("run_id")) as mlflow_run:
        summary = run_recovery(cfg, args.model, args.plan, args.out, run_id=mlflow_run.run_id,
                               progress=lambda step, metrics: mlflow_run.log_metrics(metrics, step=step))
        tracking.log_recovery(mlflow_run, summary, args.out)
    losses = summary["loss_curve"]
    print(f"{args.out}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"{summary['seconds']:.1f} s" + (f", resumed from step {summary['resumed_from_step']}"
                                           if summary["resumed_from_step"] else ""))
    return 0
