"""The Snakemake workflow: DAG shape of the shipped configs (dry runs), config validation before any job,
and (marked `workflow`) a real run of config/smoke.yaml end to end, then a second run that does nothing."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import experiment_runs, no_snakefile_traceback

from hfprune import comparisons
from hfprune.config import cell_seeds, per_ratio
from hfprune.report.paper_tables import criterion_label
from hfprune.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def _snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                          env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _run(workdir: Path, cfg: dict, smollm2_dir) -> Path:
    """A real run of the config `cfg` on 2 cores with the session's SmolLM2 resources; its experiment folder."""
    config = workdir / f"{cfg['experiment']}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _snakemake(workdir, "--cores", "2", "--configfile", str(config), "--workflow-profile",
               str(ROOT / "profiles/local"), "--config", f"resources_dir={Path(smollm2_dir).resolve().parent.parent}")
    return workdir / "results" / cfg["experiment"]


def _dag(workdir: Path, config: Path, *overrides: str) -> tuple[dict[int, str], dict[int, set[int]]]:
    """(job id -> rule, job id -> ids of the jobs it depends on) from `snakemake --dag`."""
    dot = _snakemake(workdir, "--dag", "--configfile", str(config), "--config", *overrides).stdout
    rules = {int(i): r for i, r in re.findall(r"^\s*(\d+)\[label = \"([a-z_]+)", dot, re.MULTILINE)}
    parents = defaultdict(set)
    for src, dst in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.MULTILINE):
        parents[int(dst)].add(int(src))
    return rules, parents


def _parents_by_rule(rules, parents, job) -> Counter:
    return Counter(rules[p] for p in parents[job])


def _check_shape(rules, parents, cfg: dict, recovery: bool, assets: int):
    count = Counter(rules.values())
    cfg = validate_config(cfg)
    n_models, n_ratios = len(cfg["models"]), len(cfg["ratios"])
    seeds = {(m["name"], c): len(cell_seeds(cfg, m["name"], c)) for m in cfg["models"] for c in cfg["criteria"]}
    cells = sum(seeds.values()) * n_ratios
    # once per model x criterion x calibration seed, not per ratio; per ratio for per-ratio options (SDMPrune's)
    assert count["score"] == sum(n for (_, c), n in seeds.items() if not per_ratio(cfg, c))
    assert count["score_by_ratio"] == sum(n * n_ratios for (_, c), n in seeds.items() if per_ratio(cfg, c))
    assert count["plan"] == count["evaluate_pruned"] == cells
    assert count["evaluate_dense"] == n_models
    assert count["recover"] == count["evaluate_recovered"] == (cells if recovery else 0)
    assert count["assets"] == assets and count["report"] == count["all"] == 1
    children = defaultdict(list)
    for job, ps in parents.items():
        for p in ps:
            children[p].append(rules[job])
    for job, rule in rules.items():
        got = _parents_by_rule(rules, parents, job)
        got.pop("assets", None)
        if rule == "score":
            assert got == Counter() and Counter(children[job])["plan"] == n_ratios  # every ratio reuses it
        elif rule == "score_by_ratio":
            assert got == Counter() and Counter(children[job])["plan"] == 1  # its own ratio only
        elif rule == "plan":
            assert sum(got.values()) == 1 and set(got) <= {"score", "score_by_ratio"}
        elif rule in ("recover", "evaluate_pruned"):
            assert got == Counter(plan=1)  # a recovered cell depends on its plan only
        elif rule == "evaluate_recovered":
            assert got == Counter(plan=1, recover=1)
        elif rule == "evaluate_dense":
            assert got == Counter()
        elif rule == "report":
            evaluations = sum(count[r] for r in ("evaluate_dense", "evaluate_pruned", "evaluate_recovered"))
            assert got["evaluate_dense"] + got["evaluate_pruned"] + got["evaluate_recovered"] == evaluations


def test_default_grid_dag(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/default.yaml").read_text())
    # an empty resources folder: both embedded models need their one assets job
    rules, parents = _dag(tmp_path, ROOT / "config/default.yaml", f"resources_dir={tmp_path / 'res'}")
    _check_shape(rules, parents, cfg, recovery=False, assets=2)
    assert len(cfg["models"]) == 2 and len(cfg["criteria"]) >= 4 and len(cfg["ratios"]) >= 2
    # at least one model runs >= 3 calibration seeds for every Taylor criterion; magnitude is scored once
    full = validate_config(cfg)
    assert any(all(len(cell_seeds(full, m["name"], c)) >= 3 for c in full["criteria"] if c.startswith("taylor_"))
               for m in full["models"])
    assert all(len(cell_seeds(full, m["name"], "magnitude")) == 1 for m in full["models"])


def test_threads_per_job_sets_the_score_and_evaluate_threads(tmp_path):
    """resources.threads_per_job (top level, then a model's own) is what each score / evaluate job is given and
    passes to torch; unset, the rules' 4 capped at --cores."""
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg["models"].append({**cfg["models"][0], "name": "second", "resources": {"threads_per_job": 3}})
    first = cfg["models"][0]["name"]
    for top, want in ((1, {first: "1", "second": "3"}), (None, {first: "4", "second": "3"})):
        path = tmp_path / f"threads-{top}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "resources": {"threads_per_job": top}}))
        dry = _snakemake(tmp_path, "-n", "-p", "--cores", "4", "--configfile", str(path), check=False)
        out = dry.stdout + dry.stderr
        assert dry.returncode == 0, out[-3000:]
        jobs = re.findall(r"--threads (\d+) (score|evaluate) --config \S+ --model (\S+)", out)
        assert {stage for _, stage, _ in jobs} == {"score", "evaluate"}, out[-3000:]
        assert {model: n for n, _, model in jobs} == want and len({(n, m) for n, _, m in jobs}) == 2, jobs


@pytest.mark.parametrize("recovery", [True, False])
def test_paper_grid_dag(tmp_path, recovery):
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    cfg["recovery"]["enabled"] = recovery
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rules, parents = _dag(tmp_path, path)
    assert (len(cfg["models"]), len(cfg["criteria"]), len(cfg["ratios"])) == (7, 5, 3)
    _check_shape(rules, parents, cfg, recovery=recovery, assets=0)  # hub models: no assets job


def test_calibration_seeds_are_an_axis(tmp_path):
    """Seeded criteria get a score, plan and evaluation per seed; magnitude (no data, no randomness) one;
    a model's own `seeds` replaces the grid's."""
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg["criteria"] = ["magnitude", "random", "taylor_entropy"]
    cfg["calibration"]["seeds"] = [0, 1, 2]
    cfg["models"].append({"name": "second", "family": "llama", "source": "smollm2-135m", "seeds": [5]})
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rules, _ = _dag(tmp_path, path)
    count = Counter(rules.values())
    assert count["score"] == count["plan"] == count["evaluate_pruned"] == (1 + 3 + 3) + (1 + 1 + 1)
    out = _snakemake(tmp_path, "-n", "-p", "--configfile", str(path)).stdout
    assert "scores/smollm2-135m/taylor_entropy/s2.safetensors" in out and "--seed 2" in out
    assert "scores/second/random/s5.safetensors" in out and "scores/smollm2-135m/magnitude/s1" not in out


def test_gpu_jobs_ask_for_their_gpus_and_run_under_slots(tmp_path):
    # resources.gpus_per_job: the rules of each stage ask for that many, and the slot wrapper is told
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    cfg["resources"], cfg["device_map"] = {"gpus_per_job": {"score": 2, "recover": 3, "evaluate": 2}}, "auto"
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    two = ["--configfile", str(tmp_path / "two.yaml")]
    blocks = _snakemake(tmp_path, "-n", "-p", *two).stdout.split("\nrule ")
    for rule, n in (("score", 2), ("score_by_ratio", 2), ("recover", 3), ("evaluate_dense", 2), ("evaluate_pruned", 2),
                    ("evaluate_recovered", 2)):
        block = next(b for b in blocks if b.startswith(f"{rule}:"))
        assert re.search(rf"resources: .*gpu={n}\b", block), block
        assert f"HFPRUNE_JOB_GPUS={n} " in block and "-m hfprune.gpu -- " in block, block
    plan = next(b for b in blocks if b.startswith("plan:"))
    assert "gpu=" not in plan and "hfprune.gpu" not in plan
    # a job that needs more GPUs than the run may use could never start: one line, naming the field
    proc = _snakemake(tmp_path, "-n", "--resources", "gpu=2", *two, check=False)
    assert proc.returncode != 0
    assert ("invalid config field 'resources.gpus_per_job': recover jobs of model 'llama-2-7b' need 3 GPUs, more "
            "than --resources gpu=2") in proc.stdout + proc.stderr
    no_snakefile_traceback(proc.stdout + proc.stderr)
    # the CPU grid asks for no GPU at all
    out = _snakemake(tmp_path, "-n", "-p", "--configfile", str(ROOT / "config/smoke.yaml")).stdout
    assert "gpu=1" not in out and "hfprune.gpu" not in out


BAD = {
    "unknown criterion": ({"criteria": ["magnitude", "taylor_foo"]}, "criteria[1]"),
    "ratio of 1": ({"ratios": [0.2, 1.0]}, "ratios[1]"),
    "negative ratio": ({"ratios": [-0.1]}, "ratios[0]"),
    "unknown family": ({"models": [{"name": "m", "family": "gpt2", "source": "smollm2-135m"}]},
                       "models[0].family"),
    "duplicate model names": ({"models": [{"name": "m", "family": "llama", "source": "smollm2-135m"}] * 2},
                              "models': duplicate model name(s) m"),
    "wrong type": ({"calibration": {"num_sequences": "many"}}, "calibration.num_sequences"),
    # decided by the model's config alone: found before scoring, not by the plan job hours later
    "ratio leaving no neuron": ({"ratios": [0.2, 0.7]}, "ratios[1]' for model 'smollm2-135m': ratio 0.7 removes"),
    "missing local model": ({"models": [{"name": "m", "family": "llama", "source": "/no/such/model"}]},
                            "models[0]': model 'm': local source folder '/no/such/model' does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_config_stops_before_any_job(tmp_path, case):
    change, field = BAD[case]
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"invalid config field '{field}" in output, output[-2000:]
    assert "Building DAG" not in output and not (tmp_path / "results").exists()
    no_snakefile_traceback(output)


@pytest.mark.slow
@pytest.mark.workflow
def test_smoke_workflow_end_to_end(tmp_path, smollm2_dir):
    smoke = ROOT / "config/smoke.yaml"
    cfg = yaml.safe_load(smoke.read_text())
    # score jobs get 1 thread (below torch's defaults of this machine's cores), evaluate jobs their rule's 2
    run = ["--cores", "2", "--set-threads", "score=1", "--configfile", str(smoke), "--workflow-profile",
           str(ROOT / "profiles/local"), "--config", f"resources_dir={Path(smollm2_dir).resolve().parent.parent}"]
    _snakemake(tmp_path, *run)
    exp = tmp_path / "results" / cfg["experiment"]
    # each job's torch pools (intra- and inter-op) are its rule's threads, as the job's torch reports them
    for log in (exp / "logs").rglob("*.log"):
        stage = log.relative_to(exp / "logs").parts[0]
        if stage in ("score", "evaluate"):
            n = 1 if stage == "score" else 2
            assert f"torch threads: intra-op {n}, inter-op {n}" in log.read_text(), log
    report_dir = exp / "report"

    # tables: dense + every criterion at the ratio, with the task columns, perplexity, fidelity and size
    main = pd.read_csv(report_dir / "tables/smollm2-135m.main.csv")
    assert main["method"].tolist() == ["dense", *map(criterion_label, cfg["criteria"])]
    assert {"arc_easy", "boolq", "average", "ppl_wiki", "js_distance", "params"} <= set(main.columns)
    assert main[["arc_easy", "boolq", "average", "ppl_wiki", "params"]].notna().all().all()
    assert (main["params"].iloc[1:] < main["params"].iloc[0]).all()
    assert main["js_distance"].iloc[1:].between(0, 1).all()
    for name in ("main", "ablation", "fidelity"):
        for fmt in ("csv", "md", "tex"):
            assert (report_dir / f"tables/smollm2-135m.{name}.{fmt}").stat().st_size > 0
    for plot in ("avg_vs_ratio", "ppl_vs_ratio", "neurons_kept"):
        assert (report_dir / f"plots/smollm2-135m.{plot}.png").read_bytes()[:4] == b"\x89PNG"
    text = (report_dir / "report.md").read_text()
    assert "have no metrics" not in text
    # verdicts first: taylor_entropy vs the baseline (magnitude, the first criterion: the grid has no taylor_ce)
    # and vs dense, each difference with its CI, over 2 calibration seeds
    assert text.index("## Verdicts") < text.index("# Tables and plots")
    verdict = re.search(r"^\| taylor_entropy − magnitude \| 2 .*$", text, re.MULTILINE)
    assert verdict and re.search(r"[+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]", verdict.group(0))
    detail = pd.read_csv(report_dir / "tables/smollm2-135m.verdict.r0.2.csv")
    assert {"logppl:wiki", "js:lambada", "acc:average", "gold_prob:offline_boolq"} <= set(detail["measure"])
    # `hfprune compare` prints the report's numbers for the same pair
    compare = subprocess.run([sys.executable, "-m", "hfprune.cli", "compare", "--config",
                              str(exp / "config.yaml"), "--model", "smollm2-135m", "--ratio", "0.2",
                              "taylor_entropy", "magnitude"], cwd=tmp_path, capture_output=True, text=True,
                             check=False)
    assert compare.returncode == 0, compare.stderr
    for _, row in detail[(detail["family"] == "baseline") & detail["measure"].isin(
            ["logppl:wiki", "js:lambada", "acc:average"])].iterrows():
        line = next(x for x in compare.stdout.splitlines() if x.startswith(f"| {row['label']} "))
        assert comparisons.format_difference(row) in line, (line, row.to_dict())
    # every job left its log and benchmark (3 score, 3 plan, 4 evaluate, 1 report)
    assert len(list((exp / "logs").rglob("*.log"))) == len(list((exp / "benchmarks").rglob("*.tsv"))) == 11
    assert len(list((exp / "metrics").rglob("*.units.parquet"))) == 4

    # MLflow: one parent run for the model, a child per score and per evaluate job, all finished
    runs = experiment_runs(tmp_path / "results/mlflow.db", cfg["experiment"])
    parents = [r for r in runs if r.data.tags.get("hfprune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hfprune.role") == "job"]
    assert len(parents) == 1 and len(children) == 3 + 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    evaluations = {c.info.run_name: c for c in children if c.data.tags["hfprune.stage"] == "evaluate"}
    assert set(evaluations) == {"evaluate: dense", "evaluate: magnitude s0 r0.2", "evaluate: taylor_entropy s0 r0.2",
                                "evaluate: taylor_entropy s1 r0.2"}
    seeds = [evaluations[f"evaluate: taylor_entropy s{s} r0.2"].data for s in (0, 1)]
    table_row = main[main["method"] == criterion_label("taylor_entropy")].iloc[0]
    assert sum(c.metrics["average"] for c in seeds) * 50 == pytest.approx(table_row["average"])  # mean of 2, in %
    assert math.exp(sum(math.log(c.metrics["ppl/wiki"]) for c in seeds) / 2) == pytest.approx(table_row["ppl_wiki"])
    assert [c.tags["hfprune.seed"] for c in seeds] == ["0", "1"]
    assert all(int(c.params["neurons_kept"]) > 0 and c.params["ratio"] == "0.2" for c in seeds)
    scores = [c for c in children if c.data.tags["hfprune.stage"] == "score"]
    assert all(c.data.metrics["score_seconds"] > 0 for c in scores)

    # Snakemake's self-contained HTML report: the workflow description, report.md, every table and plot
    html = exp / "report.html"
    _snakemake(tmp_path, "--report", str(html), *run[4:])
    page = html.read_text()
    assert html.stat().st_size > 100_000 and "smollm2-135m.forest.png" in page and "Verdicts" in page
    assert "smollm2-135m.verdict.r0.2.csv" in page and "structured MLP-neuron pruning" in page

    # nothing changed: a second run does no work
    again = _snakemake(tmp_path, *run)
    assert "Nothing to be done" in again.stdout + again.stderr
    # how jobs run (resources.*, top level and a model's own) is no setting of theirs: still nothing to do
    moved = dict(cfg, resources={"gpus_per_job": 2, "gpu_memory_gb": 80, "max_memory": {0: "70GiB"},
                                 "allow_offload": True},
                 models=[dict(m, resources={"gpus_per_job": {"score": 3}}) for m in cfg["models"]])
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(moved))
    dry = _snakemake(tmp_path, "-n", *run[:4], "--configfile", str(tmp_path / "moved.yaml"), "--config", run[-1])
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    # an evaluation setting changed: only the evaluations and the report rerun (scores and plans are kept)
    edited = dict(cfg, evaluation={**cfg["evaluation"], "limit": 2})
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    dry = _snakemake(tmp_path, "-n", "--quiet", "rules", *run[:4], "--configfile", str(tmp_path / "edited.yaml"),
                     "--config", run[-1])
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, re.MULTILINE))
    assert jobs == {"evaluate_dense": "1", "evaluate_pruned": "3", "report": "1", "all": "1", "total": "6"}


@pytest.mark.slow
@pytest.mark.workflow
def test_smoke_workflow_with_recovery_has_before_and_after_rows(tmp_path, smollm2_dir):
    """Recovery on: each cell is evaluated before and after LoRA, the table marks both, MLflow has the curve."""
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg.update(experiment="smoke-lora", criteria=["magnitude"],
               recovery={"enabled": True, "max_steps": 3, "num_samples": 6, "seq_len": 32, "batch_size": 2,
                         "lora": {"r": 4, "alpha": 8}})
    exp = _run(tmp_path, cfg, smollm2_dir)

    main = pd.read_csv(exp / "report/tables/smollm2-135m.main.csv")
    ours = main[main["source"] == "ours"]
    assert ours["method"].tolist() == ["dense", "magnitude", "magnitude +LoRA"]
    assert ours["fine_tuned"].tolist() == ["not fine-tuned", "no", "LoRA"]
    before, after = ours.iloc[1], ours.iloc[2]
    assert before["params"] == after["params"]  # recovery keeps the pruned shapes
    assert after["ppl_wiki"] != before["ppl_wiki"]  # the merged adapter changed the model

    runs = experiment_runs(tmp_path / "results/mlflow.db", cfg["experiment"])
    (recover,) = [r for r in runs if r.data.tags.get("hfprune.stage") == "recover"]
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'results/mlflow.db'}").get_metric_history(
        recover.info.run_id, "recovery_loss")
    assert [m.step for m in history] == [0, 1, 2] and all(m.value > 0 for m in history)
    assert {r.info.status for r in runs} == {"FINISHED"}


def _absolute_fixture_paths(cfg: dict) -> dict:
    """The rehearsal config's repository-relative data paths made absolute (the test runs in a temp folder)."""
    cfg["hub_datasets_dir"] = str(ROOT / cfg["hub_datasets_dir"])
    for fields in cfg["evaluation"]["task_data"].values():
        files = fields["dataset_kwargs"]["data_files"]
        for split, path in files.items():
            files[split] = str(ROOT / path)
    return cfg


@pytest.mark.slow
@pytest.mark.workflow
def test_rehearsal_runs_the_paper_path(tmp_path, smollm2_dir):
    """config/rehearsal.yaml, config/paper.yaml's code paths on CPU: bf16 with a device_map and gradient
    checkpointing, C4 calibration per document, SDMPrune's per-ratio options, both Table 1 methods, paper10
    through the stock task YAMLs on hub-format files, Wanda-protocol WikiText-2 / C4 perplexity, the released LoRA
    recipe on LaMini (packed rows, unmerged adapter), every report form, MLflow."""
    paper = validate_config(yaml.safe_load((ROOT / "config/paper.yaml").read_text()))
    cfg = _absolute_fixture_paths(yaml.safe_load((ROOT / "config/rehearsal.yaml").read_text()))
    rehearsal = validate_config(cfg)
    # the same settings as the paper wherever the rehearsal is not just smaller or local
    for key in ("dtype", "criteria", "pruning", "scoring"):
        assert rehearsal[key] == paper[key], key
    for section, keys in (("calibration", ("source", "sampling", "batch_size")),
                          ("evaluation", ("suite", "batch_size", "backend", "metrics")),
                          ("recovery", ("enabled", "data", "recipe", "learning_rate", "schedule", "lora"))):
        assert {k: rehearsal[section][k] for k in keys} == {k: paper[section][k] for k in keys}, section
    assert rehearsal["evaluation"]["perplexity"]["sources"] == paper["evaluation"]["perplexity"]["sources"]
    assert rehearsal["evaluation"]["perplexity"]["protocol"] == paper["evaluation"]["perplexity"]["protocol"]
    assert rehearsal["device_map"] is not None and rehearsal["device"] == "cpu"

    exp = _run(tmp_path, cfg, smollm2_dir)

    main = pd.read_csv(exp / "report/tables/smollm2-135m.main.csv")
    ours = main[main["source"] == "ours"]
    crits = cfg["criteria"]
    assert ours["method"].tolist() == ["dense"] + [f"{criterion_label(c)}{lora}" for c in crits for lora in ("", " +LoRA")]
    tasks = ["arc_challenge", "arc_easy", "boolq", "crows_pairs", "openbookqa", "piqa", "race", "siqa",
             "truthfulqa_mc2", "winogrande"]
    assert ours[tasks + ["ppl_wikitext2", "ppl_c4"]].notna().all().all()
    for c in crits:
        metrics = json.loads((exp / f"metrics/smollm2-135m/{c}/s0/r0.2.recovered.json").read_text())
        assert metrics["meta"]["recovered_adapter"]
        assert {s: p["protocol"] for s, p in metrics["perplexity"].items()} == {"wikitext2": "wanda", "c4": "wanda"}
        recovery = json.loads((exp / f"recovered/smollm2-135m/{c}/s0/r0.2/recovery.json").read_text())
        settings = recovery["settings"]
        assert (settings["recipe"], settings["autocast"], settings["adapter"]) == ("released", "bfloat16", "unmerged")
        assert recovery["data"]["source"] == "MBZUAI/LaMini-instruction" and recovery["data"]["label_tokens"] > 0
    score_meta = json.loads((exp / "scores/smollm2-135m/sdmprune/s0.r0.2.json").read_text())
    assert score_meta["calibration"]["sampling"] == "per_document"
    assert score_meta["criterion_options"]["alpha"] == 0.4
    text = (exp / "report/report.md").read_text()
    assert text.index("## Verdicts") < text.index("# Tables and plots") and "have no metrics" not in text
    runs = experiment_runs(tmp_path / "results/mlflow.db", cfg["experiment"])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
@pytest.mark.workflow
def test_own_calibration_text_and_user_task_end_to_end(tmp_path, smollm2_dir, monkeypatch):
    """An open grid: your own calibration text (a JSONL file) and your own lm-eval task (a YAML in a temp folder,
    its data a local JSONL file) through score, plan, evaluate and report."""
    from hfprune.data import load_texts, texts_hash

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # the jobs' json builds stay under tmp
    bodies = list(load_texts("calibration")[:40])
    (tmp_path / "my_text.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in bodies))
    rows = [("Is the sky blue on a clear day?", 1), ("Can a fish climb a tree?", 0), ("Is fire hot?", 1),
            ("Is the sun cold?", 0)]
    (tmp_path / "yesno.jsonl").write_text("".join(json.dumps({"question": q, "label": y}) + "\n" for q, y in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/my_yesno.yaml").write_text(yaml.safe_dump({
        "task": "my_yesno", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "yesno.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": ["no", "yes"], "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    cfg = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    cfg.update(experiment="own", criteria=["taylor_entropy"],
               calibration={**cfg["calibration"], "source": {"path": str(tmp_path / "my_text.jsonl"), "field": "body"},
                            "seeds": [0]},
               evaluation={**cfg["evaluation"], "tasks": ["arc_easy", {"task": "my_yesno", "metric": "acc"}],
                           "include_path": str(tmp_path / "tasks"), "fidelity": {"enabled": False}})
    exp = _run(tmp_path, cfg, smollm2_dir)

    sidecar = json.loads((exp / "scores/smollm2-135m/taylor_entropy/s0.json").read_text())
    assert sidecar["calibration"]["texts_sha256"] == texts_hash(bodies)  # scored on exactly the file's texts
    main = pd.read_csv(exp / "report/tables/smollm2-135m.main.csv")
    assert main[["arc_easy", "my_yesno"]].notna().all().all()
    metrics = json.loads((exp / "metrics/smollm2-135m/taylor_entropy/s0/r0.2.json").read_text())
    assert metrics["tasks"]["my_yesno"]["n"] == 3 and metrics["tasks"]["my_yesno"]["metric"] == "acc"
