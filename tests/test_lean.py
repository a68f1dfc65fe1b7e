"""Lean jobs (issue 27): offline tasks built from their drawn docs give lm-eval's own docs and records, the
cached rebuilt splits equal a fresh rebuild, and an evaluate job records where its wall time went and uploads
its two files once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest
import yaml
from conftest import REPO_RESOURCES

from hfprune.evaluation.records import read_records, records_path, task_records
from hfprune.evaluation.runner import evaluate_tasks, select_tasks
from hfprune.tasks import TASK_DIR, offline, resolve_suite
from hfprune.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]



def _frame(selection, raw) -> pd.DataFrame:
    rows = pd.DataFrame(task_records(selection, raw["samples"]))
    return rows.sort_values(["group", "measure", "unit"], ignore_index=True)


def test_preselected_offline_tasks_evaluate_lm_evals_docs_with_identical_records(tiny_llama_dir):
    """Every offline task (each offline_*.yaml, so a new one is covered too) built from its drawn docs alone
    asks the model about the same docs as lm-eval's own `samples` route over the whole split, with the same
    doc ids, and yields identical results and per-unit records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = sorted(p.stem for p in TASK_DIR.glob("offline_*.yaml"))
    specs = resolve_suite("offline7", names)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    lean = select_tasks(specs, 3, 1234)
    stock = select_tasks(specs, 3, 1234, preselect=False)
    assert lean.preselected == set(names) and not stock.preselected
    assert lean.docs_total == stock.docs_total and lean.samples == stock.samples
    assert all(len(lean.tasks[n].eval_docs) == 3 for n in names)
    assert all(len(stock.tasks[n].eval_docs) == stock.docs_total[n] for n in names)
    lean_tasks, lean_meta, lean_raw = evaluate_tasks(model, tok, lean, 4, log_samples=True)
    stock_tasks, stock_meta, stock_raw = evaluate_tasks(model, tok, stock, 4, log_samples=True)
    assert lean_tasks == stock_tasks
    assert lean_meta["subsample_indices"] == stock_meta["subsample_indices"]
    for name in names:  # the same docs under the same (full-split) ids, the same prompts
        ours = {lean.doc_id(name, s["doc_id"]): (s["doc"], s["arguments"]) for s in lean_raw["samples"][name]}
        theirs = {s["doc_id"]: (s["doc"], s["arguments"]) for s in stock_raw["samples"][name]}
        assert ours == theirs and sorted(ours) == stock.samples[name]
    pd.testing.assert_frame_equal(_frame(lean, lean_raw), _frame(stock, stock_raw))


def test_cached_split_equals_a_fresh_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    fresh = offline.rebuild("openbookqa")
    first = offline._cached("openbookqa")  # rebuilds and saves
    saved = list(tmp_path.glob("hfprune_offline/openbookqa-*"))
    assert len(saved) == 1 and not list(tmp_path.glob("hfprune_offline/*.tmp*"))
    second = offline._cached("openbookqa")  # memory-mapped from the saved copy
    assert second.cache_files and second.features == fresh.features
    assert first.to_list() == second.to_list() == fresh.to_list()
    for arrow in saved[0].glob("*.arrow"):  # a damaged copy is rebuilt, not trusted
        arrow.write_bytes(b"broken")
    assert offline._cached("openbookqa").to_list() == fresh.to_list()


@pytest.mark.slow
def test_evaluate_job_times_its_wall_and_uploads_once(tiny_llama_dir, tmp_path):
    """A real `hfprune evaluate` process: meta.timing accounts for its wall time since process start, the log
    has the timing line, and the MLflow run holds the metrics JSON and the records from one upload."""
    from mlflow import MlflowClient

    cfg = validate_config({
        "experiment": "lean", "results_dir": str(tmp_path / "results"), "resources_dir": REPO_RESOURCES,
        "models": [{"name": "tiny", "family": "llama", "source": str(tiny_llama_dir)}], "criteria": ["random"],
        "ratios": [0.2], "device": "cpu", "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "evaluation": {"tasks": ["arc_easy", "hellaswag"], "limit": 2, "batch_size": 4,
                       "perplexity": {"sources": ["wiki"], "seq_len": 32, "max_tokens": 128},
                       "fidelity": {"enabled": False}, "efficiency": {"enabled": False}}})
    config, out = tmp_path / "c.yaml", tmp_path / "results/lean/metrics/tiny/dense.json"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", "evaluate", "--config", str(config), "--model",
                           "tiny", "--out", str(out)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.read_text())["meta"]
    timing = meta["timing"]
    assert timing["stages"] == pytest.approx(meta["seconds"], abs=1e-3)
    parts = timing["startup"] + timing["setup"] + timing["tracking"] + sum(timing["stages"].values())
    assert 0 < timing["startup"] and 0 < timing["setup"] and 0 < timing["tracking"]
    assert timing["other"] >= 0 and timing["wall"] == pytest.approx(parts + timing["other"], abs=0.01)
    assert "timing: wall " in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("lean").experiment_id])[0]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "metrics")) == [
        "metrics/dense.json", "metrics/dense.units.parquet"]
    local = Path(client.download_artifacts(run.info.run_id, "metrics", str(tmp_path / "down")))
    assert (local / "dense.json").read_bytes() == out.read_bytes()
    assert read_records(local / "dense.units.parquet").equals(read_records(records_path(out)))
