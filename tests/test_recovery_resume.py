"""Recovery that finishes: checkpoints and resume across real signals (subprocesses of the real CLI), DDP over
two CPU processes (torchrun, gloo) equal to one process, chunked cross-entropy, and the one-line bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from test_recovery import KEEPS, local_model, make_cfg, random_plan  # noqa: F401  (local_model: a fixture)

from hfprune import checkpoints
from hfprune.errors import ConfigError
from hfprune.recovery import run_recovery
from hfprune.recovery_data import collate, pack
from hfprune.recovery_steps import accumulation
from hfprune.recovery_train import token_losses
from hfprune.surgery import load_pruned

REPO = Path(__file__).resolve().parents[1]


def tiny_local_model(path: Path) -> Path:
    """A tiny random LLaMA with the real SmolLM2 tokenizer in a local folder (as the fixture `local_model`)."""
    from conftest import REPO_RESOURCES

    from hfprune.models import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)
    tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def job(tmp_path: Path, local, name: str, tracking: bool = False, **recovery) -> tuple[Path, list[str]]:
    """A recover job's config + plan in tmp_path/name; returns (out dir, the CLI's argv)."""
    root = tmp_path / name
    root.mkdir()
    cfg = make_cfg(str(local), seq_len=32, num_samples=8, batch_size=2,
                   lora={"target_modules": ["q_proj", "down_proj"], "dropout": 0.0}, **recovery)
    cfg["results_dir"] = str(root / "results")
    if tracking:
        cfg["tracking"] = {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}"}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (root / "plan.json").write_text(json.dumps(random_plan(96, KEEPS)))
    out = root / "results" / cfg["experiment"] / "recovered" / "m"
    return out, ["recover", "--config", str(root / "cfg.yaml"), "--model", "m", "--plan", str(root / "plan.json"),
                 "--out", str(out)]


def cli(argv, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "hfprune.cli", *argv], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **kw)


def interrupt(argv, sig: int, after: str) -> tuple[int, str]:
    """Run the CLI, send `sig` once its log shows `after`; (exit code, log)."""
    proc = cli(argv)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if after in line:
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + err


def weights(out: Path) -> dict:
    return load_pruned(out).state_dict()


def assert_same(a: dict, b: dict, tol: float = 1e-5):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < tol, worst


@pytest.mark.slow
def test_stopped_by_signals_then_resumed_equals_an_uninterrupted_run(local_model, tmp_path):  # noqa: F811
    """SIGUSR1, then SIGTERM, each checkpoint and exit non-zero; the third run resumes and finishes with the
    adapter of a run never interrupted, in the same MLflow run (FINISHED); the checkpoints are gone."""
    from mlflow import MlflowClient

    settings = {"max_steps": 30, "learning_rate": 1e-2, "log_every": 1}
    ref_out, ref_argv = job(tmp_path, local_model, "ref", **settings, checkpoint_every=None)
    out, argv = job(tmp_path, local_model, "job", tracking=True, **settings, checkpoint_every=None)
    reference = cli(ref_argv)
    code, log = interrupt(argv, signal.SIGUSR1, "recovery step 2/30")
    assert code != 0 and "SIGUSR1 received" in log and "stopped by a signal" in log, log[-3000:]
    root = checkpoints.checkpoint_root(yaml.safe_load(Path(argv[2]).read_text()), out)
    first = checkpoints.latest(root)
    assert first is not None and not out.exists()
    step1 = checkpoints.read_meta(first)["step"]

    code, log = interrupt(argv, signal.SIGTERM, f"recovery step {step1 + 2}/30")
    assert code != 0 and f"resuming from step {step1}" in log, log[-3000:]
    step2 = checkpoints.read_meta(checkpoints.latest(root))["step"]
    assert step2 > step1

    proc = cli(argv)
    stdout, log = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert f"resuming from step {step2}" in log and f"resumed from step {step2}" in stdout
    assert not root.exists() and not (root.parents[1]).exists()  # checkpoints/ removed once the output is final
    assert reference.wait(timeout=600) == 0
    assert_same(weights(out), weights(ref_out))
    info = json.loads((out / "recovery.json").read_text())
    ref_info = json.loads((ref_out / "recovery.json").read_text())
    assert info["loss_curve"] == pytest.approx(ref_info["loss_curve"], abs=1e-5) and info["resumed_from_step"] == step2

    client = MlflowClient(f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("default").experiment_id])
            if r.data.tags.get("hfprune.stage") == "recover"]
    assert [r.info.status for r in runs] == ["FINISHED"]
    history = client.get_metric_history(runs[0].info.run_id, "recovery_loss")
    assert [m.step for m in history] == list(range(30))  # the whole curve, once, however often the job resumed
    progress = client.get_metric_history(runs[0].info.run_id, "recovery_progress_loss")
    assert {m.step for m in progress} == set(range(1, 31))  # as the job went, across its three processes
    assert len(client.get_metric_history(runs[0].info.run_id, "recovery_tokens_per_s")) >= 30


def test_ddp_on_two_cpu_processes_equals_one_process(local_model, tmp_path):  # noqa: F811
    """torchrun, 2 gloo processes, 2 rows each per step vs 1 process accumulating 2 micro-batches: the same
    adapter; only rank 0 wrote the output and an MLflow run."""
    from mlflow import MlflowClient

    settings = {"max_steps": 3, "learning_rate": 1e-2, "rows_per_step": 4}
    one_out, one_argv = job(tmp_path, local_model, "one", **settings)
    two_out, two_argv = job(tmp_path, local_model, "two", tracking=True, **settings)
    one = cli(one_argv)
    two = cli([*two_argv, "--nproc", "2"])
    (_, err1), (_, err2) = one.communicate(timeout=600), two.communicate(timeout=600)
    assert one.returncode == 0 and two.returncode == 0, err1[-3000:] + err2[-3000:]
    assert_same(weights(two_out), weights(one_out))
    settings2 = json.loads((two_out / "recovery.json").read_text())["settings"]
    assert (settings2["processes"], settings2["grad_accum_per_process"]) == (2, 1)
    assert json.loads((one_out / "recovery.json").read_text())["settings"]["grad_accum_per_process"] == 2
    assert sorted(p.name for p in two_out.parent.iterdir()) == ["m"]  # no second (temporary) output
    assert err2.count("recovery step 3/3") == 1  # one process logs
    client = MlflowClient(f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("hfprune.stage") == "recover"] == ["FINISHED"]


def test_chunked_cross_entropy_equals_the_whole_one():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    examples = [(ids, [-100] * 2 + ids[2:]) for ids in torch.randint(3, 211, (5, 11), generator=gen).tolist()]
    batch = collate(pack(examples, 24), 0)
    whole = token_losses(model, batch, chunk=10**6)
    whole.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = token_losses(model, batch, chunk=3)
    chunked.sum().backward()
    assert torch.allclose(chunked, whole, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), (n, (p.grad - grads[n]).abs().max())


def test_bad_inputs_are_one_line(local_model, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(ConfigError, match="recovery.checkpoint_every"):
        make_cfg(checkpoint_every=0)
    with pytest.raises(ConfigError, match=r"^recovery.rows_per_step: 6 rows per step do not split into 2 processes "
                                          r"x batch_size 2; make it a multiple of 4$"):
        accumulation(make_cfg(rows_per_step=6, batch_size=2)["recovery"], 2)
    assert accumulation(make_cfg(batch_size=2, grad_accum=3)["recovery"], 3) == 1

    out, argv = job(tmp_path, local_model, "job", max_steps=2)
    cfg = yaml.safe_load(Path(argv[2]).read_text())
    plan = Path(argv[6])
    root = checkpoints.checkpoint_root(cfg, out)
    digest = checkpoints.settings_digest(cfg, cfg["models"][0])
    checkpoints.save(root, 1, {}, {"digest": digest, "plan_sha256": "0" * 64, "run_id": None})
    with pytest.raises(ConfigError, match=r"written for another plan .* remove .* to start over$"):
        run_recovery(cfg, "m", plan, out)
    other = checkpoints.settings_digest({**cfg, "recovery": {**cfg["recovery"], "learning_rate": 1.0}},
                                        cfg["models"][0])
    import hashlib

    sha = hashlib.sha256(plan.read_bytes()).hexdigest()
    checkpoints.save(root, 2, {}, {"digest": other, "plan_sha256": sha, "run_id": None})
    with pytest.raises(ConfigError, match="written with other recovery settings"):
        run_recovery(cfg, "m", plan, out)
    # how the job runs is not what it computes: the same digest
    ops = {"checkpoint_every": 7, "gradient_checkpointing": True, "log_every": 3}
    assert checkpoints.settings_digest({**cfg, "recovery": {**cfg["recovery"], **ops}}, cfg["models"][0]) == digest
    assert not out.exists()
    checkpoints.remove(root)
    monkeypatch.setenv("HFPRUNE_MEMORY_BUDGET_MB", "1")  # the check before the first step names the knobs
    with pytest.raises(ConfigError, match=r"needs about .* more than the 0.0 GiB of HFPRUNE_MEMORY_BUDGET_MB; lower "
                                          r"recovery.batch_size .*recovery.gradient_checkpointing: true$"):
        run_recovery(cfg, "m", plan, out)
