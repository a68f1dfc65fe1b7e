"""Estimate a grid's cost before it runs: per model and kind of job, parameters, tokens, FLOPs, peak memory and
time, and the grid's jobs and GPU-hours per stage. Estimates, not measurements: hfprune.estimates names the
FLOP, memory and time models and the Table 5 calibration."""

from types import SimpleNamespace

from hfprune.config import load_config, model_entry
from hfprune.errors import ConfigError, HFPruneError

HELP = "estimate FLOPs, peak memory and GPU-hours per model and stage before running a grid"


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="config YAML")
    parser.add_argument("--model", help="one model of the config (default: every model)")
    parser.add_argument("--tflops", type=float,
                        help="your GPU's effective bf16 TFLOP/s (default: the paper's GPU, calibrated on Table 5)")
    parser.add_argument("--arch-json", metavar="FILE",
                        help="config.json of --model, for a hub model whose config is not cached here")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")


def _architecture(cfg: dict, name: str, arch_json: str | None):
    from hfprune.limits import job_architecture
    from hfprune.runtime import read_json

    if arch_json is not None:
        return SimpleNamespace(**read_json(arch_json, "model config"))
    try:
        return job_architecture(cfg, name)
    except OSError as exc:  # a hub model not cached, and no hub reachable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HFPruneError(f"model {name!r}: its config.json is not cached here and could not be fetched ({first}); "
                           "pass --model with --arch-json FILE") from None


def run(args) -> int:
    from hfprune import estimates

    cfg = load_config(args.config)
    if args.tflops is not None and not args.tflops > 0:
        raise ConfigError(f"--tflops must be a positive number of TFLOP/s, got {args.tflops}")
    if args.arch_json is not None and args.model is None:
        raise ConfigError("--arch-json describes one model: name it with --model")
    names = [model_entry(cfg, args.model)["name"]] if args.model else [m["name"] for m in cfg["models"]]
    archs = {name: _architecture(cfg, name, args.arch_json) for name in names}
    df = estimates.grid_table(cfg, archs, args.tflops)
    print(estimates.header(args.tflops))
    print()
    print(estimates.format_table(df, args.markdown))
    print()
    print(estimates.format_totals(estimates.stage_totals(df), args.markdown))
    for note in estimates.notes(cfg, df, args.tflops):
        print(f"note: {note}")
    if cfg["device"] != "cpu":
        from hfprune.resources import gpu_suggestions

        for line in gpu_suggestions(cfg, df):
            print(f"gpus: {line}")
    return 0
