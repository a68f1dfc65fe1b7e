"""Bad input, as a user meets it: the real `hfprune` CLI (or Snakemake) in a subprocess exits non-zero with a
message naming the field, flag or file, and leaves no output behind.

Covered elsewhere, not repeated here: config values the schema rejects (unknown criterion or family in the
config, ratio < 0 or >= 1, duplicate model names, wrong YAML types) stop `snakemake` before any job
(tests/test_workflow.py::test_invalid_config_stops_before_any_job) and `validate_config`
(tests/test_config.py); scoring that produces NaN raises ScoreError (tests/test_scorer.py::
test_nan_stops_with_a_clear_error); a wrong packaged-model checksum in-process (tests/test_assets.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _hfprune(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "hfprune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout, check=False, cwd=ROOT)


def _config(tmp_path: Path, source, **changes) -> Path:
    cfg = {"experiment": "bad", "results_dir": str(tmp_path / "results"), "resources_dir": str(ROOT / "resources"),
           "models": [{"name": "m", "family": "llama", "source": str(source)}], "criteria": ["magnitude"],
           "ratios": [0.005], "device": "cpu", "calibration": {"num_sequences": 2, "seq_len": 16, "batch_size": 2},
           "tracking": {"enabled": False}}
    cfg.update(changes)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fails(proc: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    err = proc.stderr
    assert proc.returncode == rc, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"
    return err


def _nothing_under(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.rglob("*"))


def _score(tmp_path, cfg: Path, criterion="magnitude", env=None):
    out = tmp_path / "out" / "s.safetensors"
    return _hfprune("score", "--config", cfg, "--model", "m", "--criterion", criterion, "--out", out, env=env), out


def test_unknown_criterion_flag(tmp_path, tiny_llama_dir):
    proc, out = _score(tmp_path, _config(tmp_path, tiny_llama_dir), criterion="taylor_foo")
    _fails(proc, "unknown criterion 'taylor_foo'", "taylor_entropy")
    _nothing_under(out.parent)


@pytest.fixture
def tiny_scores(tmp_path, tiny_llama_dir):
    """A score file for the tiny model (2 layers x 96 neurons)."""
    path = tmp_path / "scores.safetensors"
    save_file({f"mlp.{i}": torch.rand(96, generator=torch.Generator().manual_seed(i)) for i in range(2)}, str(path))
    return path


@pytest.mark.parametrize("ratio, message", [
    ("-0.1", "--ratio -0.1 must be in (0, 1)"),
    ("1.0", "--ratio 1.0 must be in (0, 1)"),
    # the tiny model's 49k-token embedding dominates its parameters: removing half of them needs more
    # neurons than a layer has
    ("0.5", "ratio 0.5 removes"),
])
def test_plan_ratio_out_of_range_or_leaving_no_neuron(tmp_path, tiny_llama_dir, tiny_scores, ratio, message):
    out = tmp_path / "plans" / "p.json"
    proc = _hfprune("plan", "--config", _config(tmp_path, tiny_llama_dir), "--model", "m", "--scores", tiny_scores,
                    "--ratio", ratio, "--out", out)
    err = _fails(proc, message)
    assert ratio != "0.5" or "layers only have 96; choose a smaller ratio" in err
    _nothing_under(out.parent)


def test_nan_scores_stop_the_plan(tmp_path, tiny_llama_dir, tiny_scores):
    """topk ranks NaN first, so a NaN neuron would otherwise be kept silently."""
    from safetensors.torch import load_file

    scores = load_file(str(tiny_scores))
    scores["mlp.1"][7] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(scores, str(bad))
    out = tmp_path / "plans" / "p.json"
    proc = _hfprune("plan", "--config", _config(tmp_path, tiny_llama_dir), "--model", "m", "--scores", bad,
                    "--ratio", "0.005", "--out", out)
    _fails(proc, str(bad), "NaN/inf in mlp.1")
    _nothing_under(out.parent)


def test_missing_local_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    proc, out = _score(tmp_path, _config(tmp_path, missing))
    _fails(proc, f"local source folder '{missing}' does not exist", "`source`")
    _nothing_under(out.parent)


def test_calibration_text_shorter_than_a_sequence(tmp_path, tiny_llama_dir):
    """The `wiki` source (SQuAD paragraphs, ~10^6 tokens) cannot fill one window of 10^8 tokens."""
    cfg = _config(tmp_path, tiny_llama_dir, calibration={"source": "wiki", "num_sequences": 1, "seq_len": 10**8})
    proc, out = _score(tmp_path, cfg, criterion="taylor_entropy")
    _fails(proc, "calibration text too short", f"{10**8} per sequence requested", "calibration.seq_len")
    _nothing_under(out.parent)


def test_unwritable_output_path_is_named(tmp_path, tiny_llama_dir):
    """Running as root, a 0o500 folder is still writable; a path through a regular file fails for everyone."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    out = blocker / "scores" / "s.safetensors"
    proc = _hfprune("score", "--config", _config(tmp_path, tiny_llama_dir), "--model", "m", "--criterion",
                    "magnitude", "--out", out)
    _fails(proc, f"cannot write '{out}'", "Not a directory")
    assert blocker.read_text() == "a file where a folder should be"


def test_unwritable_results_dir_stops_snakemake_before_any_job(tmp_path, tiny_llama_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cfg = _config(tmp_path, tiny_llama_dir, results_dir=str(blocker / "results"))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "1", "--configfile", str(cfg)],
                          capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"Not a directory: '{blocker}/results" in output, output[-3000:]
    assert "rule score" not in output and blocker.read_text() == ""


def test_corrupted_packaged_model(tmp_path):
    """A damaged install of the model's package (truncated GGUF) found first on the path: `hfprune assets`
    refuses it by checksum, names the file and the reinstall command, and materialises nothing."""
    from hfprune.assets import EMBEDDED_MODELS, package_dir

    model = EMBEDDED_MODELS["smollm2-135m"]
    (module, pip_spec), rel = model.packages[0], model.part_files[0]
    fake = tmp_path / "site" / module
    (fake / rel).parent.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    with open(package_dir(module, pip_spec) / rel, "rb") as src:
        (fake / rel).write_bytes(src.read(1 << 20))
    resources = tmp_path / "res"
    cfg = _config(tmp_path, "smollm2-135m", resources_dir=str(resources))
    proc = _hfprune("assets", "--config", cfg, "--model", "m", env={"PYTHONPATH": str(tmp_path / "site")})
    _fails(proc, "checksum mismatch for embedded model 'smollm2-135m'", str(fake / rel),
           f"--force-reinstall --no-deps {pip_spec}")
    assert [p.name for p in (resources / "models").glob("*") if not p.name.endswith(".lock")] == []


def test_unknown_lm_eval_task_stops_the_workflow_and_the_job(tmp_path, tiny_llama_dir):
    ev = {"tasks": ["boolq", "no_such_task"]}
    cfg = _config(tmp_path, tiny_llama_dir, evaluation=ev)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "-n",
                           "--directory", str(tmp_path), "--cores", "1", "--configfile", str(cfg)],
                          capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "invalid config field 'evaluation.tasks'" in output, output[-3000:]
    assert "'no_such_task'" in output and "Building DAG" not in output
    out = tmp_path / "metrics" / "dense.json"
    proc = _hfprune("evaluate", "--config", cfg, "--model", "m", "--out", out)
    _fails(proc, "invalid config field 'evaluation.tasks'", "unknown task(s) 'no_such_task'")
    _nothing_under(out.parent)


def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path, tiny_llama_dir):
    """Port 9 (discard) has no listener: MLflow alone would retry for minutes; the job stops at once."""
    uri = "http://127.0.0.1:9"
    cfg = _config(tmp_path, tiny_llama_dir, tracking={"enabled": True, "uri": uri})
    proc, out = _score(tmp_path, cfg)  # the 120 s subprocess timeout is far below MLflow's retry time
    _fails(proc, f"MLflow tracking server {uri} is unreachable", "tracking.enabled: false")
    _nothing_under(out.parent)
    # the grid stops in `onstart` (its stale-run check), before any job
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "1", "--configfile", str(cfg)],
                          capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"MLflow tracking server {uri} is unreachable" in output, output[-3000:]
    assert not (tmp_path / "results").exists()
    proc, out = _score(tmp_path, _config(tmp_path, tiny_llama_dir), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0  # tracking disabled in the config: the environment's URI is not contacted


# ---- verdict inputs: the baseline, the seed axis, `hfprune compare`

@pytest.mark.parametrize(("changes", "needle"), [
    ({"criteria": ["magnitude", "random"], "report": {"baseline": "taylor_ce"}},
     "invalid config field 'report.baseline': 'taylor_ce' is not one of the grid's criteria (magnitude, random)"),
    ({"calibration": {"seeds": [0, 1, 0]}}, "invalid config field 'calibration.seeds'"),
    ({"calibration": {"seed": 3, "seeds": [0, 1]}}, "invalid config field 'calibration.seed': 3 is not in"),
    ({"models": [{"name": "m", "family": "llama", "source": "smollm2-135m", "seeds": [2, 2]}]},
     "invalid config field 'models[0].seeds'"),
])
def test_bad_baseline_or_seeds_stop_validate(tmp_path, changes, needle):
    cfg = _config(tmp_path, "smollm2-135m", **changes)
    err = _fails(_hfprune("validate", cfg), needle)
    assert len(err.strip().splitlines()) == 1


def test_compare_on_cells_that_do_not_exist(tmp_path):
    cfg = _config(tmp_path, "smollm2-135m", criteria=["magnitude", "random"], ratios=[0.2])
    base = ("compare", "--config", cfg, "--model", "m", "--ratio")
    _fails(_hfprune(*base, "0.2", "random", "magnitude"),
           "cell m / random / ratio 0.2 / seed 0 has not been evaluated:", "metrics/m/random/s0/r0.2.json")
    _fails(_hfprune(*base, "0.2", "random", "taylor_ce"), "cell 'taylor_ce' is not in the config's criteria")
    _fails(_hfprune(*base, "0.3", "random", "magnitude"), "--ratio 0.3 is not one of the config's ratios (0.2)")
    _fails(_hfprune(*base, "0.2", "random", "random"), "compare needs two different cells")
    _nothing_under(tmp_path / "results")
