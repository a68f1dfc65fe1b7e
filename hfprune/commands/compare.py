"""Paired comparison of two evaluated cells of one model and ratio, from their per-unit records: the mean
difference A - B with its 95 % CI (and over calibration draws, with >= 3 seeds), p-values of the difference and
equivalence tests (Holm-corrected as in the report), the mark, its inference target and the smallest difference
the grid can detect, per measure. The numbers are the report's Verdict table's for the same pair."""

import math

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.validation import load_job_config

HELP = "paired comparison of two cells (criteria or `dense`) from their per-unit records"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--ratio", required=True, type=float, help="the pruning ratio of the cells")
    parser.add_argument("--recovered", action="store_true", help="compare the LoRA-recovered cells")
    parser.add_argument("--seed", type=int, help="one calibration seed only (default: every seed, pooled)")
    parser.add_argument("--all", action="store_true", help="every measure, per task too (the report's CSV)")
    parser.add_argument("a", help="criterion name or `dense`")
    parser.add_argument("b", help="criterion name or `dense`")


def _cell(cfg, args, name: str):
    from hfprune import comparisons
    from hfprune.errors import ConfigError

    records = comparisons.load_cell(cfg, args.model, name, args.ratio, args.recovered)
    if args.seed is not None and name != comparisons.DENSE and len(records) > 1:
        if args.seed not in records:
            raise ConfigError(f"cell {name!r} has no calibration seed {args.seed} (seeds: {sorted(records)})")
        records = {args.seed: records[args.seed]}
    return records


def run(args) -> int:
    import pandas as pd

    from hfprune import comparisons
    from hfprune.config import baseline_criterion, format_ratio, model_entry
    from hfprune.errors import ConfigError
    from hfprune.report.verdicts import verdict_tables

    cfg = load_job_config(args.config)
    model_entry(cfg, args.model)
    if format_ratio(args.ratio) not in {format_ratio(r) for r in cfg["ratios"]}:
        raise ConfigError(f"--ratio {args.ratio} is not one of the config's ratios "
                          f"({', '.join(map(format_ratio, cfg['ratios']))})")
    if args.a == args.b:
        raise ConfigError(f"compare needs two different cells, got {args.a!r} twice")
    for name in (args.a, args.b):
        if name != comparisons.DENSE and name not in cfg["criteria"]:
            raise ConfigError(f"cell {name!r} is not in the config's criteria ({', '.join(cfg['criteria'])}) "
                              "and is not `dense`")
    cells = {args.a: _cell(cfg, args, args.a), args.b: _cell(cfg, args, args.b)}
    ratio = format_ratio(args.ratio)
    family = "this pair's measures"
    table = pd.DataFrame()
    if args.seed is None and args.a != comparisons.DENSE:
        # the report's Holm family for this pair: every criterion vs the baseline, or vs the dense model
        which = ("baseline" if args.b == baseline_criterion(cfg)
                 else "dense" if args.b == comparisons.DENSE else None)
        if which is not None:
            from hfprune.report.loading import load_records

            names = [*cfg["criteria"], comparisons.DENSE]
            rows = pd.DataFrame([{"model": args.model, "criterion": c, "ratio": 0.0 if c == comparisons.DENSE
                                  else args.ratio, "recovered": args.recovered and c != comparisons.DENSE}
                                 for c in names])
            full = verdict_tables(cfg, load_records(cfg, args.model, rows), ratio, args.recovered,
                                  headline=not args.all)[which]
            table = full[(full["a"] == args.a) & (full["b"] == args.b)] if not full.empty else full
            family = f"the report's table of every criterion vs {args.b}"
    if table.empty:
        from hfprune.equivalence import margins

        table = comparisons.comparison_table(cells, [(args.a, args.b)], headline=not args.all, margins=margins(cfg),
                                             seed_effect=cfg["report"]["seed_effect"])
    out = pd.DataFrame({
        "measure": table["label"],
        "Δ A−B [95 % CI]": [comparisons.format_difference(r) for _, r in table.iterrows()],
        "over draws [95 % CI]": [f"[{comparisons.format_value(r['lo_draws'], r['scale'])}, "
                                 f"{comparisons.format_value(r['hi_draws'], r['scale'])}]"
                                 if math.isfinite(r["lo_draws"]) else f"not estimable ({r['pairs']} seeds)"
                                 for _, r in table.iterrows()],
        "margin": [comparisons.format_value(m, s).lstrip("+") for m, s in zip(table["margin"], table["scale"])],
        "p": table["p"].map(lambda p: f"{p:.3g}"), "p (Holm)": table["p_holm"].map(lambda p: f"{p:.3g}"),
        "p TOST (Holm)": table["p_tost_holm"].map(lambda p: f"{p:.3g}"),
        "mark": table["verdict"], "target": table["target"], "n": table["n"], "clusters": table["clusters"],
        "seed pairs": table["pairs"],
        "smallest detectable": [comparisons.format_value(m, s).lstrip("+") for m, s in zip(table["mde"],
                                                                                          table["scale"])]})
    print(f"{args.model}, ratio {ratio}{' +LoRA' if args.recovered else ''}: {args.a} − {args.b} "
          f"(accuracies in percentage points; Holm over {family})")
    print(out.to_markdown(index=False, disable_numparse=True))
    return 0
