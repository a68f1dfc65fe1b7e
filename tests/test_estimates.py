"""Cost estimates (hfprune.estimates, `hfprune estimate`): the FLOP model against torch's own count of a real
forward and backward, the Table 5 calibration, the memory models, and the command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from hfprune import estimates, job_estimates, limits
from hfprune.validation import load_config, validate_config

PAPER = ROOT / "config" / "paper.yaml"


def _eager(model):
    model.set_attn_implementation("eager")  # FlopCounterMode does not count the CPU sdpa kernel: eager's matmuls
    return model


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_forward_flops_match_torch_count_of_a_real_forward(family, tied):
    model = _eager(tiny_model(family, tie_word_embeddings=tied))
    seq = 48
    ids = torch.randint(0, model.config.vocab_size, (2, seq))
    with torch.no_grad():
        counted = _counted(lambda: model(input_ids=ids, use_cache=False))
    estimated = 2 * seq * estimates.forward_flops(model.config, seq)
    assert estimated == pytest.approx(counted, rel=0.03)


def test_scoring_flops_match_torch_count_of_an_input_gradient_backward():
    """Frozen weights, embeddings as the grad leaf (as the scorer): forward + lm_head + a backward of input
    gradients only. The model counts the backward as one more forward (attention's backward is dearer, which
    a short sequence keeps small)."""
    model = _eager(tiny_model("llama"))
    for p in model.parameters():
        p.requires_grad_(False)
    seq = 16
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step():
        logits = model(inputs_embeds=emb, use_cache=False).logits
        logits.float().logsumexp(-1).sum().backward()

    counted = _counted(step)
    cfg = validate_config({"models": [{"name": "m", "source": "smollm2-135m"}], "criteria": ["taylor_entropy"],
                           "ratios": [0.2], "calibration": {"num_sequences": 1, "seq_len": seq}})
    tokens, flops = estimates.scoring_flops(model.config, cfg, "taylor_entropy")
    assert tokens == seq and flops == pytest.approx(counted, rel=0.05)
    ckpt = validate_config({**cfg, "scoring": {"gradient_checkpointing": True}})
    assert estimates.scoring_flops(model.config, ckpt, "taylor_entropy")[1] - flops == seq * estimates.decoder_flops(
        model.config, seq)


def _paper_llama2():
    cfg = load_config(PAPER)
    arch = LlamaConfig(**{k: v for k, v in estimates.TABLE5["arch"].items() if k != "model_type"})
    return cfg, arch


def test_calibration_reproduces_table5_from_the_paper_config_and_scales_linearly():
    cfg, arch = _paper_llama2()
    assert estimates.total_params(arch) == 6_738_415_616  # meta-llama/Llama-2-7b-hf
    est = estimates.scoring_estimate(arch, cfg, "taylor_entropy")
    assert est["tokens"] == 1000 * 1024
    assert estimates.seconds(est["flops"]) == pytest.approx(508.9, rel=1e-9)
    double = validate_config({**cfg, "calibration": {**cfg["calibration"], "num_sequences": 2000}})
    assert estimates.seconds(estimates.scoring_estimate(arch, double, "taylor_entropy")["flops"]) == pytest.approx(
        2 * 508.9, rel=1e-9)
    # a GPU twice as fast halves the time; the paper's rate is a plausible fraction of a modern GPU's bf16 peak
    assert estimates.seconds(est["flops"], 2 * estimates.paper_tflops()) == pytest.approx(508.9 / 2)
    assert 30 < estimates.paper_tflops() < 300


def test_taylor_kd_costs_a_teacher_forward_and_a_ce_pass_only_where_it_preprunes():
    cfg, arch = _paper_llama2()
    entropy = estimates.scoring_flops(arch, cfg, "taylor_entropy")[1]
    kd = estimates.scoring_flops(arch, cfg, "taylor_kd", "0.2")[1]
    tokens = 1000 * 1024
    # int(3.9 x 4096) >= 11008: LLaMA-2-7B has nothing to pre-prune, so only the teacher's forward is added
    assert kd - entropy == tokens * estimates.forward_flops(arch, 1024)
    small = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
    # LLaMA-3.2-1B: int(3.9 x 2048) = 7987 < 8192, so a CE pass (as dear as an entropy one) comes first
    e, k = (estimates.scoring_flops(small, cfg, c, r)[1] for c, r in (("taylor_entropy", None), ("taylor_kd", "0.2")))
    assert k - e == e + tokens * estimates.forward_flops(small, 1024)


def test_scoring_memory_is_the_guards_estimate():
    cfg, arch = _paper_llama2()
    assert estimates.scoring_memory is limits.scoring_memory
    parts = limits.scoring_memory(arch, cfg, ["taylor_entropy"])
    est = estimates.scoring_estimate(arch, cfg, "taylor_entropy")
    assert est["memory"] == sum(parts.values()) + limits.RUNTIME_BYTES["cuda"]


def test_recovery_memory_upcasts_base_weights_for_an_upcasting_recipe():
    cfg, arch = _paper_llama2()
    pruned = estimates.pruned_arch(arch, cfg, 0.2)
    assert pruned.intermediate_size == 7581  # the paper's neurons kept at 0.2
    assert cfg["recovery"]["recipe"] == "released"
    released = estimates.recovery_memory(pruned, cfg)
    plain = estimates.recovery_memory(pruned, {**cfg, "recovery": {**cfg["recovery"], "recipe": "compact"}})
    assert plain["weights"] == estimates.total_params(pruned) * 2 and released["weights"] == 2 * plain["weights"]
    assert released["lora"] == plain["lora"] == 16 * estimates.lora_params(pruned, cfg["recovery"]["lora"])
    # LoRA r 32 on all seven projections of 32 layers
    h, i = 4096, 7581
    assert estimates.lora_params(pruned, cfg["recovery"]["lora"]) == 32 * 32 * (4 * 2 * h + 3 * (h + i))


def test_evaluation_tokens_follow_the_suite_limit_and_backend():
    cfg = load_config(ROOT / "config" / "default.yaml")
    tasks = estimates.lm_eval_tokens(cfg)
    assert len(tasks) == 7 and all(dec > 0 and head > 0 for _, dec, head, _ in tasks)
    stock = estimates.lm_eval_tokens(validate_config({**cfg, "evaluation": {**cfg["evaluation"], "backend": "stock"}}))
    # the shared backend runs a context once (WinoGrande's two contexts differ: no saving there)
    assert all(s[1] >= t[1] for s, t in zip(stock, tasks)) and sum(s[1] for s in stock) > 1.5 * sum(t[1] for t in tasks)
    whole = estimates.lm_eval_tokens(validate_config({**cfg, "evaluation": {**cfg["evaluation"], "limit": None}}))
    assert whole[0][1] / tasks[0][1] == pytest.approx(estimates.TASKS["boolq"][1] / 5, rel=0.01)
    # offline9: SIQA is stock social_iqa; MMLU's limit applies to each of its 57 subjects
    nine = estimates.lm_eval_tokens(validate_config({**cfg, "evaluation": {**cfg["evaluation"], "suite": "offline9",
                                                                          "limit": 5}}))
    assert nine[:7] == tasks and [t[0] for t in nine[7:]] == ["offline_mmlu", "offline_siqa"]
    _, _, _, ctx, cont = estimates.TASKS["mmlu"]
    assert nine[7][1] == 57 * 5 * (ctx + 4 * cont)
    assert nine[8][1] == round(5 * (estimates.TASKS["social_iqa"][3] + 3 * estimates.TASKS["social_iqa"][4]))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hfprune.cli", "estimate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False, env=env)


def test_cli_prints_the_table_for_the_embedded_model(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["recovery"] = {"enabled": True}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _cli("--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ESTIMATES, not measurements")
    rows = [line.split() for line in lines if line.startswith("smollm2-135m")]
    # cells: magnitude once (seedless) + taylor_entropy per seed (2) = 3; each is pruned, recovered, evaluated twice
    assert [r[1:5] for r in rows] == [
        ["score", "magnitude", "1", "0.135"], ["score", "taylor_entropy", "2", "0.135"],
        ["evaluate", "dense", "1", "0.135"], ["evaluate", "pruned", "r0.2", "3"], ["recover", "r0.2", "3", "0.108"],
        ["evaluate", "recovered", "r0.2", "3"]]
    totals = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["score"], ["total"])}
    assert totals["score"][0] == "3" and totals["total"][0] == "13"
    assert any("pass --tflops" in line for line in lines)  # a CPU config is told its times are at the GPU rate


def test_cli_unknown_model_is_one_line():
    out = _cli("--config", str(ROOT / "config" / "smoke.yaml"), "--model", "nope")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "'nope' is not in the config's models" in out.stderr


def test_cli_hub_model_not_cached_needs_arch_json(tmp_path):
    import os

    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    cfg["models"] = [{"name": "m", "source": "hfprune-tests/not-a-model"}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = _cli("--config", str(path), env=env)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--arch-json" in out.stderr
    arch = LlamaConfig(**{k: v for k, v in estimates.TABLE5["arch"].items() if k != "model_type"})
    arch.to_json_file(tmp_path / "config.json")
    out = _cli("--config", str(path), "--model", "m", "--arch-json", str(tmp_path / "config.json"), "--markdown",
               env=env)
    assert out.returncode == 0, out.stderr
    # the Table 5 model with the paper config: its entropy score job is the calibration run
    row = [cell.strip() for cell in next(line for line in out.stdout.splitlines() if "| taylor_entropy" in line)
           .split("|")]
    assert row[4:6] == ["1", "6.74"] and row[9] == "8.48 min"  # jobs, params (B), h/job


def test_a_grid_counts_each_job_the_workflow_runs_once(tmp_path):
    """Over grid variants, a job several variants share (the dense evaluation, a score an allocation axis does
    not change) is counted once: per stage, the jobs Snakemake's DAG of the same config holds; and each variant's
    rows carry its own settings (a calibration axis changes a score job's tokens)."""
    from collections import Counter

    from test_workflow import _dag

    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg.update(criteria=["magnitude", "taylor_entropy_topk"], recovery={"enabled": True},
               grid={"calibration.num_sequences": [2, 4], "pruning.allocation": ["uniform", "global"],
                     "evaluation.limit": [2, 3], "criterion_options.taylor_entropy_topk.k": [4, 8]})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rules, _ = _dag(tmp_path, path)
    dag = Counter(rules.values())
    cfg = load_config(path)
    df = job_estimates.grid_table(cfg, {m["name"]: limits.job_architecture(cfg, m["name"]) for m in cfg["models"]})
    jobs = df.groupby("stage")["jobs"].sum()
    assert jobs["score"] == dag["score"] and jobs["recover"] == dag["recover"]
    assert jobs["evaluate"] == dag["evaluate_dense"] + dag["evaluate_pruned"] + dag["evaluate_recovered"]
    assert (df["what"] == "dense").sum() == 2  # one per evaluation.limit, whatever the other axes
    topk = df[(df["stage"] == "score") & (df["what"] == "taylor_entropy_topk")].set_index("variant")["tokens"]
    assert len(topk) == 4 and topk["calibration.num_sequences-4_criterion_options.taylor_entropy_topk.k-8"] == \
        2 * topk["calibration.num_sequences-2_criterion_options.taylor_entropy_topk.k-8"]


def test_recovery_memory_counts_autocast_copies_chunked_logits_and_checkpointing():
    cfg, arch = _paper_llama2()
    pruned = estimates.pruned_arch(arch, cfg, 0.2)
    parts = estimates.recovery_memory(pruned, cfg)  # released recipe, bf16: fp32 base under bf16 autocast
    assert parts["autocast_copies"] == 2 * estimates.total_params(pruned) and parts["weights"] == 4 * estimates.total_params(pruned)
    # one cross-entropy chunk of fp32 logits (x3: logits, log-softmax, gradient), not the micro-batch's
    rcfg = cfg["recovery"]
    assert parts["logits"] < 3 * rcfg["batch_size"] * rcfg["seq_len"] * pruned.vocab_size * 4
    checkpointed = estimates.recovery_memory(pruned, {**cfg, "recovery": {**rcfg, "gradient_checkpointing": True}})
    assert checkpointed["activations"] < parts["activations"] / 4
    assert estimates.recovery_memory(pruned, {**cfg, "dtype": "float32"})["autocast_copies"] == 0
