"""MLflow tracking on a temporary SQLite store, read back through MlflowClient."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from hfprune import tracking, tracking_store
from hfprune.plan import make_plan
from hfprune.scorer import score_model
from hfprune.validation import validate_config


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    """An empty store with MLflow's schema in place: the migration takes seconds, so tests copy it."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    tracking_store.Store(f"sqlite:///{path}")
    return path


@pytest.fixture
def store_dir(tmp_path, migrated_db):
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return tmp_path


def _cfg(tmp_path, enabled: bool = True) -> dict:
    return validate_config({
        "experiment": "trk", "results_dir": str(tmp_path / "results"),
        "models": [{"name": "tiny", "family": "llama", "source": str(tmp_path / "tiny")},
                   {"name": "other", "family": "qwen2", "source": str(tmp_path / "other")}],
        "criteria": ["magnitude"], "ratios": [0.2],
        "tracking": {"enabled": enabled, "uri": f"sqlite:///{tmp_path}/mlflow.db"},
    })


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_store.tracking_uri(cfg))


def _runs(client, cfg):
    exp = client.get_experiment_by_name(cfg["experiment"])
    return client.search_runs([exp.experiment_id], max_results=100)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_parent_and_child_runs_with_params_metrics_and_artifacts(store_dir):
    tmp_path = store_dir
    cfg = _cfg(tmp_path)
    model = tiny_model("llama")
    scores = score_model(model, [], ["magnitude"])["magnitude"]
    plan = make_plan(scores, model.config, 0.2, "llama", meta={"model": "tiny", "criterion": "magnitude"})
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    metrics = {"cell": {"model": "tiny", "family": "llama", "criterion": "magnitude", "ratio": 0.2,
                        "recovered": False},
               "tasks": {"offline_boolq": {"metric": "acc", "value": 0.6, "stderr": 0.05, "n": 100,
                                           "column": "boolq"}},
               "average": 0.6, "perplexity": {"wiki": {"ppl": 31.5, "tokens": 4096, "seq_len": 256}},
               "fidelity": {"js_distance": 0.21, "topk_jaccard": 0.5, "kl": 0.3, "k": 15, "prompts": 8},
               "efficiency": None, "meta": {}}

    with tracking.stage_run(cfg, model="tiny", stage="evaluate") as dense_run:
        dense_run.log_metrics({"average": 0.7, "skipped": None, "nan": float("nan")})
    with tracking.stage_run(cfg, model="tiny", stage="evaluate", criterion="magnitude", ratio=0.2) as run:
        # the run is visible as RUNNING while the job works
        assert _client(cfg).get_run(run.run_id).info.status == "RUNNING"
        tracking.log_plan(run, plan, plan_file)
        tracking.log_cell_metrics(run, metrics)
    with tracking.stage_run(cfg, model="other", stage="score", criterion="magnitude"):
        pass

    client = _client(cfg)
    runs = _runs(client, cfg)
    parents = {r.data.tags["hfprune.model"]: r for r in runs if r.data.tags.get("hfprune.role") == "parent"}
    children = [r for r in runs if r.data.tags.get("hfprune.role") == "job"]
    assert sorted(parents) == ["other", "tiny"] and len(children) == 3
    for child in children:
        parent = parents[child.data.tags["hfprune.model"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    assert all(p.info.status == "FINISHED" for p in parents.values())

    cell = client.get_run(run.run_id)
    kept = [len(layer["mlp_keep"]) for layer in plan["layers"]]
    assert cell.info.run_name == "evaluate: magnitude s0 r0.2"  # the cell's calibration draw label
    p = cell.data.params
    assert (p["model"], p["family"], p["criterion"], p["ratio"], p["allocation"]) == (
        "tiny", "llama", "magnitude", "0.2", "uniform")
    assert int(p["neurons_kept"]) == sum(kept) and json.loads(p["neurons_kept_per_layer"]) == kept
    assert p["versions.torch"] == torch.__version__ and p["calibration.num_sequences"] == "16"
    m = cell.data.metrics
    assert m["task/offline_boolq/acc"] == pytest.approx(0.6) and m["ppl/wiki"] == pytest.approx(31.5)
    assert m["fidelity/js_distance"] == pytest.approx(0.21)
    assert m["params_pruned"] == plan["params_pruned"] and m["achieved_ratio"] == pytest.approx(plan["achieved_ratio"])
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "plan")} | {
        a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert artifacts == {"plan/plan.json", "plots/neurons_kept.png"}
    dense = client.get_run(dense_run.run_id)
    assert dense.info.run_name == "evaluate: dense" and set(dense.data.metrics) == {"average"}
    # artifacts live next to the database, not in ./mlruns of whatever folder a job runs in
    assert (tmp_path / "mlartifacts" / "trk").is_dir()


def test_a_failing_job_marks_its_run_failed(store_dir):
    tmp_path = store_dir
    cfg = _cfg(tmp_path)
    with (pytest.raises(ValueError, match="boom"),
          tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as run):
        raise ValueError("boom")
    assert _client(cfg).get_run(run.run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_no_op(tmp_path):
    cfg = _cfg(tmp_path, enabled=False)
    with tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as run:
        run.log_params({"a": 1})
        run.log_metrics({"b": 2.0})
        run.log_artifact(__file__)
        assert not run.enabled
    assert not (tmp_path / "mlflow.db").exists()


def test_uri_resolution(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg["tracking"]["uri"] = "sqlite:///results/mlflow.db"
    assert tracking_store.tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/results/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_store.tracking_uri(cfg) == "http://tracking.example:5000"


JOB = """
import json, sys
from hfprune import tracking
cfg = json.loads(open(sys.argv[1]).read())
with tracking.stage_run(cfg, model="tiny", stage="evaluate", criterion="magnitude", ratio=float(sys.argv[2])) as r:
    r.log_metrics({"average": float(sys.argv[2])})
"""


def test_concurrent_jobs_share_one_parent_run(store_dir):
    """Jobs starting together: one experiment, one parent run, every child linked to it."""
    tmp_path = store_dir
    cfg = _cfg(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path / "cfg.json"), str(r)])
             for r in (0.1, 0.2, 0.3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    runs = _runs(_client(cfg), cfg)
    parents = [r for r in runs if r.data.tags.get("hfprune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hfprune.role") == "job"]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.metrics["average"] for c in children) == [0.1, 0.2, 0.3]
    assert parents[0].info.status == "FINISHED"


def test_experiment_opens_on_its_runs_table_and_runs_carry_the_filter_keys(store_dir):
    """MLflow 3's UI reads the experiment tag mlflow.experimentKind; without it the experiment opens in the GenAI
    view. Set when hfprune creates the experiment, and added to one created without it."""
    from mlflow import MlflowClient

    tmp_path = store_dir
    cfg = _cfg(tmp_path)
    cfg["calibration"]["seed"] = 7
    with tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as run:
        pass
    client = _client(cfg)
    assert client.get_experiment_by_name("trk").tags["mlflow.experimentKind"] == "custom_model_development"
    child = client.get_run(run.run_id)
    p, t = child.data.params, child.data.tags
    assert (p["model"], p["criterion"], p["ratio"], p["seed"], p["global_seed"], p["variant"]) == (
        "tiny", "magnitude", "0.0", "7", "0", "default")
    assert (t["hfprune.model"], t["hfprune.criterion"], t["hfprune.seed"], t["hfprune.variant"]) == (
        "tiny", "magnitude", "7", "default")
    # an experiment an older hfprune (or anyone) created without the tag gets it on the next job
    exp_id = MlflowClient(tracking_store.tracking_uri(cfg)).create_experiment("old")
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    with tracking.stage_run({**cfg, "experiment": "old"}, model="tiny", stage="evaluate", criterion="magnitude",
                            ratio=0.2) as run:
        pass
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_run(run.run_id).data.tags["hfprune.ratio"] == "0.2"


def test_lists_and_dicts_become_one_kind_of_text_in_tags_and_params(store_dir):
    """A model entry's own `seeds` list (and any list or dict) reaches the parent run's tags as JSON text: the
    SQLite store rejects a list outright ("type 'list' is not supported"), which left jobs untracked."""
    cfg = _cfg(store_dir)
    cfg["models"][0].update(seeds=[0, 3], paper_name="Llama-2-7B", resources={"gpus_per_job": 2})
    with tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as run:
        assert run.enabled
        run.set_tags({"hfprune.extra": {"a": [1, 2]}, "hfprune.flag": True})
        run.log_params({"nested": {"list": [1, "x"], "none": None}})
    client = _client(cfg)
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED"
    assert (child.data.tags["hfprune.extra.a"], child.data.tags["hfprune.flag"]) == ("[1, 2]", "true")
    assert (child.data.params["nested.list"], child.data.params["nested.none"]) == ('[1, "x"]', "null")
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["hfprune.seeds"] == "[0, 3]" and parent.data.tags["hfprune.paper_name"] == "Llama-2-7B"
    assert not any(k.startswith("hfprune.resources") for k in parent.data.tags)  # operational: not identity


def test_ui_prints_the_runs_table_link_and_its_server_answers(store_dir):
    """`hfprune ui` starts `mlflow ui` on the config's SQLite store and prints the link to the experiment's runs
    in the Model-training view; the server behind the link answers (REST) for that experiment."""
    import signal
    import urllib.request

    from mlflow_server import free_port

    cfg = _cfg(store_dir)
    with tracking.stage_run(cfg, model="tiny", stage="score", criterion="magnitude") as run:
        pass
    exp_id = _client(cfg).get_experiment_by_name("trk").experiment_id
    (store_dir / "c.yaml").write_text(json.dumps(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hfprune.cli", "ui", "--config", str(store_dir / "c.yaml"),
                             "--port", str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(f"{api}/experiments/get?experiment_id={exp_id}", timeout=10) as res:
            assert json.loads(res.read())["experiment"]["name"] == "trk"
        with urllib.request.urlopen(f"{api}/runs/get?run_id={run.run_id}", timeout=10) as res:
            assert json.loads(res.read())["run"]["info"]["status"] == "FINISHED"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the command stops the server it started
        proc.wait(timeout=60)
    # a config whose store has no such experiment: one line, nothing started
    other = subprocess.run([sys.executable, "-m", "hfprune.cli", "ui", "--config", str(store_dir / "c.yaml")],
                           capture_output=True, text=True, check=False,
                           env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store_dir}/none.db"})
    assert other.returncode == 2 and "does not exist yet" in other.stderr and "Traceback" not in other.stderr
