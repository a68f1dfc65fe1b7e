"""Physical pruning equals masking; pruned checkpoints round-trip (plain HF loader for uniform plans)."""

import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hfprune.adapters import adapter_class, get_adapter
from hfprune.errors import ConfigError, UnsupportedModelError
from hfprune.plan import make_plan
from hfprune.surgery import load_pruned, neuron_mask, prune_model, save_pruned


def _plan(model, family, allocation, scope):
    g = torch.Generator().manual_seed(7)
    c = model.config
    scores = {f"mlp.{i}": torch.rand(c.intermediate_size, generator=g) * (i + 1) ** 3 for i in range(2)}
    scores.update({f"attn_kv.{i}": torch.rand(2, generator=g) for i in range(2)})
    return make_plan(scores, c, 0.3, family, allocation=allocation, scope=scope, kv_fraction=0.5)


def _ids():
    return torch.randint(3, 211, (2, 10), generator=torch.Generator().manual_seed(3))


def _scope(family, scope="mlp+attn"):
    """mlp+attn where the family can remove KV groups, else mlp (the refusal is tested on its own)."""
    return "mlp" if adapter_class(family).no_kv_pruning else scope


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("scope", ["mlp", "mlp+attn"])
def test_pruned_logits_equal_masked_logits(family, allocation, scope):
    if scope != _scope(family, scope):
        pytest.skip(f"{family} refuses mlp+attn (test_kv_pruning_is_refused_by_name)")
    model = tiny_model(family)
    plan = _plan(model, family, allocation, scope)
    assert plan["params_dense"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        with neuron_mask(model, plan):
            masked = model(_ids()).logits
        dense = model(_ids()).logits
        prune_model(model, plan)
        pruned = model(_ids()).logits
    assert (pruned - masked).abs().max() <= 1e-5
    assert (pruned - dense).abs().max() > 1e-3  # the mask did remove something
    adapter = get_adapter(model)
    assert adapter.intermediate_sizes() == [len(layer["mlp_keep"]) for layer in plan["layers"]]
    # the ratio arithmetic counts exactly what the pruned model holds (norms, biases, tied embeddings)
    assert sum(p.numel() for p in model.parameters()) == plan["params_pruned"]


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_checkpoint_loads_with_plain_from_pretrained(tmp_path, family):
    model = tiny_model(family)
    plan = _plan(model, family, "uniform", _scope(family))
    prune_model(model, plan)
    save_pruned(model, None, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
    assert loaded.config.intermediate_size == len(plan["layers"][0]["mlp_keep"])
    assert sum(p.numel() for p in loaded.parameters()) == plan["params_pruned"]
    assert loaded.config.num_key_value_heads == (2 if _scope(family) == "mlp" else 1)


@pytest.mark.parametrize("family", [f for f in FAMILIES if adapter_class(f).no_kv_pruning])
def test_kv_pruning_is_refused_by_name(family):
    model = tiny_model(family)
    with pytest.raises(ConfigError, match=rf"^pruning.scope: family '{family}' does not support mlp\+attn \(.*"
                                          r"; use scope mlp$"):
        _plan(model, family, "uniform", "mlp+attn")
    plan = _plan(model, family, "uniform", "mlp")
    plan["layers"][0]["kv_keep"] = [0]
    with pytest.raises(ConfigError, match=f"family '{family}'"):
        prune_model(model, plan)


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2_moe", "mixtral"])
def test_unfit_architectures_are_refused_listing_the_families(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=211, num_hidden_layers=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=f"model_type '{model_type}'") as err:
        get_adapter(model)
    assert "\n" not in str(err.value) and all(f"{f}: " in str(err.value) for f in FAMILIES)


def test_tiny_configs_are_the_families_they_claim():
    assert [adapter_class(tiny_config(f)).family for f in FAMILIES] == list(FAMILIES)


def test_non_uniform_checkpoint_round_trips_through_load_pruned(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, "llama", "global", "mlp")
    prune_model(model, plan)
    assert model.config.hfprune_intermediate_sizes == [len(layer["mlp_keep"]) for layer in plan["layers"]]
    save_pruned(model, None, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
