"""Shared fixtures: tiny random models of every supported family, and the real embedded models; and the
isolation of the suite from the checkout's results/ (its MLflow store above all)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from hfprune.models import ModelSpec, ensure_available, load_model

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "olmo2", "granite", "phi3")
ROOT = Path(__file__).resolve().parents[1]
# embedded models are materialised once and shared (read-only) by every test, whatever the working directory
REPO_RESOURCES = str(ROOT / "resources")
CHECKOUT_RESULTS = ROOT / "results"
_RESULTS_STATE = pytest.StashKey[dict]()


def _results_state() -> dict:
    """Every file under the checkout's results/ -> (size, mtime), and mlflow.db -> its sha256."""
    state = {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in CHECKOUT_RESULTS.rglob("*") if p.is_file()}
    db = CHECKOUT_RESULTS / "mlflow.db"
    if db.is_file():
        digest = hashlib.sha256()
        with open(db, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        state["results/mlflow.db sha256"] = digest.hexdigest()
    return state


def pytest_sessionstart(session):
    session.config.stash[_RESULTS_STATE] = _results_state()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test wrote into the checkout's results/ (e.g. a run in the user's MLflow store)."""
    before, after = session.config.stash.get(_RESULTS_STATE, None), _results_state()
    if before is None or before == after:
        return
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"the test suite changed the checkout's results/ ({', '.join(changed[:5])}"
               f"{' ...' if len(changed) > 5 else ''}): tests must write under tmp_path only")
    if reporter is not None:
        reporter.write_line(f"ERROR: {message}", red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout(tmp_path_factory):
    """The suite runs in a temporary working directory: whatever a config leaves relative (`results_dir:
    results`, the default tracking URI `sqlite:///results/mlflow.db`) lands there, never in the checkout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield

# (config class, family-specific settings): each family's own quirks switched on, so the exactness tests meet them
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"tie_word_embeddings": True, "sliding_window": 6,
                                "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0}),
    "gemma3": ("Gemma3TextConfig", {"tie_word_embeddings": True, "sliding_window": 6,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.1, "logits_scaling": 4.0, "mlp_bias": True,
                                  "attention_bias": True}),
    "phi3": ("Phi3Config", {}),
}


def tiny_config(family: str, **overrides):
    """A 2-layer random config of `family` (GQA: 4 heads, 2 KV heads), small enough for exact checks; 1024
    positions take every default sequence length of the config schema."""
    import transformers

    cls_name, family_kwargs = FAMILY_CONFIGS[family]
    kwargs = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 211, "max_position_embeddings": 1024,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              **family_kwargs}
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # a wide init (default 0.02 gives near-uniform outputs) makes gradients and entropies non-trivial
    overrides.setdefault("initializer_range", 0.2)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M (LLaMA architecture), fp32, eval mode."""
    return load_model(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)


@pytest.fixture(scope="session")
def smollm2_dir():
    return ensure_available(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)


@pytest.fixture(scope="session")
def qwen_dir():
    return ensure_available(ModelSpec("qwen2.5-coder-0.5b", "qwen2", "qwen2.5-coder-0.5b"), REPO_RESOURCES)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A tiny random LLaMA with SmolLM2's real tokenizer as a local model folder: real CLI runs in seconds."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_model("llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               pad_token_id=2).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path


def experiment_runs(db, experiment: str):
    """Every MLflow run of `experiment` in the SQLite store at `db` (the workflow's default tracking store)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)


def no_snakefile_traceback(output: str) -> None:
    """A workflow stopped by bad input shows hfprune's one error line, not Snakemake's traceback of the Snakefile."""
    assert 'File "' not in output and "Error in file" not in output, output[-3000:]
    assert sum(line.startswith("hfprune workflow: error: ") for line in output.splitlines()) == 1, output[-3000:]
