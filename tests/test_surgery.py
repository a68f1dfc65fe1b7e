"""Physical pruning equals masking; pruned checkpoints round-trip (plain HF loader for uniform plans)."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

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


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("scope", ["mlp", "mlp+attn"])
def test_pruned_logits_equal_masked_logits(family, allocation, scope):
    model = tiny_model(family)
    plan = _plan(model, family, allocation, scope)
    with torch.no_grad():
        with neuron_mask(model, plan):
            masked = model(_ids()).logits
        dense = model(_ids()).logits
        prune_model(model, plan)
        pruned = model(_ids()).logits
    assert (pruned - masked).abs().max() <= 1e-5
    assert (pruned - dense).abs().max() > 1e-3  # the mask did remove something
    sizes = [model.model.layers[i].mlp.down_proj.in_features for i in range(2)]
    assert sizes == [len(layer["mlp_keep"]) for layer in plan["layers"]]


def test_uniform_checkpoint_loads_with_plain_from_pretrained(tmp_path):
    model = tiny_model("qwen2")
    plan = _plan(model, "qwen2", "uniform", "mlp+attn")
    prune_model(model, plan)
    save_pruned(model, None, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
    assert loaded.config.intermediate_size == len(plan["layers"][0]["mlp_keep"])
    assert loaded.config.num_key_value_heads == 1


def test_non_uniform_checkpoint_round_trips_through_load_pruned(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, "llama", "global", "mlp")
    prune_model(model, plan)
    assert model.config.hfprune_intermediate_sizes == [len(layer["mlp_keep"]) for layer in plan["layers"]]
    save_pruned(model, None, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
