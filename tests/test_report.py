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

from hfprune import report
from hfprune.cli import main as cli_main
from hfprune.config import validate_config
from hfprune.errors import HFPruneError
from hfprune.evaluation.efficiency import efficiency
from hfprune.evaluation.fidelity import fidelity
from hfprune.evaluation.perplexity import perplexity
from hfprune.plan import format_ratio, make_plan
from hfprune.runtime import write_json
from hfprune.scorer import score_model
from hfprune.surgery import prune_model

TASKS = {"offline_arc_easy": ("arc_easy", "acc_norm"), "offline_boolq": ("boolq", "acc")}
N_DOCS = 50


def _config(tmp_path, **overrides) -> dict:
    cfg = {"experiment": "rep", "results_dir": str(tmp_path / "results"),
           "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path / "tiny"),
                       "paper_name": "Llama-2-7B"}],
           "criteria": ["magnitude", "random"], "ratios": [0.2, 0.3],
           "evaluation": {"efficiency": {"enabled": True}}}
    cfg.update(overrides)
    return validate_config(cfg)


def _accuracy(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tasks = {}
    for task, (column, metric) in TASKS.items():
        acc = int(torch.randint(10, 40, (1,), generator=gen)) / N_DOCS
        tasks[task] = {"metric": metric, "value": acc, "stderr": math.sqrt(acc * (1 - acc) / (N_DOCS - 1)),
                       "n": N_DOCS, "column": column}
    return tasks


def _metrics(dense, model, cell: dict, plan: dict | None, ids: torch.Tensor, seed: int) -> dict:
    tasks = _accuracy(seed)
    pruned = plan is not None
    return {"cell": cell, "tasks": tasks, "average": sum(t["value"] for t in tasks.values()) / len(tasks),
            "perplexity": {"wiki": perplexity(model, ids)},
            "fidelity": fidelity(dense, model, ids, top_k=5) if pruned else None,
            "efficiency": efficiency(dense, model if pruned else None, prefill_tokens=16, decode_batch=2,
                                     decode_tokens=2, repeats=1),
            "meta": {"achieved_ratio": plan["achieved_ratio"] if pruned else 0.0}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """results/rep/ with scores sidecars, plans and metrics for dense + 2 criteria x 2 ratios (+ recovered
    rows for magnitude), and a stale cell from an earlier config that the report must ignore."""
    tmp_path = tmp_path_factory.mktemp("report")
    cfg = _config(tmp_path)
    exp = report.experiment_dir(cfg)
    dense = tiny_model("llama")
    ids = torch.randint(0, dense.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    write_json(exp / "metrics/tiny/dense.json",
               _metrics(dense, dense, {"model": "tiny", "family": "llama", "criterion": "dense", "ratio": 0.0,
                                       "recovered": False}, None, ids, seed=0))
    for c, crit in enumerate(cfg["criteria"]):
        scores = score_model(dense, [], [crit], seed=c)[crit]
        write_json(exp / f"scores/tiny/{crit}.json", {"model": "tiny", "criterion": crit, "seconds": 1.5 + c,
                                                      "peak_memory_mb": 512.0, "device": "cpu",
                                                      "calibration": {"tokens": 0}})
        for r, ratio in enumerate(cfg["ratios"]):
            plan = make_plan(scores, dense.config, ratio, "llama", meta={"model": "tiny", "criterion": crit})
            write_json(exp / f"plans/tiny/{crit}/r{format_ratio(ratio)}.json", plan)
            pruned = prune_model(copy.deepcopy(dense), plan)
            cell = {"model": "tiny", "family": "llama", "criterion": crit, "ratio": ratio, "recovered": False}
            write_json(exp / f"metrics/tiny/{crit}/r{format_ratio(ratio)}.json",
                       _metrics(dense, pruned, cell, plan, ids, seed=10 * c + r + 1))
            if crit == "magnitude":
                write_json(exp / f"metrics/tiny/{crit}/r{format_ratio(ratio)}.recovered.json",
                           _metrics(dense, pruned, {**cell, "recovered": True}, plan, ids, seed=100 + r))
    stale = json.loads((exp / "metrics/tiny/random/r0.2.json").read_text())
    stale["cell"]["criterion"] = "taylor_ce"
    write_json(exp / "metrics/tiny/taylor_ce/r0.2.json", stale)
    return cfg


def _read(path):
    return json.loads(path.read_text())


def test_main_table_has_every_cell_with_accuracy_ppl_fidelity_and_params(experiment, tmp_path):
    cfg = copy.deepcopy(experiment)
    cfg["recovery"]["enabled"] = True  # magnitude has recovered rows; random's are listed as missing
    md = report.write_report(cfg, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out/tables/tiny.main.csv")
    ours = table[table["source"] == "ours"]
    assert ours["method"].tolist() == ["dense", "magnitude", "magnitude +LoRA", "random",
                                       "magnitude", "magnitude +LoRA", "random"]
    assert ours["fine_tuned"].tolist()[:3] == ["not fine-tuned", "no", "LoRA"]
    exp = report.experiment_dir(cfg)
    for _, row in ours.iterrows():
        crit = row["method"].split()[0]
        name = "dense.json" if crit == "dense" else (
            f"{crit}/r{format_ratio(row['ratio'])}{'.recovered' if 'LoRA' in row['method'] else ''}.json")
        metrics = _read(exp / "metrics/tiny" / name)
        assert row["arc_easy"] == pytest.approx(100 * metrics["tasks"]["offline_arc_easy"]["value"])
        assert row["boolq_stderr"] == pytest.approx(100 * metrics["tasks"]["offline_boolq"]["stderr"])
        assert row["average"] == pytest.approx(100 * metrics["average"])
        assert row["ppl_wiki"] == pytest.approx(metrics["perplexity"]["wiki"]["ppl"])
        assert row["params"] == metrics["efficiency"]["params"]
        if crit != "dense":
            assert row["js_distance"] == pytest.approx(metrics["fidelity"]["js_distance"])
    # efficiency's parameter count and the plan's agree (two independent countings)
    plan = _read(exp / "plans/tiny/random/r0.3.json")
    assert ours[(ours["method"] == "random") & (ours["ratio"] == 0.3)]["params"].item() == plan["params_pruned"]
    # the paper's Table 1 rows for the configured ratios sit beside ours, with the paper's other tasks
    paper = table[table["source"] == "paper"]
    hf = paper[(paper["method"] == "HFPrune (paper)") & (paper["ratio"] == 0.2)]
    assert hf["arc_challenge"].item() == 47.1 and hf["average"].item() == 59.0 and hf["fine_tuned"].item() == "LoRA"
    assert set(paper["ratio"]) == {0.0, 0.2, 0.3} and "truthfulqa_mc2" in table.columns
    text = md.read_text()
    assert "random/r0.2 +LoRA" in text and "random/r0.3 +LoRA" in text  # configured, not evaluated
    assert "taylor_ce" not in set(table["method"])  # the stale cell is not in this config


def test_ablation_fidelity_efficiency_and_scoring_tables(experiment, tmp_path):
    report.write_report(experiment, tmp_path / "out")
    tables = tmp_path / "out/tables"
    exp = report.experiment_dir(experiment)
    ablation = pd.read_csv(tables / "tiny.ablation.csv")
    assert ablation["ratio"].tolist() == [0.2, 0.3]
    assert ablation.loc[1, "random"] == pytest.approx(100 * _read(exp / "metrics/tiny/random/r0.3.json")["average"])
    assert ablation.loc[0, "taylor_entropy (IE, paper)"] == 53.1 and ablation.loc[1, "taylor_ce (CE, paper)"] == 46.8
    fid = pd.read_csv(tables / "tiny.fidelity.csv")
    assert fid.loc[0, "magnitude JS"] == pytest.approx(
        _read(exp / "metrics/tiny/magnitude/r0.2.json")["fidelity"]["js_distance"])
    assert fid.loc[1, "taylor_entropy (IE, paper, top-15) Jaccard"] == 0.595
    eff = pd.read_csv(tables / "tiny.efficiency.csv")
    ours = eff[eff["source"] == "ours"]
    assert len(ours) == 5 and (ours[ours["ratio"] > 0]["params_ratio"] < 1).all()
    assert eff[eff["source"] == "paper"]["prefill_ms"].tolist() == [57.5, 46.3, 42.1]
    cost = pd.read_csv(tables / "scoring_cost.csv")
    assert cost[cost["source"] == "ours"]["seconds"].tolist() == [1.5, 2.5]
    assert cost[cost["source"] == "paper"]["seconds"].tolist() == [508.9, 1539.8]


def test_formats_links_and_plots(experiment, tmp_path):
    md = report.write_report(experiment, tmp_path / "out")
    root = md.parent
    main_md = (root / "tables/tiny.main.md").read_text()
    assert "| dense " in main_md and "±" in main_md and "HFPrune (paper)" in main_md
    tex = (root / "tables/tiny.main.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"fine\_tuned" in tex and "±" not in tex
    text = md.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert {"tables/tiny.main.csv", "tables/tiny.ablation.tex", "plots/tiny.avg_vs_ratio.png",
            "plots/tiny.ppl_vs_ratio.png", "plots/tiny.neurons_kept.png"} <= set(links)
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
        if "tasks" in data:
            data.update(tasks={}, average=None)
        write_json(dst / path.relative_to(src), data)
    md = report.write_report(cfg, tmp_path / "out")
    links = set(re.findall(r"\]\(([^)]+)\)", md.read_text()))
    assert "plots/tiny.ppl_vs_ratio.png" in links and "plots/tiny.avg_vs_ratio.png" not in links
    assert not (tmp_path / "out/plots/tiny.avg_vs_ratio.png").exists()
