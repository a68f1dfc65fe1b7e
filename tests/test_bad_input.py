"""Bad input, as a user meets it: the real `hfprune` CLI (or Snakemake) in a subprocess exits non-zero with a
message naming the field, flag or file, and leaves no output behind.

Covered elsewhere, not repeated here: config values the schema rejects (unknown criterion or family in the
config, ratio < 0 or >= 1, duplicate model names, wrong YAML types) stop `snakemake` before any job
(tests/test_workflow.py::test_invalid_config_stops_before_any_job) and `validate_config`
(tests/test_config.py); scoring that produces NaN raises ScoreError (tests/test_scorer.py::
test_nan_stops_with_a_clear_error); a wrong packaged-model checksum in-process (tests/test_assets.py).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import no_snakefile_traceback
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
    """Exit `rc`, no traceback, and ONE `hfprune <cmd>: error:` line that holds every needle; returns that line."""
    err = proc.stderr
    assert proc.returncode == rc, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("hfprune ") and ": error: " in line]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in:\n{err[-3000:]}"
    return lines[0]


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


@pytest.fixture
def gpt2_dir(tmp_path):
    """A GPT-2 folder (an unsupported family), config.json only: every command refuses it before any weight."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_unsupported_family_folder_names_the_model_and_the_families(tmp_path, gpt2_dir):
    from hfprune.adapters import ADAPTERS

    cfg = _config(tmp_path, gpt2_dir, models=[{"name": "m", "source": str(gpt2_dir)}])
    out = tmp_path / "out" / "m.json"
    for proc in (_score(tmp_path, cfg)[0], _hfprune("validate", cfg),
                 _hfprune("evaluate", "--config", cfg, "--model", "m", "--out", out)):
        line = _fails(proc, "model 'm': unsupported architecture 'gpt2'", "supported families are: ")
        assert all(f"{name}: " in line for name in ADAPTERS), line
    _nothing_under(tmp_path / "out")


def test_truncated_model_weights_file_is_named(tmp_path, tiny_llama_dir):
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).symlink_to(f)
    weights = folder / "model.safetensors"
    weights.unlink()
    weights.write_bytes((tiny_llama_dir / "model.safetensors").read_bytes()[:-100])  # an interrupted copy
    proc, out = _score(tmp_path, _config(tmp_path, folder))
    _fails(proc, f"model weights file '{weights}': not a readable safetensors file (", "incomplete metadata")
    _nothing_under(out.parent)


def _with_positions(tmp_path: Path, model_dir: Path, positions: int) -> Path:
    """The tiny model with another max_position_embeddings (its other files linked)."""
    out = tmp_path / f"tiny-{positions}"
    out.mkdir()
    for f in model_dir.iterdir():
        (out / f.name).symlink_to(f)
    config = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return out


def test_calibration_text_shorter_than_a_sequence(tmp_path, tiny_llama_dir):
    """The `wiki` source (SQuAD paragraphs, ~10^6 tokens) cannot fill one window of 10^8 tokens (of a model
    that claims 10^9 positions, on a machine that claims the memory)."""
    cfg = _config(tmp_path, _with_positions(tmp_path, tiny_llama_dir, 10**9),
                  calibration={"source": "wiki", "num_sequences": 1, "seq_len": 10**8})
    proc, out = _score(tmp_path, cfg, criterion="taylor_entropy", env={"HFPRUNE_MEMORY_BUDGET_MB": str(10**15)})
    _fails(proc, "calibration.source 'wiki': text too short", f"{10**8} per sequence requested", "lower the seq_len")
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
    no_snakefile_traceback(output)
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
    no_snakefile_traceback(output)
    proc, out = _score(tmp_path, _config(tmp_path, tiny_llama_dir), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0  # tracking disabled in the config: the environment's URI is not contacted


def test_sync_without_a_results_folder_or_a_server(tmp_path, tiny_llama_dir):
    """`hfprune sync` on a config whose results folder does not exist, then to a server that does not answer."""
    cfg = _config(tmp_path, tiny_llama_dir, tracking={"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"})
    _fails(_hfprune("sync", "--config", cfg), f"results folder '{tmp_path / 'results' / 'bad'}' does not exist")
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "results" / "bad").mkdir(parents=True)
    uri = "http://127.0.0.1:9"
    _fails(_hfprune("sync", "--config", cfg, env={"MLFLOW_TRACKING_URI": uri}),
           f"MLflow tracking server {uri} is unreachable")


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


# ---- model limits: sequence lengths and scoring memory, before any job and in the job itself

@pytest.mark.parametrize("changes, field, what", [
    ({"calibration": {"seq_len": 4096}}, "calibration.seq_len", "4096 tokens"),
    ({"evaluation": {"perplexity": {"seq_len": 2048}}}, "evaluation.perplexity.seq_len", "2048 tokens"),
    ({"evaluation": {"fidelity": {"seq_len": 1025}}}, "evaluation.fidelity.seq_len", "1025 tokens"),
    ({"evaluation": {"efficiency": {"prefill_tokens": 4096}}}, "evaluation.efficiency.prefill_tokens", "4096 tokens"),
    ({"evaluation": {"efficiency": {"decode_tokens": 1010}}}, "evaluation.efficiency.decode_tokens",
     "a 16-token prompt + 1010 decoded tokens"),
    ({"recovery": {"enabled": True, "seq_len": 2048}}, "recovery.seq_len", "2048 tokens"),
])
def test_sequence_longer_than_the_model_stops_validate(tmp_path, tiny_llama_dir, changes, field, what):
    cfg = _config(tmp_path, tiny_llama_dir, criteria=["taylor_entropy"], **changes)
    line = _fails(_hfprune("validate", cfg), f"invalid config field '{field}': {what} exceed the 1024 positions of "
                                             "model 'm' (max_position_embeddings in its config.json); lower it")
    assert line.startswith(f"hfprune validate: error: {cfg}: ")
    _nothing_under(tmp_path / "results")


def test_sequence_longer_than_the_model_stops_the_score_job_before_loading(tmp_path, tiny_llama_dir):
    """The 23 GB case of issue #13: a calibration window far beyond the model's context."""
    cfg = _config(tmp_path, tiny_llama_dir, calibration={"num_sequences": 2, "seq_len": 100_000, "batch_size": 2})
    proc, out = _score(tmp_path, cfg, criterion="taylor_entropy")
    _fails(proc, "'calibration.seq_len': 100000 tokens exceed the 1024 positions of model 'm'")
    _nothing_under(out.parent)


def test_scoring_that_cannot_fit_in_memory_is_refused_naming_the_knobs(tmp_path, tiny_llama_dir):
    """An artificially small budget (HFPRUNE_MEMORY_BUDGET_MB): `validate` and the score job refuse, with the
    estimate and what to turn; the same config passes with a budget that holds it."""
    cfg = _config(tmp_path, tiny_llama_dir, criteria=["taylor_entropy"],
                  calibration={"num_sequences": 8, "seq_len": 1024, "batch_size": 8})
    small = {"HFPRUNE_MEMORY_BUDGET_MB": "512"}
    needle = ("scoring model 'm' needs about 2.5 GiB (weights 0.0, activations 0.5, logits 1.0, runtime 1.0), "
              "more than the 0.5 GiB of HFPRUNE_MEMORY_BUDGET_MB; lower calibration.batch_size or "
              "calibration.seq_len or scoring.logits_chunk, or set scoring.gradient_checkpointing: true, or use "
              "dtype bfloat16")
    _fails(_hfprune("validate", cfg, env=small), needle)
    proc, out = _score(tmp_path, cfg, criterion="taylor_entropy", env=small)
    _fails(proc, needle)
    _nothing_under(out.parent)
    assert _hfprune("validate", cfg, env={"HFPRUNE_MEMORY_BUDGET_MB": "4096"}).returncode == 0
    # data-free criteria need the weights only
    proc, out = _score(tmp_path, cfg, criterion="magnitude", env={"HFPRUNE_MEMORY_BUDGET_MB": "1100"})
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- files that cannot be read: one line naming the file, nothing written

@pytest.mark.parametrize("content, reason", [
    (b"\xff\xfeexperiment: x\n", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"models: [unclosed\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
])
def test_config_file_that_is_not_yaml_text(tmp_path, content, reason):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    _fails(_hfprune("validate", cfg), f"config file '{cfg}': {reason}")


def test_config_that_is_not_a_mapping(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- 1\n- 2\n")
    _fails(_hfprune("validate", cfg), f"{cfg}: the config must be a mapping, got list")


def _plan_cmd(tmp_path, tiny_llama_dir, scores):
    out = tmp_path / "plans" / "p.json"
    return _hfprune("plan", "--config", _config(tmp_path, tiny_llama_dir), "--model", "m", "--scores", scores,
                    "--ratio", "0.005", "--out", out), out


def test_truncated_score_file(tmp_path, tiny_llama_dir, tiny_scores):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(tiny_scores.read_bytes()[:200])
    proc, out = _plan_cmd(tmp_path, tiny_llama_dir, bad)
    _fails(proc, f"--scores '{bad}': not a readable safetensors file (Error while deserializing header:")
    _nothing_under(out.parent)


def test_score_file_with_the_wrong_tensors(tmp_path, tiny_llama_dir):
    bad = tmp_path / "other.safetensors"
    save_file({"mlp.0": torch.rand(96), "mlp.1": torch.rand(12)}, str(bad))
    proc, out = _plan_cmd(tmp_path, tiny_llama_dir, bad)
    _fails(proc, f"--scores '{bad}': missing or wrong-sized tensor 'mlp.1' (expected 96 values)")
    _nothing_under(out.parent)


@pytest.fixture
def tiny_plan(tmp_path, tiny_llama_dir, tiny_scores) -> dict:
    """A plan of the tiny model written by `hfprune plan` (2 layers, 96 neurons each)."""
    proc, out = _plan_cmd(tmp_path, tiny_llama_dir, tiny_scores)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def _prune(tmp_path, tiny_llama_dir, plan_text: str, **popen):
    plan = tmp_path / "edited.json"
    plan.write_text(plan_text)
    out = tmp_path / "pruned" / "m"
    return subprocess.run([sys.executable, "-m", "hfprune.cli", "prune", "--config", str(_config(tmp_path, tiny_llama_dir)),
                           "--model", "m", "--plan", str(plan), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT, **popen), plan, out


def _edit(plan: dict, layer: int, keep=None, **fields) -> str:
    plan = json.loads(json.dumps(plan))
    if keep is not None:
        plan["layers"][layer]["mlp_keep"] = keep(plan["layers"][layer]["mlp_keep"])
    plan.update(fields)
    return json.dumps(plan)


@pytest.mark.parametrize("edit, message", [
    # issue #13: a repeated index would copy the same neuron twice into the pruned model
    (lambda p: _edit(p, 1, lambda k: sorted(k[:-1] + [k[0]])), "layers[1].mlp_keep repeats neuron"),
    (lambda p: _edit(p, 0, lambda k: k[::-1]), "layers[0].mlp_keep is not sorted"),
    (lambda p: _edit(p, 1, lambda k: k[:-1] + [96]), "layers[1].mlp_keep holds neuron 96, outside 0..95"),
    (lambda p: _edit(p, 0, lambda k: k[:-1] + [95.5]), "layers[0].mlp_keep holds 95.5, not an integer neuron index"),
    (lambda p: _edit(p, 0, lambda k: []), "layers[0].mlp_keep must be a non-empty list of neuron indices"),
    (lambda p: _edit(p, 0, layers=p["layers"] * 2), "plan has 4 layers, the model 2"),
    (lambda p: _edit(p, 1, lambda k: k[:-1]), "params_pruned is"),  # one neuron fewer, counts not updated
    (lambda p: _edit(p, 0, achieved_ratio=0.3), "achieved_ratio is 0.3, but its layers remove"),
    (lambda p: _edit(p, 0, params_dense=7), "params_dense is 7, the model has"),
    (lambda p: '{"layers": [', "not valid JSON (Expecting value at line 1, column 13)"),
    (lambda p: '{"layer": []}', "expected an object with a `layers` list"),
])
def test_plan_that_does_not_fit_stops_prune(tmp_path, tiny_llama_dir, tiny_plan, edit, message):
    proc, plan, out = _prune(tmp_path, tiny_llama_dir, edit(tiny_plan))
    _fails(proc, f"plan file '{plan}'", message)
    _nothing_under(out.parent)


def test_write_failure_names_the_path_and_leaves_nothing(tmp_path, tiny_llama_dir, tiny_plan):
    """A write cut short (here a 1 MiB file-size limit, as a full disk would): one line naming the output, and
    not even the hidden temporary folder stays behind."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the job
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc, _, out = _prune(tmp_path, tiny_llama_dir, json.dumps(tiny_plan), preexec_fn=limit_file_size)
    _fails(proc, f"cannot write '{out}': File too large")
    _nothing_under(out.parent)


def test_corrupt_metrics_json_stops_the_report(tmp_path, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    metrics = tmp_path / "results" / "bad" / "metrics" / "m" / "dense.json"
    metrics.parent.mkdir(parents=True)
    for text, reason in (('{"cell": {"model": "m"', "not valid JSON (Expecting ',' delimiter at line 1, column 23)"),
                         ('{"tasks": {}}', "not a metrics JSON of docs/CONTRACTS.md (KeyError: 'cell')")):
        metrics.write_text(text)
        _fails(_hfprune("report", "--config", cfg), f"metrics file '{metrics}': {reason}")
        assert not (tmp_path / "results" / "bad" / "report").exists()


def test_corrupt_recovered_folder(tmp_path, tiny_llama_dir, tiny_plan):
    recovered = tmp_path / "recovered"
    recovered.mkdir()
    (recovered / "config.json").write_text('{"model_type": "llama", ')
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan))
    out = tmp_path / "metrics" / "m.json"
    proc = _hfprune("evaluate", "--config", _config(tmp_path, tiny_llama_dir), "--model", "m", "--plan", plan,
                    "--recovered", recovered, "--out", out)
    _fails(proc, f"recovered model config '{recovered / 'config.json'}': ")
    _nothing_under(out.parent)


def test_corrupt_asset_marker(tmp_path):
    """A converted model folder whose marker is damaged: named, not silently trusted or overwritten."""
    folder = tmp_path / "res" / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "hfprune_asset.json").write_bytes(b"\x00\x01garbage")
    cfg = _config(tmp_path, "smollm2-135m", resources_dir=str(tmp_path / "res"))
    _fails(_hfprune("assets", "--config", cfg), f"asset marker '{folder / 'hfprune_asset.json'}': not valid JSON")
    assert sorted(p.name for p in folder.iterdir()) == ["hfprune_asset.json"]


# ---- outside a checkout

def test_no_git_noise_outside_a_checkout(tmp_path, tiny_llama_dir):
    """lm-eval asks git for the working directory's commit; outside a checkout git used to print
    "fatal: not a git repository" on every evaluate job. The metrics record hfprune's commit (or "no git")."""
    cfg = _config(tmp_path, tiny_llama_dir, evaluation={
        "tasks": ["arc_easy"], "limit": 1, "perplexity": {"sources": ["wiki"], "seq_len": 16, "max_tokens": 32},
        "fidelity": {"enabled": False}, "efficiency": {"enabled": False}})
    out = tmp_path / "dense.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path.parent)  # tmp_path is outside any checkout, even if /tmp is not
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", "evaluate", "--config", str(cfg), "--model", "m",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fatal" not in proc.stderr and "not a git repository" not in proc.stderr, proc.stderr[-3000:]
    commit = json.loads(out.read_text())["meta"]["versions"]["hfprune_git"]
    assert commit == "no git" or len(commit) == 40
