"""Estimate a grid's cost before it runs: per model and kind of job, parameters, tokens, FLOPs, peak memory and
time, and the grid's jobs and GPU-hours per stage. Estimates, not measurements: hfprune.estimates names the
FLOP, memory and time models and the Table 5 calibration."""

from types import SimpleNamespace

from hfprune.config import model_entry
from hfprune.errors import ConfigError, HFPruneError
from hfprune.validation import load_config

HELP = ("estimate FLOPs, peak memory and GPU-hours per model and stage before running a grid; --power: the units "
        "that would decide a grid's undecided verdicts")


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="config YAML")
    parser.add_argument("--model", help="one model of the config (default: every model)")
    parser.add_argument("--tflops", type=float,
                        help="your GPU's effective bf16 TFLOP/s (default: the paper's GPU, calibrated on Table 5)")
    parser.add_argument("--arch-json", metavar="FILE",
                        help="config.json of --model, for a hub model whose config is not cached here")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--power", action="store_true",
                        help="for a grid that has run: the units and seeds that would decide each undecided "
                             "comparison vs the baseline (80 %% power at its margin) and their cost")


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
    from hfprune import job_estimates

    cfg = load_config(args.config)
    if args.tflops is not None and not args.tflops > 0:
        raise ConfigError(f"--tflops must be a positive number of TFLOP/s, got {args.tflops}")
    if args.arch_json is not None and args.model is None:
        raise ConfigError("--arch-json describes one model: name it with --model")
    names = [model_entry(cfg, args.model)["name"]] if args.model else [m["name"] for m in cfg["models"]]
    if args.power:
        return _power_plan(cfg, names, args.tflops)
    archs = {name: _architecture(cfg, name, args.arch_json) for name in names}
    rate, source = args.tflops, None
    if rate is None and cfg["device"] == "cpu":  # a CPU grid that has run prices at its own measured rate
        from hfprune.power import measured_tflops

        rate, source = measured_tflops(cfg, job_estimates.grid_table(cfg, archs)) or (None, None)
        source = source and f"{source} (the GPU-h columns are then CPU hours)"
    df = job_estimates.grid_table(cfg, archs, rate)
    print(job_estimates.header(rate, source))
    print()
    print(job_estimates.format_table(df, args.markdown))
    print()
    print(job_estimates.format_totals(job_estimates.stage_totals(df), args.markdown))
    for note in job_estimates.notes(cfg, df, rate):
        print(f"note: {note}")
    if cfg["device"] != "cpu":
        from hfprune.resources import gpu_suggestions

        for line in gpu_suggestions(cfg, df):
            print(f"gpus: {line}")
    return 0


def _power_plan(cfg: dict, names: list[str], tflops: float | None) -> int:
    """The report's power plans (hfprune.power) of every evaluated model x ratio of the config."""
    from hfprune import grid, verdict_notes
    from hfprune.config import baseline_criterion
    from hfprune.plan import format_ratio
    from hfprune.report.loading import aggregate, experiment_dir, load_records, load_runs
    from hfprune.report.verdicts import verdict_tables

    printed = False
    for variant, vcfg in grid.variants(cfg).items():
        runs, _columns, _missing = load_runs(vcfg)
        if runs.empty:
            continue
        cells = aggregate(runs)
        for model in names:
            records = load_records(vcfg, model, cells)
            costs, note = verdict_notes.power_costs(vcfg, model, tflops)
            for recovered in (False, True) if vcfg["recovery"]["enabled"] else (False,):
                for ratio in map(format_ratio, vcfg["ratios"]):
                    table = verdict_tables(vcfg, records, ratio, recovered)["baseline"]
                    if table.empty:
                        continue
                    print(f"## {f'variant {variant}: ' if variant else ''}{model}, ratio {ratio}"
                          f"{' +LoRA' if recovered else ''}, vs {baseline_criterion(vcfg)}\n")
                    print("\n".join(verdict_notes.power_plan_lines(table, costs, note)))
                    printed = True
    if not printed:
        raise HFPruneError(f"--power needs a grid that has run: no evaluated cells of this config under "
                           f"{experiment_dir(cfg)}; run it first (or drop --power for the a-priori estimate)")
    return 0
