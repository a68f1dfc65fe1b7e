"""The scorer against a direct computation: full logits, ordinary backward, h.retain_grad(), per token."""

import pytest
import torch
from conftest import REPO_RESOURCES, ROOT, tiny_model

from hfprune.adapters import get_adapter
from hfprune.criteria import get_criterion
from hfprune.data import load_texts, texts_hash
from hfprune.errors import ScoreError
from hfprune.plan import make_plan
from hfprune.scorer import score_model
from hfprune.surgery import neuron_mask

GRADIENT = ("taylor_ce", "taylor_entropy", "taylor_entropy_topk", "fisher", "taylor_kd")


def _seqs(seed=1, lengths=(12, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 211, (n,), generator=g) for n in lengths]


def _padded(seqs, fill_seed=5):
    """Right-padded batch; the padding holds random junk tokens (it must not matter)."""
    g = torch.Generator().manual_seed(fill_seed)
    T = max(len(s) for s in seqs)
    ids = torch.randint(3, 211, (len(seqs), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def reference_scores(model, seqs, crit, mask_plan=None, attn=True):
    """Direct computation: each sequence unpadded, full-vocabulary logits, parameters trainable,
    C = mean over the positions that have a next token (a label-free criterion: over every position, the last
    included); score = sum_t token_scores(h_t * dC/dh_t) over the same positions."""
    from hfprune.adapters import get_adapter

    adapter = get_adapter(model)
    end = -1 if crit.uses_labels else None  # positions [:end] count
    n = sum(len(s) - (1 if crit.uses_labels else 0) for s in seqs)
    captured = []

    def grab(module, args):
        if not torch.is_grad_enabled():  # the teacher's no-grad forward
            return
        args[0].retain_grad()
        captured.append((module, args[0]))

    handles = [adapter.mlp(i).down.register_forward_pre_hook(grab) for i in range(adapter.num_layers)]
    if attn:
        handles += [adapter.attention(i).o.register_forward_pre_hook(grab) for i in range(adapter.num_layers)]
    total = 0
    for s in seqs:
        with torch.no_grad():
            teacher = model(s[None]).logits.float() if crit.needs_teacher else None
        with neuron_mask(model, mask_plan) if mask_plan else torch.enable_grad():
            logits = model(s[None]).logits.float()
        labels = torch.cat([s[1:], torch.tensor([-100])])[None]
        total = total + crit.position_loss(logits, labels, teacher)[:, :end].sum() / n
    total.backward()
    for h in handles:
        h.remove()
    out = {}
    index = {id(adapter.mlp(i).down): f"mlp.{i}" for i in range(adapter.num_layers)}
    if attn:
        index.update({id(adapter.attention(i).o): f"attn_kv.{i}" for i in range(adapter.num_layers)})
    for module, h in captured:
        key = index[id(module)]
        contrib = (h * h.grad)[0, :end].float()
        if key.startswith("attn_kv"):
            contrib = contrib.reshape(contrib.shape[0], model.config.num_key_value_heads, -1).sum(-1)
        out[key] = out.get(key, 0) + crit.token_scores(contrib).sum(0)
    model.zero_grad(set_to_none=True)
    return out


def _assert_scores_close(got: dict, want: dict):
    assert set(got) == set(want)
    for k, value in want.items():
        torch.testing.assert_close(got[k], value.detach(), rtol=2e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_criteria_equal_direct_computation(family, name):
    model = tiny_model(family)
    seqs = _seqs()
    crit = get_criterion(name, {"preprune_keep": {"ratio": 0.05}} if name == "taylor_kd" else None)
    attn = not get_adapter(model).no_kv_pruning  # the others refuse mlp+attn by name (test_surgery)
    got = score_model(model, [_padded(seqs)], [crit], scope="mlp+attn" if attn else "mlp", logits_chunk=4)[name]
    plan = None
    if crit.needs_teacher:  # SDMPrune: CE pre-prune, then KD of the masked student against the dense model
        ce = reference_scores(model, seqs, get_criterion("taylor_ce"))
        plan = make_plan(ce, model.config, 0.05, family)
        removed = set(range(96)) - set(plan["layers"][0]["mlp_keep"])
        assert removed and all(got["mlp.0"][i] == 0 for i in removed)  # pre-pruned neurons score exactly 0
    _assert_scores_close(got, reference_scores(model, seqs, crit, plan, attn=attn))


def test_reference_matches_finite_differences():
    """Check the reference itself: dC/d(delta) for h_ti -> h_ti (1 + delta) equals h_ti * dC/dh_ti."""
    model = tiny_model("llama", dtype=torch.float64)
    seq = _seqs(lengths=(8,))[0]
    crit = get_criterion("taylor_entropy")
    down = model.model.layers[1].mlp.down_proj
    h_store = {}

    def loss(t=None, i=None, delta=0.0):
        def pre(module, args):
            h = args[0]
            h_store["h"] = h
            if t is None:
                h.retain_grad()
                return None
            scale = torch.ones_like(h)
            scale[0, t, i] += delta
            return (h * scale,)
        handle = down.register_forward_pre_hook(pre)
        logits = model(seq[None]).logits
        handle.remove()
        return crit.position_loss(logits, torch.zeros_like(seq)[None])[:, :-1].mean()

    loss().backward()
    hg = (h_store["h"] * h_store["h"].grad)[0]
    eps = 1e-3
    # HF computes RMSNorm in fp32 even in an fp64 model: check the largest entries, with steps of 1e-3
    top = hg[:-1].abs().flatten().topk(4).indices.tolist()
    for t, i in [divmod(j, hg.shape[1]) for j in top]:
        fd = (loss(t, i, eps) - loss(t, i, -eps)) / (2 * eps)
        torch.testing.assert_close(fd, hg[t, i].detach(), rtol=5e-3, atol=0)


def test_padding_is_excluded():
    model = tiny_model("qwen2")
    seqs = _seqs(lengths=(12, 5))
    a = score_model(model, [_padded(seqs, fill_seed=1)], ["taylor_entropy"])["taylor_entropy"]
    b = score_model(model, [_padded(seqs, fill_seed=2)], ["taylor_entropy"])["taylor_entropy"]
    _assert_scores_close(a, b)
    _assert_scores_close(a, reference_scores(model, seqs, get_criterion("taylor_entropy"), attn=False))


def test_shared_forward_chunking_and_checkpointing_give_the_same_scores():
    model = tiny_model("llama")
    batches = [_padded(_seqs(seed=s)) for s in range(2)]
    # closed-form (ce, entropy) and autograd (topk) output gradients in one shared forward
    names = ("taylor_ce", "taylor_entropy_topk", "taylor_entropy")
    together = score_model(model, batches, list(names), logits_chunk=256)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    for name in names:
        apart = score_model(model, batches, [name], logits_chunk=3)[name]
        calls.clear()
        ckpt = score_model(model, batches, [name], logits_chunk=5, gradient_checkpointing=True)[name]
        assert len(calls) == 2 * len(batches)  # checkpointing is on: each layer is recomputed in backward
        _assert_scores_close(together[name], apart)
        _assert_scores_close(together[name], ckpt)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_kd_at_the_dense_point_has_a_kl_signal():
    """Teacher-only softening (SDMPrune): without a pre-prune the KL term still moves the scores, which equal
    direct autograd; with alpha = 0 KD is plain CE."""
    model = tiny_model("mistral")
    seqs = _seqs()
    kd = get_criterion("taylor_kd", {"alpha": 0.4, "preprune_keep": None})
    got = score_model(model, [_padded(seqs)], [kd], logits_chunk=4)["taylor_kd"]
    _assert_scores_close(got, reference_scores(model, seqs, kd, attn=False))
    ce = score_model(model, [_padded(seqs)], ["taylor_ce"])["taylor_ce"]
    assert all((got[k] - 0.6 * ce[k]).abs().max() > 1e-3 * ce[k].abs().max() for k in ce)
    plain = get_criterion("taylor_kd", {"alpha": 0.0, "preprune_keep": None})
    _assert_scores_close(score_model(model, [_padded(seqs)], [plain])["taylor_kd"], ce)


def test_kd_preprune_keeps_a_multiple_of_hidden():
    """SDMPrune: int(M x hidden) neurons per layer kept by CE before the KD pass (tiny: int(1.3 x 64) = 83 of 96);
    with the default 3.9 x hidden the whole layer is kept, i.e. nothing is pre-pruned. Gradient checkpointing gives
    the same scores."""
    model = tiny_model("llama")
    seqs = _seqs()
    kd = get_criterion("taylor_kd", {"preprune_keep": {"hidden_multiple": 1.3}})
    got = score_model(model, [_padded(seqs)], [kd, "taylor_ce"], logits_chunk=4)
    ce = got["taylor_ce"]
    plan = {"layers": [{"mlp_keep": sorted(ce[f"mlp.{i}"].topk(83).indices.tolist()), "kv_keep": None}
                       for i in range(2)]}
    assert all(int((got["taylor_kd"][f"mlp.{i}"] == 0).sum()) == 13 for i in range(2))
    _assert_scores_close(got["taylor_kd"], reference_scores(model, seqs, kd, plan, attn=False))
    # gradient checkpointing recomputes the student's forward in the backward: the mask must still be on
    ckpt = score_model(model, [_padded(seqs)], [kd], gradient_checkpointing=True)["taylor_kd"]
    _assert_scores_close(ckpt, got["taylor_kd"])
    dense = score_model(model, [_padded(seqs)], [get_criterion("taylor_kd")])["taylor_kd"]
    _assert_scores_close(dense, reference_scores(model, seqs, get_criterion("taylor_kd"), attn=False))


def test_entropy_counts_the_last_position():
    """As the released HFPrune code: C averages the entropy over every position and |h g| sums over every
    position; CE (labelled) still stops one short. Shared with CE in one forward, both stay exact."""
    model = tiny_model("llama")
    seqs = _seqs(lengths=(7, 10))
    ent, ce = get_criterion("taylor_entropy"), get_criterion("taylor_ce")
    both = score_model(model, [_padded(seqs)], [ent, ce], logits_chunk=3)
    _assert_scores_close(both["taylor_entropy"], reference_scores(model, seqs, ent, attn=False))
    _assert_scores_close(both["taylor_ce"], reference_scores(model, seqs, ce, attn=False))
    # the last position matters: a one-position sequence has entropy scores, CE ones are zero
    one = score_model(model, [seqs[0][:1][None]], [ent, ce])
    assert one["taylor_entropy"]["mlp.0"].abs().sum() > 0 and one["taylor_ce"]["mlp.0"].abs().sum() == 0


def test_scorer_equals_the_released_loop():
    """benchmarks/_official.py (the released HFPrune loop, which bench_score times and compares kept sets with)
    and the scorer compute the same scores: full-length batches, entropy over every position, |h g| summed.
    At float64 the released loop is the exact reference; with an fp32 accumulator it stays within rounding."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_official", ROOT / "benchmarks" / "_official.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 211, (2, 11), generator=g) for _ in range(3)]
    got = score_model(tiny_model("llama"), batches, ["taylor_entropy"], logits_chunk=5)["taylor_entropy"]
    exact = official.official_entropy_scores(tiny_model("llama").double(), batches, torch.float64)
    fp32 = official.official_entropy_scores(tiny_model("llama"), batches, torch.float32)
    assert exact["mlp.0"].dtype == torch.float64 and set(got) == set(exact)
    for k in exact:
        torch.testing.assert_close(got[k].double(), exact[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(fp32[k].double(), exact[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_free_criteria():
    model = tiny_model("qwen3")
    batches = [_padded(_seqs())]
    s = score_model(model, batches, ["random", "magnitude", "activation"], scope="mlp+attn", seed=3)
    mlp = model.model.layers[1].mlp
    norm = (mlp.gate_proj.weight.square().sum(1) + mlp.up_proj.weight.square().sum(1)
            + mlp.down_proj.weight.square().sum(0)).sqrt()
    torch.testing.assert_close(s["magnitude"]["mlp.1"], norm.detach())
    assert torch.equal(s["random"]["mlp.0"], score_model(model, [], ["random"], seed=3)["random"]["mlp.0"])
    assert not torch.equal(s["random"]["mlp.0"], score_model(model, [], ["random"], seed=4)["random"]["mlp.0"])
    # activation: mean |h| over counted tokens (both sequences, last positions excluded) x down-column norm
    hs = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: hs.append(a[0].detach()))
    with torch.no_grad():
        for seq in _seqs():
            model(seq[None])
    handle.remove()
    mean_abs = torch.cat([h[0, :-1] for h in hs]).abs().mean(0)
    torch.testing.assert_close(s["activation"]["mlp.1"], mean_abs * mlp.down_proj.weight.norm(dim=0).detach())
    assert s["activation"]["attn_kv.0"].shape == (2,)


def test_nan_stops_with_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ScoreError, match=r"criterion 'taylor_entropy': non-finite score in mlp.1 .* batch 0"):
        score_model(model, [_padded(_seqs())], ["taylor_entropy"])


def _config_file(tmp_path, source, family="llama"):
    import yaml

    model = {"name": "m", "source": str(source), **({"family": family} if family else {})}
    cfg = {"models": [model],
           "criteria": ["taylor_entropy"], "ratios": [0.2], "resources_dir": REPO_RESOURCES,
           "device": "cpu", "calibration": {"num_sequences": 3, "seq_len": 16, "batch_size": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return ["--config", str(tmp_path / "c.yaml"), "--model", "m"]


def test_same_seed_gives_byte_identical_score_files(tmp_path, smollm2_dir):
    """A tiny random LLaMA with SmolLM2's tokenizer, saved as a local model folder; scored twice."""
    import json

    from transformers import AutoTokenizer

    from hfprune.cli import main

    tiny_model("llama", vocab_size=49152).save_pretrained(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path / "tiny")
    base = _config_file(tmp_path, tmp_path / "tiny")
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.safetensors")
        assert main(["score", *base, "--criterion", "taylor_entropy_topk", "--out", out]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["calibration"]["tokens"] == 3 * 16 and side["criterion_options"]["k"] == 64  # last included
    assert side["calibration"]["sampling"] == "stream"
    assert side["calibration"]["texts_sha256"] == texts_hash(load_texts("calibration"))
    assert side["versions"]["torch"] and side["peak_memory_mb"] > 0


def test_cli_reads_the_family_from_the_checkpoint(tmp_path, smollm2_dir):
    """A config without `family`: score, plan and prune a tiny Phi-3 folder (fused projections) by the CLI."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune.cli import main

    tiny_model("phi3", vocab_size=49152).save_pretrained(tmp_path / "phi")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path / "phi")
    base = _config_file(tmp_path, tmp_path / "phi", family=None)
    scores = str(tmp_path / "s.safetensors")
    assert main(["score", *base, "--criterion", "taylor_entropy", "--out", scores]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["family"] == "phi3"
    # the 49152-token embeddings are nearly all of this model: removing 0.5% of it keeps 13 of 96 neurons
    assert main(["plan", *base, "--scores", scores, "--ratio", "0.005", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["family"] == "phi3" and len(plan["layers"][0]["mlp_keep"]) == 13
    assert main(["prune", *base, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "pruned")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert sum(p.numel() for p in pruned.parameters()) == plan["params_pruned"]


@pytest.mark.slow
def test_cli_score_plan_prune_on_smollm2(tmp_path, smollm2_dir):
    """score, plan at 0.2, prune; the pruned folder loads with plain HF and has the planned size."""
    import json

    from transformers import AutoModelForCausalLM

    from hfprune.cli import main

    base = _config_file(tmp_path, "smollm2-135m")
    assert main(["score", *base, "--criterion", "taylor_entropy", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["plan", *base, "--scores", str(tmp_path / "a.safetensors"), "--ratio", "0.2",
                 "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert abs(plan["achieved_ratio"] - 0.2) < 1e-3 and len(plan["layers"]) == 30
    assert main(["prune", *base, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "pruned")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.intermediate_size == len(plan["layers"][0]["mlp_keep"])
    assert sum(p.numel() for p in pruned.parameters()) == plan["params_pruned"]
    assert main(["plan", *base, "--scores", str(tmp_path / "missing.safetensors"), "--ratio", "0.2",
                 "--out", str(tmp_path / "p2.json")]) == 2
    assert not (tmp_path / "p2.json").exists()
