"""The weight-level methods (`sdmprune`, `llm_pruner`) against plain autograd on the full model: loss.backward(),
then each method's released formula on .grad and .weight."""

import contextlib

import pytest
import torch
from conftest import tiny_config, tiny_model

from hfprune.adapters import get_adapter
from hfprune.criteria import get_criterion
from hfprune.errors import ConfigError
from hfprune.limits import scoring_memory
from hfprune.plan import check_counts, make_plan
from hfprune.scorer import score_model
from hfprune.surgery import check_plan, neuron_mask, prune_model
from hfprune.validation import validate_config

FAMILIES = ("llama", "qwen2", "phi3")  # phi3: a fused gate_up_proj


def _seqs(n=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 211, (n, length), generator=g)


def _neuron_weight_grads(model, i):
    """(W, W.grad) of layer i's gate rows, up rows and down columns, as [intermediate, hidden] each."""
    mlp = get_adapter(model).mlp(i)
    if mlp.gate is None:
        rows = list(zip(mlp.up.weight.chunk(2, 0), mlp.up.weight.grad.chunk(2, 0)))
    else:
        rows = [(mlp.gate.weight, mlp.gate.weight.grad), (mlp.up.weight, mlp.up.weight.grad)]
    return [(w.detach(), g) for w, g in rows] + [(mlp.down.weight.detach().t(), mlp.down.weight.grad.t())]


def reference_sdmprune(model, seqs, crit, plan=None):
    """SDMPrune's released loop (prune/distill_prune.py): per sequence, loss.backward(), then
    importance += |sum of the three W*grad terms| per element; the mean over the hidden dim at the end."""
    layers = get_adapter(model).num_layers
    acc = [0] * layers
    for s in seqs:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher = model(s[None]).logits.float() if crit.needs_teacher else None
        with neuron_mask(model, plan) if plan else contextlib.nullcontext():
            logits = model(s[None]).logits.float()
            labels = torch.cat([s[1:], torch.tensor([-100])])[None]
            crit.position_loss(logits, labels, teacher)[:, :-1].mean().backward()
        for i in range(layers):
            acc[i] = acc[i] + sum(w * g for w, g in _neuron_weight_grads(model, i)).abs()
    model.zero_grad(set_to_none=True)
    return {f"mlp.{i}": a.mean(-1) for i, a in enumerate(acc)}


def reference_llm_pruner(model, batch):
    """LLM-Pruner's released hf_prune.py (taylor, param_first, group reduction sum): one forward of the whole
    calibration batch with Hugging Face's mean CE, one backward, sum of |W * grad| over each neuron's weights."""
    model.zero_grad(set_to_none=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    out = {f"mlp.{i}": sum((w * g).abs().sum(-1) for w, g in _neuron_weight_grads(model, i))
           for i in range(get_adapter(model).num_layers)}
    model.zero_grad(set_to_none=True)
    return out


def _assert_close(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape
        assert torch.allclose(got[k], want[k].float(), rtol=1e-5, atol=1e-6 * want[k].abs().max()), k


@pytest.mark.parametrize("family", FAMILIES)
def test_sdmprune_equals_per_sequence_autograd(family):
    """Without a pre-prune: the KD loss against the dense model itself (teacher-only softening) per sequence,
    batches of two sequences and chunked logits in the scorer."""
    model = tiny_model(family)
    seqs = _seqs()
    crit = get_criterion("sdmprune", {"alpha": 0.4, "temperature": 0.5, "preprune_keep": None})
    got = score_model(model, [seqs[:2], seqs[2:]], [crit], logits_chunk=4)["sdmprune"]
    _assert_close(got, reference_sdmprune(model, seqs, crit))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # left as it was found


def test_sdmprune_preprunes_with_its_own_ce_weight_score():
    """As SDMPrune's stage 1 (get_importance_taylor): the same weight score with plain CE on the dense model
    keeps int(1.3 x 64) = 83 of 96 neurons per layer; the KD pass scores the masked student, in which the
    13 removed neurons score exactly 0. Gradient checkpointing (a masked recomputation) changes nothing."""
    model = tiny_model("llama")
    seqs = _seqs()
    crit = get_criterion("sdmprune", {"preprune_keep": {"hidden_multiple": 1.3}})
    got = score_model(model, [seqs], [crit], logits_chunk=4)["sdmprune"]
    stage1 = reference_sdmprune(model, seqs, get_criterion("taylor_ce"))
    plan = {"layers": [{"mlp_keep": sorted(stage1[f"mlp.{i}"].topk(83).indices.tolist()), "kv_keep": None}
                       for i in range(2)]}
    for i, entry in enumerate(plan["layers"]):
        zero = (got[f"mlp.{i}"] == 0).nonzero().squeeze(1).tolist()
        assert zero == sorted(set(range(96)) - set(entry["mlp_keep"]))
    _assert_close(got, reference_sdmprune(model, seqs, crit, plan))
    ckpt = score_model(model, [seqs[:1], seqs[1:]], [crit], gradient_checkpointing=True)["sdmprune"]
    _assert_close(ckpt, got)


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_pruner_equals_one_backward_over_the_calibration_set(family):
    """Padded sequences of different lengths in two batches: the scorer's accumulated gradient is that of one
    mean CE over every label of the set, as LLM-Pruner's single batch."""
    model = tiny_model(family)
    ids = _seqs(n=3, length=11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    batches = [{"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    got = score_model(model, batches, ["llm_pruner"], logits_chunk=5)["llm_pruner"]
    _assert_close(got, reference_llm_pruner(model, {"input_ids": ids, "attention_mask": mask}))


def test_methods_differ_from_their_activation_counterparts():
    """The weight-level scores are not the activation-Taylor ones under another name."""
    model = tiny_model("llama")
    seqs = _seqs()
    kd = {"preprune_keep": None}
    got = score_model(model, [seqs], [get_criterion("sdmprune", kd), get_criterion("taylor_kd", kd), "llm_pruner",
                                      "taylor_ce"])
    for method, act in (("sdmprune", "taylor_kd"), ("llm_pruner", "taylor_ce")):
        a, b = got[method]["mlp.0"], got[act]["mlp.0"]
        assert not torch.allclose(a / a.sum(), b / b.sum(), rtol=1e-2)


@pytest.mark.parametrize("name", ["sdmprune", "llm_pruner"])
def test_a_plan_from_method_scores_prunes_the_model(name):
    model = tiny_model("qwen2")
    scores = score_model(model, [_seqs()], [name])[name]
    plan = make_plan(scores, model.config, 0.2, "qwen2")
    check_counts(plan, model.config)
    for i, entry in enumerate(plan["layers"]):
        assert entry["mlp_keep"] == sorted(scores[f"mlp.{i}"].topk(len(entry["mlp_keep"])).indices.tolist())
    check_plan(get_adapter(model), plan)
    prune_model(model, plan)
    assert model(_seqs()).logits.isfinite().all()


@pytest.mark.parametrize("name", ["sdmprune", "llm_pruner"])
def test_methods_refuse_attention_scope(name):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=f"criterion '{name}' scores only pruning.scope mlp") as err:
        score_model(model, [_seqs()], [name], scope="mlp+attn")
    assert "\n" not in str(err.value)
    cfg = {"models": [{"name": "smol", "family": "llama", "source": "smollm2-135m"}], "criteria": [name],
           "ratios": [0.2], "pruning": {"scope": "mlp+attn"}}
    with pytest.raises(ConfigError, match=f"'pruning.scope': criterion '{name}'") as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_memory_estimate_counts_the_weight_gradients():
    """The scoring-memory guard adds every MLP weight's gradient, and llm_pruner's fp32 sum of them."""
    arch = tiny_config("llama")
    cfg = validate_config({"models": [{"name": "smol", "family": "llama", "source": "smollm2-135m"}],
                           "criteria": ["taylor_ce"], "ratios": [0.2]})  # float32: 4 bytes a weight
    mlp = arch.num_hidden_layers * 3 * arch.hidden_size * arch.intermediate_size
    ce = scoring_memory(arch, cfg, ["taylor_ce"])
    assert "weight_gradients" not in ce
    assert scoring_memory(arch, cfg, ["sdmprune"])["weight_gradients"] == 4 * mlp
    llmp = scoring_memory(arch, cfg, ["llm_pruner"])
    assert llmp == {**ce, "weight_gradients": 8 * mlp}
