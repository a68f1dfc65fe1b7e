"""Config `resources:` and what a job does with it (issue #22, workflow/runtime half): GPUs per job, placement on
CPU, the offload check, torch threads, the main process never touching CUDA, prefetch and the offline check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from hfprune.config import gpus_per_job, model_resources
from hfprune.errors import ConfigError, HFPruneError
from hfprune.models import ModelSpec, load_model
from hfprune.resources import placement, suggest_gpus
from hfprune.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**changes) -> dict:
    cfg = {"models": [{"name": "a", "source": "smollm2-135m"}, {"name": "b", "source": "smollm2-135m"}],
           "criteria": ["magnitude"], "ratios": [0.2], "device": "cuda", "device_map": "auto"}
    return validate_config({**cfg, **changes})


def _hfprune(*args, env=None, cwd=ROOT, preexec_fn=None) -> subprocess.CompletedProcess:
    # as from a user's shell: without hfprune's own offline default (and its marker), which this process set on import
    base = {k: v for k, v in os.environ.items() if k not in (
        "MLFLOW_TRACKING_URI", "HFPRUNE_OFFLINE_DEFAULT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run([sys.executable, "-m", "hfprune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=300, check=False, cwd=cwd, preexec_fn=preexec_fn)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr[-3000:]


def test_gpus_per_job_by_stage_model_override_and_cpu():
    cfg = _cfg(resources={"gpus_per_job": {"score": 2, "evaluate": 3}, "gpu_memory_gb": 80},
               models=[{"name": "a", "source": "smollm2-135m"},
                       {"name": "b", "source": "smollm2-135m", "resources": {"gpus_per_job": 4, "allow_offload": True}}])
    assert [gpus_per_job(cfg, "a", s) for s in ("score", "recover", "evaluate")] == [2, 1, 3]
    assert [gpus_per_job(cfg, "b", s) for s in ("score", "recover", "evaluate")] == [4, 4, 4]
    assert model_resources(cfg, "b") == {"gpus_per_job": 4, "threads_per_job": None, "gpu_memory_gb": 80,
                                         "max_memory": None, "allow_offload": True}
    assert gpus_per_job({**cfg, "device": "cpu"}, "b", "score") == 0
    assert validate_config({k: v for k, v in _cfg().items() if k != "resources"})["resources"] == {
        "gpus_per_job": 1, "threads_per_job": None, "gpu_memory_gb": None, "max_memory": None, "allow_offload": False}


@pytest.mark.parametrize("change, field", [
    ({"resources": {"gpus_per_job": 0}}, "'resources.gpus_per_job'"),
    ({"resources": {"gpus_per_job": {"score": 0}}}, "'resources.gpus_per_job'"),
    ({"models": [{"name": "a", "source": "smollm2-135m", "resources": {"gpus_per_job": 0}}]},
     "'models[0].resources.gpus_per_job'"),
    ({"resources": {"gpus_per_job": 2}, "device_map": None},
     "'resources.gpus_per_job': score jobs of model 'a' hold 2 GPUs but device_map is null"),
])
def test_bad_resources_fail_in_one_line_naming_the_field(change, field):
    with pytest.raises(ConfigError) as exc:
        _cfg(**change)
    assert "\n" not in str(exc.value) and f"invalid config field {field}" in str(exc.value)


def test_device_cpu_ignores_the_device_map_and_max_memory_goes_to_accelerate():
    cfg = _cfg(device="cpu", resources={"max_memory": {"0": "10GiB", "cpu": "1GiB"}})
    assert placement(cfg, "a", torch.device("cpu")) == {"device_map": None}
    assert placement({**cfg, "device": "cuda"}, "a", torch.device("cuda")) == {
        "device_map": "auto", "max_memory": {0: "10GiB", "cpu": "1GiB"}, "allow_offload": False}


def test_a_model_offloaded_to_cpu_stops_the_job_unless_allowed(tiny_llama_dir):
    """On a machine without a GPU, accelerate's `auto` map puts every module on the CPU: the offload case."""
    spec = ModelSpec("m", "llama", str(tiny_llama_dir))
    with pytest.raises(HFPruneError) as exc:
        load_model(spec, device_map="auto")
    msg = str(exc.value)
    assert "\n" not in msg and "model 'm': accelerate offloaded" in msg
    assert "resources.gpus_per_job or resources.max_memory, or set resources.allow_offload: true" in msg
    model, _ = load_model(spec, device_map="auto", allow_offload=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    load_model(spec)  # no device map: the job places the model itself, nothing to check


def _job_config(tmp_path, source, **changes) -> Path:
    cfg = {"experiment": "res", "results_dir": str(tmp_path / "results"), "resources_dir": str(ROOT / "resources"),
           "models": [{"name": "m", "family": "llama", "source": str(source)}], "criteria": ["magnitude"],
           "ratios": [0.005], "device": "cpu", "device_map": "auto", "tracking": {"enabled": False}, **changes}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_score_job_on_cpu_with_a_device_map_runs_on_cpu_with_the_threads_asked(tmp_path, tiny_llama_dir):
    """`device: cpu` + `device_map: auto`: no accelerate placement (which would be the offload error above), the
    sidecar says cpu; torch's two pools follow --threads, and without it the cores the process may use."""
    cfg = _job_config(tmp_path, tiny_llama_dir)
    out = tmp_path / "s.safetensors"
    proc = _hfprune("--threads", "3", "score", "--config", cfg, "--model", "m", "--criterion", "magnitude",
                    "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["device"] == "cpu"
    assert "torch threads: intra-op 3, inter-op 3" in proc.stderr
    one_core = _hfprune("score", "--config", cfg, "--model", "m", "--criterion", "magnitude", "--out", out,
                        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert one_core.returncode == 0 and "torch threads: intra-op 1, inter-op 1" in one_core.stderr, one_core.stderr


# Runs `snakemake -n` inside one Python process whose CUDA entry points record any call: parsing the Snakefile,
# validating the config and its grid-level checks (hfprune.limits) must call none of them.
NO_CUDA = textwrap.dedent("""
    import json, sys, torch
    calls = []
    for name in ("_lazy_init", "is_available", "device_count", "mem_get_info", "current_device"):
        orig = getattr(torch.cuda, name)
        setattr(torch.cuda, name, lambda *a, _n=name, _o=orig, **k: calls.append(_n) or _o(*a, **k))
    from snakemake.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
    print(json.dumps({"rc": rc, "calls": calls, "initialized": torch.cuda.is_initialized()}))
""")


@pytest.mark.parametrize("resources", [{}, {"gpu_memory_gb": 0.01}])
def test_parsing_the_snakefile_never_touches_cuda(tmp_path, tiny_llama_dir, resources):
    cfg = _job_config(tmp_path, tiny_llama_dir, device="auto", criteria=["taylor_entropy"],
                      resources=resources, evaluation={"suite": "none"})
    proc = subprocess.run([sys.executable, "-c", NO_CUDA, "--snakefile", str(ROOT / "Snakefile"), "-n", "--cores",
                           "1", "--directory", str(tmp_path), "--configfile", str(cfg)],
                          capture_output=True, text=True, timeout=300, check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["calls"] == [] and result["initialized"] is False, result
    if resources:  # the grid-level check used resources.gpu_memory_gb, without CUDA (the exit carries its line)
        assert "more than the 0.0 GiB of resources.gpu_memory_gb x 1 GPU(s)" in str(result["rc"]), result
    else:  # no gpu_memory_gb: the check is left to the jobs, and the run says so
        assert result["rc"] == 0, proc.stderr[-3000:]
        assert "no resources.gpu_memory_gb: the GPU memory check of scoring is left to each score job" in proc.stderr


def test_suggested_gpus_hold_the_peak():
    for peak_gib, gb in ((1.0, 80), (62.3, 40), (71.9, 80), (150.0, 80)):
        n = suggest_gpus(peak_gib * 2**30, gb)
        assert n * gb * 0.9 >= peak_gib and (n == 1 or (n - 1) * gb * 0.9 < peak_gib)


def test_estimate_suggests_gpus_per_job(tmp_path):
    cfg = {"models": [{"name": "s", "source": "smollm2-135m", "resources": {"gpu_memory_gb": 0.5}},
                      {"name": "q", "source": "qwen2.5-coder-0.5b"}],
           "criteria": ["taylor_ce"], "ratios": [0.2], "device": "cuda", "device_map": "auto",
           "resources": {"gpus_per_job": {"score": 2}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _hfprune("estimate", "--config", path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("gpus: model 's'"))
    peaks = dict(p.split(" ", 1) for p in line.split("(peaks ")[1].split(";")[0].split(", "))
    expected = {s: suggest_gpus(float(v.split()[0]) * 2**30, 0.5) for s, v in peaks.items()}
    assert "{" + ", ".join(f"{s}: {n}" for s, n in expected.items()) + "}" in line
    assert "the config asks score 2, evaluate 1" in line
    assert "gpus: model 'q': set resources.gpu_memory_gb" in proc.stdout


def test_prefetch_of_a_local_grid_does_nothing_and_says_so(tmp_path):
    proc = _hfprune("prefetch", "--config", ROOT / "config/default.yaml", env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to fetch: every model, text and task of the grid is local or embedded" in proc.stdout
    assert not (tmp_path / "hf").exists()


def test_offline_job_with_a_hub_model_never_fetched_fails_at_once_naming_prefetch(tmp_path):
    cfg = _job_config(tmp_path, "hfprune-tests/never-fetched", tracking={"enabled": True,
                                                                         "uri": f"sqlite:///{tmp_path}/m.db"})
    proc = _hfprune("score", "--config", cfg, "--model", "m", "--criterion", "magnitude",
                    "--out", tmp_path / "o" / "s.safetensors",
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    _one_error_line(proc, "hub model 'hfprune-tests/never-fetched' is not in the cache", "HF_HUB_OFFLINE=1",
                    f"run `hfprune prefetch --config {cfg}`")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.db").exists()  # before any weight or MLflow run
    dry = _hfprune("prefetch", "--config", cfg, "--dry-run")
    assert dry.returncode == 0 and "would fetch model hfprune-tests/never-fetched" in dry.stdout, dry.stderr
