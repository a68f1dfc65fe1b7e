"""Grid axes (config `grid:`): the DAG each kind of axis adds (dry runs), distinct paths per variant, bad axes
stopped before any job, and (marked `workflow`) a real run of the smoke grid over two allocations."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import experiment_runs, no_snakefile_traceback
from test_workflow import ROOT, _dag, _snakemake

from hfprune import comparisons


def _config(tmp_path: Path, name: str = "grid.yaml", **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _jobs(tmp_path: Path, **changes) -> Counter:
    rules, _ = _dag(tmp_path, _config(tmp_path, **changes))
    return Counter(rules.values())


def _dry_run(tmp_path: Path, **changes) -> str:
    return _snakemake(tmp_path, "-n", "-p", "--configfile", str(_config(tmp_path, **changes))).stdout


def _outputs(dry_run: str) -> list[tuple[str, str]]:
    """(rule, output line) of every job of a dry run."""
    return re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: (.*)$", dry_run, re.MULTILINE)


@pytest.fixture(scope="module")
def base_jobs(tmp_path_factory) -> Counter:
    """The smoke grid without axes: 3 score (taylor_entropy x 2 seeds, magnitude once), 3 plans, 1 + 3
    evaluations, 1 report."""
    jobs = _jobs(tmp_path_factory.mktemp("base"))
    assert (jobs["score"], jobs["plan"], jobs["evaluate_dense"], jobs["evaluate_pruned"]) == (3, 3, 1, 3)
    return jobs


def test_allocation_axis_replans_without_rescoring(tmp_path, base_jobs):
    jobs = _jobs(tmp_path, grid={"pruning.allocation": ["uniform", "global"]})
    assert jobs["score"] == base_jobs["score"] and jobs["evaluate_dense"] == base_jobs["evaluate_dense"]
    assert jobs["plan"] == jobs["evaluate_pruned"] == 2 * base_jobs["plan"]
    assert jobs["report"] == 1


def test_calibration_axis_rescores(tmp_path, base_jobs):
    jobs = _jobs(tmp_path, grid={"calibration.num_sequences": [2, 4]})
    assert jobs["score"] == 2 * base_jobs["score"] and jobs["plan"] == jobs["evaluate_pruned"] == 2 * base_jobs["plan"]
    assert jobs["evaluate_dense"] == base_jobs["evaluate_dense"]  # the dense model reads no calibration


def test_evaluation_axis_only_reevaluates(tmp_path, base_jobs):
    jobs = _jobs(tmp_path, grid={"evaluation.limit": [2, 3]})
    assert (jobs["score"], jobs["plan"]) == (base_jobs["score"], base_jobs["plan"])
    assert jobs["evaluate_dense"] == 2 * base_jobs["evaluate_dense"]
    assert jobs["evaluate_pruned"] == 2 * base_jobs["evaluate_pruned"] and jobs["report"] == 1


def test_criterion_option_axis_rescores_that_criterion_only(tmp_path):
    """An axis on criterion_options.<c>.<option> reaches the jobs of criterion c only."""
    dry_run = _dry_run(tmp_path, criteria=["magnitude", "taylor_entropy_topk"],
                       grid={"criterion_options.taylor_entropy_topk.k": [4, 8]})
    outputs = [out for rule, out in _outputs(dry_run) if rule == "score"]
    assert sorted(o.split(",")[0].split("/scores/")[1] for o in outputs) == [
        "criterion_options.taylor_entropy_topk.k-4/smollm2-135m/taylor_entropy_topk/s0.safetensors",
        "criterion_options.taylor_entropy_topk.k-4/smollm2-135m/taylor_entropy_topk/s1.safetensors",
        "criterion_options.taylor_entropy_topk.k-8/smollm2-135m/taylor_entropy_topk/s0.safetensors",
        "criterion_options.taylor_entropy_topk.k-8/smollm2-135m/taylor_entropy_topk/s1.safetensors",
        "smollm2-135m/magnitude/s0.safetensors"]


def test_variants_never_collide_and_jobs_read_their_points_config(tmp_path):
    grid = {"calibration.num_sequences": [2, 4], "pruning.allocation": ["uniform", "global"],
            "evaluation.limit": [2, 3]}
    out = _dry_run(tmp_path, grid=grid)
    jobs = [(rule, line) for rule, line in _outputs(out) if rule != "assets"]
    outputs = [path.strip() for _, line in jobs for path in line.split(",")]
    assert len(outputs) == len(set(outputs)) and len(jobs) == 6 + 12 + 2 + 24 + 1
    metrics = {p for p in outputs if "/metrics/" in p and p.endswith("/r0.2.json")}
    assert len(metrics) == 8 * 3  # 8 variants x 3 cells
    assert ("results/smoke/metrics/calibration.num_sequences-4_pruning.allocation-global_evaluation.limit-2/"
            "smollm2-135m/taylor_entropy/s1/r0.2.json") in metrics
    # every job reads the config of the point it writes under
    pairs = re.findall(r"--config results/smoke/configs/(\S+)\.yaml .*?--out results/smoke/\w+/([^/\s]+)/", out)
    assert len(pairs) == 6 + 12 + 2 + 24 and all(config == folder for config, folder in pairs)
    assert {"calibration.num_sequences-2_pruning.allocation-global", "evaluation.limit-3"} <= {c for c, _ in pairs}


BAD = {
    "unknown path": ({"pruning.alocation": ["global"]},
                     "invalid config field 'grid.pruning.alocation': 'pruning.alocation' is not a config path"),
    "value the schema rejects": ({"pruning.allocation": ["uniform", "everywhere"]},
                                 ("invalid config field 'grid.pruning.allocation': value 'everywhere': invalid "
                                  "config field 'pruning.allocation': 'everywhere' is not one of")),
    "empty value list": ({"evaluation.limit": []}, "invalid config field 'grid.evaluation.limit': [] should be non-empty"),
    "an axis of its own": ({"ratios": [[0.2], [0.3]]}, "invalid config field 'grid.ratios': ratios cannot be a grid axis"),
    "names too long for a folder": ({path: [value] for path, value in (
        ("calibration.num_sequences", 2), ("calibration.seq_len", 32), ("calibration.batch_size", 2),
        ("evaluation.batch_size", 2), ("evaluation.perplexity.seq_len", 64), ("evaluation.fidelity.num_prompts", 2),
        ("evaluation.fidelity.seq_len", 32), ("evaluation.efficiency.prefill_tokens", 16),
        ("evaluation.efficiency.decode_tokens", 4), ("evaluation.efficiency.repeats", 1))},
        ("invalid config field 'grid': the variant name 'calibration.num_sequences-2_calibration.seq_len-32_calibrati'"
         "... is 307 bytes, over the 250 a folder name can take here")),
    "unknown criterion option": ({"criterion_options.taylor_ce.k": [4]},
                                 "'grid.criterion_options.taylor_ce.k': 'criterion_options.taylor_ce.k' is not a"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_axis_stops_before_any_job(tmp_path, case):
    grid, message = BAD[case]
    proc = _snakemake(tmp_path, "-n", "--configfile", str(_config(tmp_path, grid=grid)), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    (line,) = [x for x in output.splitlines() if "invalid config field 'grid" in x]
    assert message in line, output[-2000:]
    assert "Building DAG" not in output and not (tmp_path / "results").exists()
    assert line.startswith("hfprune workflow: error: ")
    no_snakefile_traceback(output)


@pytest.mark.parametrize("command", [["plan", "--scores", "s.safetensors", "--ratio", "0.2", "--out", "p.json"],
                                     ["compare", "--ratio", "0.2", "taylor_entropy", "magnitude"]])
def test_a_one_point_command_refuses_a_config_of_several_variants(tmp_path, command):
    path = _config(tmp_path, grid={"pruning.allocation": ["uniform", "global"]})
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", command[0], "--config", str(path), "--model",
                           "smollm2-135m", *command[1:]], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"{path}: the grid has 2 variants and this command takes one: pass a "
                                        "variant's config (<results_dir>/<experiment>/configs/<variant>.yaml, "
                                        "written by the workflow)")


@pytest.mark.slow
@pytest.mark.workflow
def test_allocation_grid_end_to_end(tmp_path, smollm2_dir):
    """Two allocations of the smoke grid (one calibration seed): shared scores, a plan and evaluation per
    variant, a report with the axis as a column and per-variant verdicts, MLflow runs carrying the variant."""
    config = _config(tmp_path, experiment="smoke-grid", grid={"pruning.allocation": ["uniform", "global"]},
                     calibration={"source": "calibration", "num_sequences": 2, "seq_len": 32, "batch_size": 2,
                                  "seeds": [0]})
    _snakemake(tmp_path, "--cores", "2", "--configfile", str(config), "--workflow-profile",
               str(ROOT / "profiles/local"), "--config", f"resources_dir={Path(smollm2_dir).resolve().parent.parent}")
    exp = tmp_path / "results/smoke-grid"
    assert sorted(p.relative_to(exp / "scores").as_posix() for p in (exp / "scores").rglob("*.safetensors")) == [
        "smollm2-135m/magnitude/s0.safetensors", "smollm2-135m/taylor_entropy/s0.safetensors"]
    kept = {a: [len(layer["mlp_keep"]) for layer in yaml.safe_load(
        (exp / f"plans/pruning.allocation-{a}/smollm2-135m/taylor_entropy/s0/r0.2.json").read_text())["layers"]]
        for a in ("uniform", "global")}
    assert len(set(kept["uniform"])) == 1 and len(set(kept["global"])) > 1  # the axis reached the plans

    report = exp / "report"
    summary = pd.read_csv(report / "tables/grid_summary.csv")
    assert list(summary.columns[:2]) == ["variant", "pruning.allocation"]
    assert sorted(set(summary["pruning.allocation"])) == ["global", "uniform"]
    assert len(summary) == 2 * 3 and summary["average"].notna().all()  # dense + 2 criteria per variant
    text = (report / "report.md").read_text()
    assert text.index("## Grid") < text.index("## Verdicts") < text.index("# Tables and plots")
    for a in ("uniform", "global"):
        assert f"### variant `pruning.allocation-{a}`" in text
        assert (report / f"tables/pruning.allocation-{a}/smollm2-135m.main.csv").is_file()
        assert (report / f"tables/pruning.allocation-{a}/smollm2-135m.verdict.r0.2.csv").is_file()

    # `hfprune compare` on a variant's config prints that variant's verdict numbers
    detail = pd.read_csv(report / "tables/pruning.allocation-global/smollm2-135m.verdict.r0.2.csv")
    row = detail[(detail["family"] == "baseline") & (detail["measure"] == "logppl:wiki")].iloc[0]
    compare = subprocess.run([sys.executable, "-m", "hfprune.cli", "compare", "--config",
                              str(exp / "configs/pruning.allocation-global.yaml"), "--model", "smollm2-135m",
                              "--ratio", "0.2", "taylor_entropy", "magnitude"], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
    assert compare.returncode == 0, compare.stderr
    assert comparisons.format_difference(row) in next(x for x in compare.stdout.splitlines() if "log-ppl wiki" in x)

    runs = experiment_runs(tmp_path / "results/mlflow.db", "smoke-grid")
    evaluations = [r.data for r in runs if r.data.tags.get("hfprune.stage") == "evaluate"
                   and r.data.tags["hfprune.criterion"] != "dense"]
    assert sorted((e.tags["hfprune.variant"], e.params["grid.pruning.allocation"]) for e in evaluations) == [
        ("pruning.allocation-global", "global")] * 2 + [("pruning.allocation-uniform", "uniform")] * 2
    assert {r.data.tags["hfprune.variant"] for r in runs if r.data.tags.get("hfprune.stage") == "score"} == {"default"}
