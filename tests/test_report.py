"""Report tables and plots from an experiment folder laid out as the workflow writes it.

Plans, pruned models, fidelity, perplexity and efficiency come from the real code on a tiny random LLaMA;
only the task accuracies (lm-eval's part) are made up, with a binomial standard error as lm-eval reports.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pandas as pd
import pytest
import torch
from conftest import tiny_model

from hfprune import comparisons, equivalence, report
from hfprune.cli import main as cli_main
from hfprune.config import cell_seeds
from hfprune.errors import HFPruneError
from hfprune.evaluation.efficiency import efficiency
from hfprune.evaluation.fidelity import fidelity
from hfprune.evaluation.perplexity import perplexity
from hfprune.evaluation.records import (
    fidelity_records,
    perplexity_records,
    read_records,
    records_path,
    write_records,
)
from hfprune.plan import format_ratio, make_plan
from hfprune.report import paper_tables
from hfprune.runtime import write_json
from hfprune.scorer import score_model
from hfprune.stats import holm, paired_difference
from hfprune.surgery import prune_model
from hfprune.validation import validate_config

TASKS = {"offline_arc_easy": ("arc_easy", "acc_norm"), "offline_boolq": ("boolq", "acc")}
N_DOCS = 50
SEEDS = [0, 1]


def _config(tmp_path, **overrides) -> dict:
    cfg = {"experiment": "rep", "results_dir": str(tmp_path / "results"),
           "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path / "tiny"),
                       "paper_name": "Llama-2-7B"}],
           "criteria": ["magnitude", "random"], "ratios": [0.2, 0.3],
           "calibration": {"seeds": SEEDS},
           "evaluation": {"efficiency": {"enabled": True}}}
    cfg.update(overrides)
    return validate_config(cfg)


def _tasks(seed: int) -> tuple[dict, list[dict]]:
    """Made-up per-doc outcomes (lm-eval's part) and the task rows they imply, with a binomial stderr."""
    gen = torch.Generator().manual_seed(seed)
    tasks, rows = {}, []
    for task, (column, metric) in TASKS.items():
        outcomes = (torch.rand(N_DOCS, generator=gen) < 0.3 + 0.4 * torch.rand(1, generator=gen)).double()
        gold = torch.rand(N_DOCS, generator=gen).double()
        for i in range(N_DOCS):
            base = {"group": task, "unit": str(i), "cluster": f"doc:{i}", "weight": 1.0, "choice_loglik": [-1.0, -2.0]}
            rows += [{**base, "measure": "acc", "value": outcomes[i].item()},
                     {**base, "measure": "gold_prob", "value": gold[i].item()}]
        acc = outcomes.mean().item()
        tasks[task] = {"metric": metric, "value": acc, "stderr": math.sqrt(acc * (1 - acc) / (N_DOCS - 1)),
                       "n": N_DOCS, "column": column}
    return tasks, rows


def _write_cell(path, dense, model, cell: dict, plan: dict | None, ids: torch.Tensor, seed: int) -> None:
    """A metrics JSON and its per-unit records, perplexity / fidelity / efficiency from the real code."""
    tasks, rows = _tasks(seed)
    pruned = plan is not None
    ppl = perplexity(model, ids)
    ppl["window_doc"] = [i // 2 for i in range(ids.shape[0])]  # two windows per document
    rows += perplexity_records("wiki", ppl)
    del ppl["window_nll"], ppl["window_doc"]
    fid = None
    if pruned:
        fid = fidelity(dense, model, ids, top_k=5)
        fid.update(source="lambada", prompt_doc=list(range(ids.shape[0])))
        rows += fidelity_records(fid)
        del fid["per_prompt"], fid["prompt_doc"]
    metrics = {"cell": cell, "tasks": tasks, "average": sum(t["value"] for t in tasks.values()) / len(tasks),
               "perplexity": {"wiki": ppl}, "fidelity": fid,
               "efficiency": efficiency(dense, model if pruned else None, prefill_tokens=16, decode_batch=2,
                                        decode_tokens=2, repeats=3),
               "meta": {"achieved_ratio": plan["achieved_ratio"] if pruned else 0.0}}
    write_records(records_path(path), rows)
    write_json(path, metrics)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """results/rep/ as the workflow lays it out: score sidecars, plans, metrics and records for dense + 2
    criteria x 2 ratios (random over 2 calibration seeds, magnitude once; recovered rows for magnitude), and a
    stale cell from an earlier config that the report must ignore."""
    tmp_path = tmp_path_factory.mktemp("report")
    cfg = _config(tmp_path)
    exp = report.experiment_dir(cfg)
    dense = tiny_model("llama")
    dense.config.save_pretrained(tmp_path / "tiny")  # its architecture prices the power plan
    ids = torch.randint(0, dense.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    _write_cell(exp / "metrics/tiny/dense.json", dense, dense,
                {"model": "tiny", "family": "llama", "criterion": "dense", "ratio": 0.0, "recovered": False,
                 "seed": None}, None, ids, seed=0)
    for c, crit in enumerate(cfg["criteria"]):
        for seed in cell_seeds(cfg, "tiny", crit):
            scores = score_model(dense, [], [crit], seed=seed)[crit]
            write_json(exp / f"scores/tiny/{crit}/s{seed}.json",
                       {"model": "tiny", "criterion": crit, "seconds": 1.5 + c + seed, "peak_memory_mb": 512.0,
                        "device": "cpu", "calibration": {"tokens": 0}})
            for r, ratio in enumerate(cfg["ratios"]):
                plan = make_plan(scores, dense.config, ratio, "llama",
                                 meta={"model": "tiny", "criterion": crit, "seed": seed})
                write_json(exp / f"plans/tiny/{crit}/s{seed}/r{format_ratio(ratio)}.json", plan)
                pruned = prune_model(copy.deepcopy(dense), plan)
                cell = {"model": "tiny", "family": "llama", "criterion": crit, "ratio": ratio, "recovered": False,
                        "seed": seed}
                base = exp / f"metrics/tiny/{crit}/s{seed}/r{format_ratio(ratio)}"
                _write_cell(base.with_name(base.name + ".json"), dense, pruned, cell, plan, ids, seed=100 * c + 10 * seed + r)
                if crit == "magnitude":
                    _write_cell(base.with_name(base.name + ".recovered.json"), dense, pruned,
                                {**cell, "recovered": True}, plan, ids, seed=1000 + r)
    stale = exp / "metrics/tiny/random/s0/r0.2.json"
    data = json.loads(stale.read_text())
    data["cell"]["criterion"] = "taylor_ce"
    write_json(exp / "metrics/tiny/taylor_ce/s0/r0.2.json", data)
    return cfg


def _read(path):
    return json.loads(path.read_text())


def _seed_runs(exp, crit: str, ratio: float, recovered: bool = False) -> list[dict]:
    suffix = ".recovered" if recovered else ""
    if crit == "dense":
        return [_read(exp / "metrics/tiny/dense.json")]
    return [_read(p) for p in sorted((exp / f"metrics/tiny/{crit}").glob(f"s*/r{format_ratio(ratio)}{suffix}.json"))]


def test_main_table_has_every_cell_with_accuracy_ppl_fidelity_and_params(experiment, tmp_path):
    cfg = copy.deepcopy(experiment)
    cfg["recovery"]["enabled"] = True  # magnitude has recovered rows; random's are listed as missing
    md = report.write_report(cfg, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out/tables/tiny.main.csv")
    ours = table[table["source"] == "ours"]
    assert ours["method"].tolist() == ["dense", "magnitude", "magnitude +LoRA", "random",
                                       "magnitude", "magnitude +LoRA", "random"]
    assert ours["fine_tuned"].tolist()[:3] == ["not fine-tuned", "no", "LoRA"]
    assert ours["seeds"].tolist() == [1, 1, 1, 2, 1, 1, 2] and (ours["n_docs"] == N_DOCS).all()
    exp = report.experiment_dir(cfg)
    for _, row in ours.iterrows():
        crit = row["method"].split()[0]
        runs = _seed_runs(exp, crit, row["ratio"], "LoRA" in row["method"])

        def mean(f, runs=runs):  # over the cell's calibration seeds
            return sum(f(m) for m in runs) / len(runs)

        assert row["arc_easy"] == pytest.approx(100 * mean(lambda m: m["tasks"]["offline_arc_easy"]["value"]))
        assert row["average"] == pytest.approx(100 * mean(lambda m: m["average"]))
        assert row["boolq_lo"] < row["boolq"] < row["boolq_hi"] and row["average_lo"] < row["average"]
        geo = math.exp(mean(lambda m: math.log(m["perplexity"]["wiki"]["ppl"])))
        assert row["ppl_wiki"] == pytest.approx(geo)
        assert row["params"] == runs[0]["efficiency"]["params"]
        if crit != "dense":
            assert row["js_distance"] == pytest.approx(mean(lambda m: m["fidelity"]["js_distance"]))
        if crit == "random":
            assert row["ppl_wiki_sd"] > 0  # two draws, two different plans
    # the Wilson interval of a task, from the per-doc records averaged over seeds
    from statsmodels.stats.proportion import proportion_confint

    row = ours[(ours["method"] == "random") & (ours["ratio"] == 0.2)].iloc[0]
    docs = pd.concat(read_records(records_path(p)) for p in
                     sorted((exp / "metrics/tiny/random").glob("s*/r0.2.json")))
    acc = docs[(docs["measure"] == "acc") & (docs["group"] == "offline_boolq")].groupby("unit")["value"].mean()
    lo, hi = proportion_confint(acc.sum(), len(acc), method="wilson")
    assert (row["boolq_lo"], row["boolq_hi"]) == pytest.approx((100 * lo, 100 * hi))
    # efficiency's parameter count and the plan's agree (two independent countings)
    plan = _read(exp / "plans/tiny/random/s0/r0.3.json")
    assert ours[(ours["method"] == "random") & (ours["ratio"] == 0.3)]["params"].item() == plan["params_pruned"]
    # the paper's Table 1 rows for the configured ratios sit beside ours, with the paper's other tasks
    paper = table[table["source"] == "paper"]
    hf = paper[(paper["method"] == "HFPrune (paper)") & (paper["ratio"] == 0.2)]
    assert hf["arc_challenge"].item() == 47.1 and hf["average"].item() == 59.0 and hf["fine_tuned"].item() == "LoRA"
    assert set(paper["ratio"]) == {0.0, 0.2, 0.3} and "truthfulqa_mc2" in table.columns
    text = md.read_text()
    assert "random/r0.2/s0 +LoRA" in text and "random/r0.3/s1 +LoRA" in text  # configured, not evaluated
    assert not table["method"].str.startswith("taylor_ce").any()  # the stale cell is not in this config


def test_rows_tell_the_activation_criteria_from_the_methods():
    """Every registered criterion's rows start with its name; the paper's Taylor criteria (on activations) and
    the weight-level methods of its Table 1 read apart."""
    from hfprune.criteria import CRITERIA

    label = {c: paper_tables._method({"criterion": c, "recovered": False}) for c in CRITERIA}
    assert label["taylor_kd"] == "taylor_kd — SD criterion (Taylor, act.)"
    assert label["taylor_ce"].endswith("CE criterion (Taylor, act.)") and label["taylor_entropy"].endswith("IE (HFPrune)")
    assert label["sdmprune"].endswith("SDMPrune (method)") and label["llm_pruner"].endswith("LLM-Pruner (method)")
    assert all(label[c].split()[0] == c for c in CRITERIA) and len(set(label.values())) == len(label)
    assert paper_tables._method({"criterion": "sdmprune", "recovered": True}) == "sdmprune — SDMPrune (method) +LoRA"


def test_verdicts_come_first_and_equal_an_independent_paired_computation(experiment, tmp_path):
    md = report.write_report(experiment, tmp_path / "out")
    text = md.read_text()
    assert text.index("## Verdicts") < text.index("# Tables and plots")
    assert "random − magnitude" in text and "random − dense" in text and "Smallest detectable" in text
    # marks, their inference target and what the seeds generalise to (2 seeds: not estimable), the power plan
    assert "Inference target of the marks: these calibration draws" in text
    assert "over calibration draws: not estimable (2 seeds)" in text and "**Warning:**" not in text
    assert "Power plan (hfprune.power)" in text or "every comparison in this table is decided" in text
    detail = pd.read_csv(tmp_path / "out/tables/tiny.verdict.r0.2.csv")
    row = detail[(detail["family"] == "baseline") & (detail["measure"] == "logppl:wiki")].iloc[0]
    assert (row["a"], row["b"], row["pairs"]) == ("random", "magnitude", 2)
    # by hand: seed s of random minus magnitude's one draw, window by window, clustered by document
    exp = report.experiment_dir(experiment)
    mag = read_records(records_path(exp / "metrics/tiny/magnitude/s0/r0.2.json"))
    diffs, clusters = [], []
    for seed in SEEDS:
        rnd = read_records(records_path(exp / f"metrics/tiny/random/s{seed}/r0.2.json"))
        a, b = (f[f["measure"] == "logppl"].set_index("unit") for f in (rnd, mag))
        diffs += list(a["value"] - b.loc[a.index, "value"])
        clusters += list(a["cluster"])
    ref = paired_difference(diffs, clusters)
    assert (row["diff"], row["lo"], row["hi"], row["p"]) == pytest.approx((ref.diff, ref.lo, ref.hi, ref.p))
    assert row["clusters"] == 4 and row["n"] == 16
    # the per-task rows and the table's own Holm family
    assert {"acc:offline_boolq", "gold_prob:average", "js:lambada"} <= set(detail["measure"])
    for family, group in detail.groupby("family"):
        assert list(group["p_holm"]) == pytest.approx(list(holm(group["p"])))
        assert list(group["p_tost_holm"]) == pytest.approx(list(holm(group["p_tost"])), nan_ok=True)
    assert set(detail["verdict"]) <= set(equivalence.MARKS) and (detail["target"] == comparisons.FIXED).all()
    plots = tmp_path / "out/plots"
    assert (plots / "tiny.forest.png").stat().st_size > 5000 and (plots / "tiny.rank_stability.png").is_file()


def test_random_seed_effect_on_too_few_seeds_is_a_warning_line(experiment, tmp_path):
    cfg = validate_config({**copy.deepcopy(experiment), "report": {**experiment["report"], "seed_effect": "random"}})
    text = report.write_report(cfg, tmp_path / "out").read_text()
    assert ("**Warning:** `report.seed_effect: random`, but tiny has 2 calibration seed(s): the interval over "
            "calibration draws is not estimable (2 seeds, 3 needed)") in text
    assert "over calibration draws where a model has ≥ 3 seeds" in text


def test_estimate_power_prints_the_reports_plans_and_needs_a_grid_that_ran(experiment, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(experiment))
    assert cli_main(["estimate", "--config", str(cfg_file), "--power"]) == 0
    out = capsys.readouterr().out
    assert "## tiny, ratio 0.2, vs magnitude" in out and "the paper's GPU" in out
    text = report.write_report(experiment, tmp_path / "out").read_text()
    plans = [line for line in out.splitlines() if line.startswith("| random − magnitude")]
    assert plans and all(line in text for line in plans)  # the report's own plan, priced
    assert any(re.search(r"\| (\d[\d,]*\.\d|[\d.e-]+ s) +\|", line) for line in plans)  # a cost, not n/a
    cfg_file.write_text(json.dumps({**experiment, "experiment": "never-ran"}))
    assert cli_main(["estimate", "--config", str(cfg_file), "--power"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--power needs a grid that has run" in err and "\n" not in err


def test_compare_prints_the_reports_numbers(experiment, tmp_path, capsys):
    report.write_report(experiment, tmp_path / "out")
    detail = pd.read_csv(tmp_path / "out/tables/tiny.verdict.r0.2.csv")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(experiment))
    assert cli_main(["compare", "--config", str(cfg_file), "--model", "tiny", "--ratio", "0.2", "--all",
                     "random", "magnitude"]) == 0
    out = capsys.readouterr().out
    for _, row in detail[detail["family"] == "baseline"].iterrows():
        line = next(x for x in out.splitlines() if x.startswith(f"| {row['label']} "))
        assert comparisons.format_difference(row) in line and f"{row['p_holm']:.3g}" in line, line
    assert cli_main(["compare", "--config", str(cfg_file), "--model", "tiny", "--ratio", "0.3", "random",
                     "dense"]) == 0
    assert "JS lambada" in capsys.readouterr().out


def test_ablation_fidelity_efficiency_and_scoring_tables(experiment, tmp_path):
    report.write_report(experiment, tmp_path / "out")
    tables = tmp_path / "out/tables"
    exp = report.experiment_dir(experiment)
    ablation = pd.read_csv(tables / "tiny.ablation.csv")
    assert ablation["ratio"].tolist() == [0.2, 0.3]
    runs = _seed_runs(exp, "random", 0.3)
    assert ablation.loc[1, "random"] == pytest.approx(100 * sum(m["average"] for m in runs) / len(runs))
    assert ablation.loc[0, "magnitude_mark"] == "(baseline)"
    assert ablation.loc[0, "random_mark"] in ("undecided", "**equivalent**", "**better**", "**worse**")
    assert (ablation.loc[0, "taylor_entropy — IE (HFPrune) (paper)"] == 53.1
            and ablation.loc[1, "taylor_ce — CE criterion (Taylor, act.) (paper)"] == 46.8)
    fid = pd.read_csv(tables / "tiny.fidelity.csv")
    assert fid.loc[0, "magnitude JS"] == pytest.approx(
        _read(exp / "metrics/tiny/magnitude/s0/r0.2.json")["fidelity"]["js_distance"])
    assert fid.loc[1, "taylor_entropy — IE (HFPrune) (paper, top-15) Jaccard"] == 0.595
    eff = pd.read_csv(tables / "tiny.efficiency.csv")
    ours = eff[eff["source"] == "ours"]
    assert len(ours) == 5 and (ours[ours["ratio"] > 0]["params_ratio"] < 1).all()
    assert (ours["prefill_ms_ratio_min"] <= ours["prefill_ms_ratio_max"]).all()
    assert eff[eff["source"] == "paper"]["prefill_ms"].tolist() == [57.5, 46.3, 42.1]
    cost = pd.read_csv(tables / "scoring_cost.csv")
    assert cost[cost["source"] == "ours"]["seconds"].tolist() == [1.5, 3.0]  # random: mean of 2.5 and 3.5
    assert cost[cost["source"] == "paper"]["seconds"].tolist() == [508.9, 1539.8]


def test_formats_links_and_plots(experiment, tmp_path):
    md = report.write_report(experiment, tmp_path / "out")
    root = md.parent
    main_md = (root / "tables/tiny.main.md").read_text()
    assert "| dense " in main_md and "±" in main_md and "HFPrune (paper)" in main_md
    assert re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\] \|", main_md)  # an accuracy with its CI
    tex = (root / "tables/tiny.main.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"fine\_tuned" in tex and "±" not in tex
    text = md.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert {"tables/tiny.main.csv", "tables/tiny.ablation.tex", "plots/tiny.avg_vs_ratio.png",
            "plots/tiny.ppl_vs_ratio.png", "plots/tiny.neurons_kept.png", "plots/tiny.forest.png",
            "tables/tiny.verdict.r0.2.csv"} <= set(links)
    assert all((root / link).is_file() for link in links)
    for png in root.glob("plots/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "not fine-tuned" in text


def test_without_paper_reference_or_paper_name(experiment, tmp_path):
    cfg = copy.deepcopy(experiment)
    cfg["report"]["paper_reference"] = False
    report.write_report(cfg, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out/tables/tiny.main.csv")
    assert set(table["source"]) == {"ours"} and "truthfulqa_mc2" not in table.columns


def test_cli_writes_the_default_folder_and_fails_cleanly_without_metrics(experiment, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"  # YAML is a superset of JSON
    cfg_file.write_text(json.dumps(experiment))
    assert cli_main(["report", "--config", str(cfg_file)]) == 0
    assert (report.experiment_dir(experiment) / "report/report.md").is_file()

    empty = _config(tmp_path / "empty")
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    assert cli_main(["report", "--config", str(tmp_path / "empty.json")]) == 2
    assert "no metrics JSON" in capsys.readouterr().err
    assert not (report.experiment_dir(empty) / "report").exists()
    with pytest.raises(HFPruneError):
        report.write_report(empty)


def test_grid_without_accuracy_reports_perplexity_only(experiment, tmp_path):
    """evaluation.suite `none` (perplexity/fidelity only) is a valid grid: no accuracy plot, no crash."""
    cfg = copy.deepcopy(experiment)
    cfg["results_dir"] = str(tmp_path / "results")
    src, dst = report.experiment_dir(experiment), report.experiment_dir(cfg)
    for path in src.rglob("*.json"):
        data = _read(path)
        if "tasks" in data and records_path(path).is_file():
            data.update(tasks={}, average=None)
            units = read_records(records_path(path))
            write_records(records_path(dst / path.relative_to(src)),
                          units[~units["measure"].isin(["acc", "gold_prob"])].to_dict("records"))
        write_json(dst / path.relative_to(src), data)
    md = report.write_report(cfg, tmp_path / "out")
    links = set(re.findall(r"\]\(([^)]+)\)", md.read_text()))
    assert "plots/tiny.ppl_vs_ratio.png" in links and "plots/tiny.avg_vs_ratio.png" not in links
    assert "acc (pp)" not in md.read_text() and "log-ppl wiki" in md.read_text()
    assert not (tmp_path / "out/plots/tiny.avg_vs_ratio.png").exists()
