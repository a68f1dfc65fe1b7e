"""The report's markdown assembly: header, verdict sections, each model's table and plot sections, the grid summary,
and `write_report`, which writes the whole folder atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hfprune import comparisons, grid, verdict_notes
from hfprune.config import baseline_criterion
from hfprune.data import source_label
from hfprune.errors import HFPruneError
from hfprune.plan import format_ratio
from hfprune.plots import plot_neurons_kept
from hfprune.report.loading import (
    CELL_KEYS,
    _params_from_plans,
    aggregate,
    experiment_dir,
    load_plans,
    load_records,
    load_runs,
    reference,
    scoring_cost,
)
from hfprune.report.paper_tables import ablation_table, efficiency_table, fidelity_table, main_table
from hfprune.report.plots import plot_forest, plot_metric_vs_ratio, plot_rank_stability
from hfprune.report.rendering import _number, _section, power_line, verdict_markdown
from hfprune.report.verdicts import _with_intervals, verdict_tables
from hfprune.runtime import atomic_path


def _header(cfg: dict) -> list[str]:
    ev, cal = cfg["evaluation"], cfg["calibration"]
    docs = "all docs" if ev["limit"] is None else f"{ev['limit']} seeded random docs per task"
    recovery = "LoRA (rows marked +LoRA)" if cfg["recovery"]["enabled"] else "off"
    seeds = {m["name"]: (m.get("seeds") or cal["seeds"] or [cal["seed"]]) for m in cfg["models"]}
    seed_text = "; ".join(f"{name}: {', '.join(map(str, s))}" for name, s in seeds.items())
    return [
        f"# hfprune report: experiment `{cfg['experiment']}`", "",
        (f"Models: {', '.join(m['name'] for m in cfg['models'])}. Criteria: {', '.join(cfg['criteria'])}. "
         f"Ratios (fraction of all parameters removed): {', '.join(map(format_ratio, cfg['ratios']))}. "
         f"Calibration: {cal['num_sequences']} x {cal['seq_len']} tokens of `{source_label(cal['source'])}`, seeds {seed_text}. "
         f"Evaluation: suite `{ev['suite']}`, {docs} (seed {ev['subsample_seed']}), 0-shot; "
         f"perplexity on {', '.join(map(source_label, ev['perplexity']['sources']))} "
         f"({ev['perplexity']['protocol']} protocol); fidelity on {ev['fidelity']['num_prompts']} "
         f"`{source_label(ev['fidelity']['source'])}` prompts. Recovery: {recovery}."),
        "",
    ]


def _verdict_intro(cfg: dict) -> list[str]:
    return [
        "## Verdicts", "",
        (f"Each row compares criterion A with the baseline `{baseline_criterion(cfg)}` (first table of a ratio) "
         "or with the dense model (second), **paired** on the same docs, perplexity windows and fidelity prompts, "
         "pooled over calibration seeds (seed s of A with seed s of B; a criterion without a seed, such as "
         "magnitude, pairs with every seed). Δ = A − B with its 95 % CI, cluster-robust (docs on one passage, "
         "windows of one document and one doc's repeats across seeds are one cluster). log-ppl: mean NLL per "
         "token in nats (Δ −0.05 ≈ 5 % lower perplexity; lower is better); JS / top-k Jaccard: fidelity to the "
         "dense model (JS lower, Jaccard higher is better); gold prob: probability of the correct choice under the "
         "task's normalisation, averaged over tasks (pp); acc: accuracy averaged over tasks (pp)."),
        "",
        verdict_notes.marks_intro(cfg),
        "",
        ("On small models that score near chance on the zero-shot tasks, accuracy differences stay "
         "undecided unless they are very large: perplexity and fidelity separate the criteria far "
         "better, and the verdicts above rest on them."),
        "",
    ]


def _verdicts(cfg: dict, model: str, records: dict, columns: dict[str, str], root: Path,
              prefix: str) -> tuple[list[str], dict]:
    """The Verdict section of one model and the ablation marks {(criterion, ratio): mark} it implies; its files
    are named `<prefix><model>.*`."""
    lines, marks, forest = [f"### {model}", "", *verdict_notes.seed_effect_warning(cfg, model)], {}, []
    base = baseline_criterion(cfg)
    costs, rate_note = verdict_notes.power_costs(cfg, model)
    tables_dir = root / "tables"
    (tables_dir / prefix).mkdir(parents=True, exist_ok=True)
    for recovered in (False, True) if cfg["recovery"]["enabled"] else (False,):
        for ratio in map(format_ratio, cfg["ratios"]):
            headline = verdict_tables(cfg, records, ratio, recovered)
            if headline["baseline"].empty and headline["dense"].empty:
                continue
            tag = f"r{ratio}{'.recovered' if recovered else ''}"
            detail = verdict_tables(cfg, records, ratio, recovered, headline=False)
            csv = tables_dir / f"{prefix}{model}.verdict.{tag}.csv"
            pd.concat([t.assign(family=name) for name, t in detail.items() if not t.empty]).to_csv(csv, index=False)
            lines += [f"#### ratio {ratio}{' +LoRA' if recovered else ''}", ""]
            for name, table in headline.items():
                if table.empty:
                    continue
                lines += [f"vs {base if name == 'baseline' else 'dense'}:", "",
                          verdict_markdown(table, columns), "", power_line(table, columns), "",
                          verdict_notes.target_line(cfg, table), ""]
                if name == "baseline":
                    lines += verdict_notes.power_plan_lines(table, costs, rate_note)
            lines += [f"Every measure, per task too: [CSV]({os.path.relpath(csv, root)})", ""]
            table = headline["baseline"]
            if not table.empty:
                forest.append(table.assign(row=[f"{a} r{ratio}{' +LoRA' if recovered else ''}" for a in table["a"]]))
                if not recovered:
                    for _, r in table[table["measure"] == "acc:average"].iterrows():
                        marks[(r["a"], ratio)] = comparisons.mark(r["verdict"])
                    marks[(base, ratio)] = "(baseline)"
    if forest:
        rows = pd.concat(forest, ignore_index=True)
        plots = root / "plots"
        made = [plot_forest(rows, plots / f"{prefix}{model}.forest.png",
                            f"{model}: differences vs {base} (95 % CI; shaded: ±margin)")]
        if (rows["pairs"] > 1).any():
            made.append(plot_rank_stability(rows, plots / f"{prefix}{model}.rank_stability.png",
                                            f"{model}: marks vs {base}, with the seeds on which A beat it"))
        lines += [f"![{p.stem}]({os.path.relpath(p, root)})" for p in made] + [""]
    return lines, marks


def _demote(lines: list[str]) -> list[str]:
    return ["#" + line if line.startswith("#") else line for line in lines]


def _variant_report(cfg: dict, runs: pd.DataFrame, columns: dict[str, str], root: Path,
                    prefix: str) -> tuple[list[str], list[str], pd.DataFrame]:
    """(Verdict lines, table and plot sections, one row per cell) of one grid point; its files are named
    `<prefix><model>.*` under tables/ and plots/."""
    cells = aggregate(runs)
    ev = cfg["evaluation"]
    verdicts, sections = [], []
    tables = root / "tables"
    for entry in cfg["models"]:
        model, paper_name = entry["name"], entry.get("paper_name") if cfg["report"]["paper_reference"] else None
        plans = load_plans(cfg, model)
        records = load_records(cfg, model, cells)
        mine = _with_intervals(_params_from_plans(cells[cells["model"] == model], plans), records, columns)
        if mine.empty:
            continue
        model_verdicts, marks = _verdicts(cfg, model, records, columns, root, prefix)
        verdicts += model_verdicts
        task_columns = list(dict.fromkeys(columns.values()))
        sections += [f"## {model} ({entry.get('family', 'family unresolved')}, `{entry['source']}`)", ""]
        _section(sections, "Accuracy, perplexity, fidelity, size (Table 1 form)",
                 main_table(mine, task_columns, cfg["ratios"], paper_name), tables / f"{prefix}{model}.main", root,
                 "Accuracy in % with its 95 % CI over the n docs per task (Wilson; the average: cluster-robust "
                 "over tasks), averaged over calibration seeds; perplexity and fidelity: mean ± sd over seeds. "
                 "The dense row is **not fine-tuned**; `+LoRA` rows are after LoRA recovery; `(paper)` rows "
                 "are the paper's figures (pruned rows after LoRA recovery, 2 epochs LaMini; their average is "
                 "over the paper's 10 tasks, ours over the columns our suite has)." + verdict_notes.crows_pairs_footnote(task_columns))
        _section(sections, "Criterion ablation, average accuracy % without fine-tuning (Table 6 form)",
                 ablation_table(mine, cfg["criteria"], paper_name, marks), tables / f"{prefix}{model}.ablation", root,
                 "95 % CIs; the mark says whether the paired difference from the baseline is significant "
                 "(Holm, see Verdicts): equivalent / better / worse / undecided. Never read a ranking into undecided "
                 "cells."
                 + (f" Dense average: {_number(mine[mine['criterion'] == 'dense']['average'].iloc[0], '.1f')}."
                    if (mine["criterion"] == "dense").any() else ""))
        _section(sections, "Output fidelity to the dense model, without fine-tuning (Table 7 form)",
                 fidelity_table(mine, cfg["criteria"], paper_name), tables / f"{prefix}{model}.fidelity", root,
                 "JS = Jensen-Shannon distance of the next-token distributions (lower is closer); "
                 f"top-k Jaccard of the top-{ev['fidelity']['top_k']} token sets; mean ± sd over seeds.")
        if ev["efficiency"]["enabled"]:
            _section(sections, "Size and speed (Table 4 form)", efficiency_table(mine, paper_name),
                     tables / f"{prefix}{model}.efficiency", root,
                     f"Medians of {ev['efficiency']['repeats']} alternating dense/pruned repeats on this "
                     "machine's device; ratios to dense with [min-max] of the per-repeat ratios. decode_tok_s: "
                     "eager decode (one Python step per token; launch-bound on a GPU); decode_static_tok_s, where "
                     "shown (CUDA): static cache + CUDA graphs. The paper's rows are on one A6000.")
        sections += _plots(mine, plans, model, root, prefix)
    cost = scoring_cost(cfg)
    if not cost.empty:
        paper = reference("table5_scoring_cost")
        paper = paper[paper["model"].isin({m.get("paper_name") for m in cfg["models"]})]
        cost = pd.concat([cost, paper.assign(source="paper")], ignore_index=True).astype({"jobs": "Int64"})
        _section(sections, "Scoring cost (Table 5 form)", cost, tables / f"{prefix}scoring_cost", root,
                 "Mean wall time and peak memory of the score jobs (over seeds; paper: peak GPU memory).")
    return verdicts, sections, cells


# what the grid summary shows of each cell (the per-variant tables have the rest)
SUMMARY = ["seeds", "average", "average_sd", "js_distance", "js_distance_sd", "topk_jaccard", "topk_jaccard_sd"]


def grid_summary(variants: dict[str, dict], cells: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per variant x cell: the variant, a column per grid axis, the cell, its average accuracy,
    perplexities and fidelity (means over seeds)."""
    frames = []
    for name, vcfg in variants.items():
        axes = {path: v if isinstance(v, (str, int, float)) else str(v) for path, v in grid.point_values(vcfg).items()}
        frames.append(cells[name].assign(variant=name, **axes))
    out = pd.concat(frames, ignore_index=True)
    ppl = [c for c in out.columns if c.startswith("ppl_")]
    keys = ["variant", *grid.axes(next(iter(variants.values()))), *CELL_KEYS]
    return out[keys + [c for c in SUMMARY[:2] + ppl + SUMMARY[2:] if c in out.columns]]


def write_report(cfg: dict, out_dir: str | os.PathLike | None = None, notes: list[str] = ()) -> Path:
    """Write the whole report folder atomically; returns the path of report.md. With grid axes: a summary of
    every variant (a column per axis), then each variant's verdicts and tables, compared within the variant.
    `notes` (markdown lines, e.g. the MLflow completeness check) follow the header."""
    variants = grid.variants(cfg)
    loaded = {name: load_runs(vcfg) for name, vcfg in variants.items()}
    if all(runs.empty for runs, _, _ in loaded.values()):
        raise HFPruneError(f"no metrics JSON of this config's cells under {experiment_dir(cfg) / 'metrics'}; "
                           "run the evaluate jobs first")
    out_dir = Path(out_dir) if out_dir is not None else experiment_dir(cfg) / "report"
    with atomic_path(out_dir) as root:
        root.mkdir()
        lines, verdicts, sections, cells = _header(cfg) + list(notes), _verdict_intro(cfg), [], {}
        for name, vcfg in variants.items():
            runs, columns, missing = loaded[name]
            if missing:
                lines += [f"**{len(missing)} configured cell draw(s){f' of variant `{name}`' if name else ''} have "
                          "no metrics yet:** " + ", ".join(
                              f"{m}/{c}/r{r}{'' if s is None else f'/s{s}'}{' +LoRA' if rec else ''}"
                              for m, c, r, rec, s in missing), ""]
            if runs.empty:
                continue
            mine, theirs, cells[name] = _variant_report(vcfg, runs, columns, root, f"{name}/" if name else "")
            if name:
                mine, theirs = _demote(mine), _demote(theirs)
                verdicts += [f"### variant `{name}`", ""]
                sections += [f"## variant `{name}`", ""]
            verdicts += mine
            sections += theirs
        if cfg["grid"]:
            summary = []
            _section(summary, "Every variant (one row per variant x cell)",
                     grid_summary({n: variants[n] for n in cells}, cells), root / "tables" / "grid_summary", root,
                     "Means over calibration seeds (perplexity: geometric), ± sd over seeds; the verdicts below "
                     "compare criteria within each variant only.")
            axes = "; ".join(f"`{path}`: {', '.join(map(str, values))}" for path, values in cfg["grid"].items())
            lines += ["## Grid", "", (f"{len(variants)} variants, the product of the axes {axes} (each overrides "
                                      "the setting above). A variant is named `<axis>-<value>_...`."), ""] + summary
        (root / "report.md").write_text("\n".join(lines + verdicts + ["# Tables and plots", ""] + sections).rstrip()
                                        + "\n")
    return out_dir / "report.md"


def _plots(cells: pd.DataFrame, plans: dict[str, dict], model: str, root: Path, prefix: str) -> list[str]:
    plots = root / "plots" / f"{prefix}{model}"  # plus .<plot>.png
    made = []
    if cells["average"].notna().any():  # a grid with evaluation.suite `none` has no accuracy to plot
        made.append(plot_metric_vs_ratio(cells, ["average"], plots.with_name(f"{plots.name}.avg_vs_ratio.png"),
                                         f"{model}: average accuracy vs ratio (95 % CI)", "average accuracy (%)"))
    ppl = [c for c in cells.columns if c.startswith("ppl_") and not c.endswith("_sd")]
    if ppl:
        made.append(plot_metric_vs_ratio(cells, ppl, plots.with_name(f"{plots.name}.ppl_vs_ratio.png"),
                                         f"{model}: perplexity vs ratio (± sd over seeds)", "perplexity", log=True,
                                         band="sd"))
    if plans:
        made.append(plot_neurons_kept(plans, plots.with_name(f"{plots.name}.neurons_kept.png"), f"{model}: neurons kept"))
    lines = ["### Plots", ""]
    lines += [f"![{p.stem}]({os.path.relpath(p, root)})" for p in made]
    return lines + [""]
