"""Ratio -> neurons from configs alone (the paper's table), uniform/global/mlp+attn plans."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO_RESOURCES, tiny_config
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig, Qwen2Config, Qwen3Config

from hfprune.adapters import adapter_class
from hfprune.config import format_ratio
from hfprune.errors import ConfigError
from hfprune.plan import _topk_sorted, make_plan, neurons_to_keep, params_per_kv_group

# shared/reference/README.md, "Pruning ratio -> neurons kept per layer", with the models' published sizes
# (family, config class, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied, expected)
PAPER_TABLE = [
    ("llama", LlamaConfig, 4096, 11008, 32, 32, 32, 128, 32000, False, (7581, 5867, 4153)),  # LLaMA-2-7B
    ("llama", LlamaConfig, 2048, 8192, 16, 32, 8, 64, 128256, True, (5678, 4421, 3163)),  # LLaMA-3.2-1B
    ("llama", LlamaConfig, 4096, 14336, 32, 32, 8, 128, 128256, False, (10252, 8209, 6167)),  # LLaMA-3.1-8B
    ("qwen2", Qwen2Config, 3584, 18944, 28, 28, 4, 128, 152064, False, (13885, 11355, 8825)),  # Qwen2.5-7B
    ("qwen2", Qwen2Config, 1536, 8960, 28, 12, 2, 128, 151936, True, (6567, 5371, 4174)),  # Qwen2.5-1.5B
    ("qwen3", Qwen3Config, 2048, 6144, 28, 16, 8, 128, 151936, True, (4144, 3144, 2143)),  # Qwen3-1.7B
]


def _config(cls, hidden, inter, layers, heads, kv, head_dim, vocab, tied):
    return cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tied)


@pytest.mark.parametrize("row", PAPER_TABLE, ids=lambda r: f"{r[0]}-{r[2]}-{r[3]}")
def test_neurons_to_keep_reproduces_the_paper_table(row):
    family, cls, *sizes, expected = row
    config = _config(cls, *sizes)
    assert tuple(neurons_to_keep(config, r, family) for r in (0.2, 0.3, 0.4)) == expected


def test_llama2_7b_parameter_count():
    config = _config(*PAPER_TABLE[0][1:-1])
    assert adapter_class("llama").count_params(config) == 6_738_415_616


def test_too_large_ratio_names_ratios():
    with pytest.raises(ConfigError, match="ratio 0.99 removes"):
        neurons_to_keep(tiny_config("llama"), 0.99, "llama")


def test_format_ratio():
    assert [format_ratio(r) for r in (0.2, 0.1 + 0.2, 0.25, 0.5)] == ["0.2", "0.3", "0.25", "0.5"]


def _scores(config, seed=0, attn=False):
    g = torch.Generator().manual_seed(seed)
    out = {f"mlp.{i}": torch.rand(config.intermediate_size, generator=g) * (10 ** i)
           for i in range(config.num_hidden_layers)}
    if attn:
        out.update({f"attn_kv.{i}": torch.rand(config.num_key_value_heads, generator=g)
                    for i in range(config.num_hidden_layers)})
    return out


def test_uniform_plan_keeps_top_scores_and_reports_params(family):
    config = tiny_config(family)
    scores = _scores(config)
    plan = make_plan(scores, config, 0.2, family)
    keep = neurons_to_keep(config, 0.2, family)
    for i, layer in enumerate(plan["layers"]):
        assert layer["mlp_keep"] == sorted(scores[f"mlp.{i}"].topk(keep).indices.tolist())
        assert layer["kv_keep"] is None
    per = adapter_class(family).params_per_mlp_neuron(config)
    assert plan["params_dense"] - plan["params_pruned"] == 2 * (96 - keep) * per
    assert abs(plan["achieved_ratio"] - 0.2) < per / plan["params_dense"]


def test_global_plan_same_budget_with_floor():
    config = tiny_config("llama")
    scores = _scores(config)  # layer 1 scores are 10x larger: normalisation must undo that
    plan = make_plan(scores, config, 0.3, "llama", allocation="global", min_keep_fraction=0.25)
    kept = [len(layer["mlp_keep"]) for layer in plan["layers"]]
    assert sum(kept) == 2 * neurons_to_keep(config, 0.3, "llama")
    assert min(kept) >= 24
    scores["mlp.0"][:40] = 100.0  # layer 0 now holds many clearly important neurons
    plan = make_plan(scores, config, 0.3, "llama", allocation="global", min_keep_fraction=0.05)
    assert set(range(40)) <= set(plan["layers"][0]["mlp_keep"])
    assert len(plan["layers"][0]["mlp_keep"]) != len(plan["layers"][1]["mlp_keep"])


def test_mlp_attn_plan_counts_kv_groups_toward_the_ratio(family):
    config = tiny_config(family)
    if adapter_class(family).no_kv_pruning:  # refused by name (test_surgery.test_kv_pruning_is_refused_by_name)
        with pytest.raises(ConfigError, match=f"family '{family}' does not support mlp\\+attn"):
            make_plan(_scores(config, attn=True), config, 0.3, family, scope="mlp+attn", kv_fraction=0.5)
        return
    plan = make_plan(_scores(config, attn=True), config, 0.3, family, scope="mlp+attn", kv_fraction=0.5)
    assert all(len(layer["kv_keep"]) == 1 for layer in plan["layers"])
    assert len(plan["layers"][0]["mlp_keep"]) > neurons_to_keep(config, 0.3, family)
    removed = plan["params_dense"] - plan["params_pruned"]
    mlp_removed = 2 * (96 - len(plan["layers"][0]["mlp_keep"])) * adapter_class(family).params_per_mlp_neuron(config)
    assert removed - mlp_removed == 2 * params_per_kv_group(config, family)
    with pytest.raises(ConfigError, match="attn_kv"):
        make_plan(_scores(config), config, 0.3, family, scope="mlp+attn", kv_fraction=0.5)


def test_ranking_breaks_ties_as_torch_stable_sort():
    """Plans rank with numpy (the plan job never imports torch); the order must be torch.sort(stable=True)'s."""
    s = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(0)).float()  # many ties
    s[::7], s[1::11] = 0.0, -0.0
    for k in (1, 37, 250, 499):
        expected = sorted(torch.sort(s, descending=True, stable=True).indices[:k].tolist())
        assert _topk_sorted(s, k) == _topk_sorted(s.numpy(), k) == expected


def test_plan_job_reads_numpy_and_never_imports_torch(tmp_path, tiny_llama_dir):
    """Importing torch was most of a plan job's wall time; its plan equals make_plan on torch tensors."""
    scores = {f"mlp.{i}": torch.rand(96, generator=torch.Generator().manual_seed(i)) * 10 ** i for i in range(2)}
    save_file(scores, str(tmp_path / "s.safetensors"))
    cfg = {"experiment": "p", "results_dir": str(tmp_path / "results"), "resources_dir": str(REPO_RESOURCES),
           "models": [{"name": "m", "family": "llama", "source": str(tiny_llama_dir)}], "criteria": ["magnitude"],
           "ratios": [0.005], "pruning": {"allocation": "global"}, "tracking": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["plan", "--config", str(tmp_path / "c.yaml"), "--model", "m", "--scores", str(tmp_path / "s.safetensors"),
            "--ratio", "0.005", "--out", str(tmp_path / "p.json")]
    code = f"import sys; from hfprune.cli import main; rc = main({argv!r}); print('torch' in sys.modules); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "False"
    expected = make_plan(scores, AutoConfig.from_pretrained(tiny_llama_dir), 0.005, "llama", allocation="global")
    got = json.loads((tmp_path / "p.json").read_text())
    assert [x["mlp_keep"] for x in got["layers"]] == [x["mlp_keep"] for x in expected["layers"]]
    assert len(got["layers"][0]["mlp_keep"]) != len(got["layers"][1]["mlp_keep"])  # global: layers differ
