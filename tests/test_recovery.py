"""LoRA recovery: real optimisation on tiny pruned models, exact merge, pruned shapes kept, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_RESOURCES, tiny_model

from hfprune.adapters import get_adapter
from hfprune.cli import main as cli_main
from hfprune.config import validate_config
from hfprune.data import load_texts
from hfprune.errors import ConfigError, HFPruneError
from hfprune.models import ModelSpec, load_tokenizer
from hfprune.recovery import (
    ALPACA_PROMPT,
    IGNORE,
    alpaca_examples,
    apply_lora,
    check_settings,
    collate,
    merge_lora,
    run_recovery,
    token_loss_sum,
    train_lora,
)
from hfprune.surgery import load_pruned, prune_model


def make_cfg(source: str = "smollm2-135m", **recovery) -> dict:
    return validate_config({"models": [{"name": "m", "family": "llama", "source": source}],
                            "criteria": ["random"], "ratios": [0.2], "device": "cpu", "recovery": recovery})


def random_plan(intermediate: int, keeps, seed: int = 0) -> dict:
    """Non-uniform plan: layer i keeps keeps[i] = (neurons, kv groups or None) at seeded random positions."""
    gen = torch.Generator().manual_seed(seed)
    return {"model": "m", "criterion": "random", "ratio": 0.3,
            "layers": [{"mlp_keep": sorted(torch.randperm(intermediate, generator=gen)[:k].tolist()), "kv_keep": kv}
                       for k, kv in keeps]}


KEEPS = ((60, None), (40, [1]))  # layer 1 also loses a KV group, so LoRA also sits on sliced q/k/v/o


def pruned_tiny():
    model = tiny_model("llama")
    return prune_model(model, random_plan(96, KEEPS))


def recurrence_examples(n: int = 16, length: int = 32, seed: int = 0):
    """Learnable sequences: x_{t+1} = (7 x_t + 3) mod 208 + 3 from random starts (ids 3..210 of vocab 211)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in torch.randint(3, 211, (n,), generator=gen).tolist():
        ids = [start]
        while len(ids) < length:
            ids.append((ids[-1] * 7 + 3) % 208 + 3)
        out.append((ids, list(ids)))
    return out


def mean_loss(model, examples) -> float:
    with torch.no_grad():
        batch = collate(examples, 0)
        return (token_loss_sum(model, batch) / (batch["labels"][:, 1:] != IGNORE).sum()).item()


@pytest.fixture(scope="module")
def trained():
    """A non-uniformly pruned tiny LLaMA after 12 LoRA steps on the recurrence data."""
    examples = recurrence_examples()
    model = pruned_tiny()
    base_loss = mean_loss(model, examples)
    rcfg = make_cfg(learning_rate=2e-2, batch_size=8, grad_accum=1, warmup_steps=2, max_steps=12)["recovery"]
    peft_model, history = train_lora(model, examples, rcfg, steps=12, seed=0, pad_id=0)
    return {"peft": peft_model, "history": history, "examples": examples, "base_loss": base_loss}


def test_lora_training_loss_decreases(trained):
    losses = trained["history"]["loss_curve"]
    assert len(losses) == 12 and len(trained["history"]["lr_curve"]) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses
    # the adapted model, in eval mode on all the data, is clearly better than the pruned model it started from
    assert mean_loss(trained["peft"], trained["examples"]) < trained["base_loss"] - 1.0


def test_first_step_loss_is_the_models_token_mean_loss():
    """Step 1 (adapters start at B=0) over one whole epoch, split in 2 accumulated micro-batches of uneven
    padding, must equal HF's own mean next-token loss over all labelled tokens."""
    examples = recurrence_examples(n=6, length=20)
    examples[1] = (examples[1][0][:11], examples[1][1][:11])  # padding in one micro-batch only
    examples[4] = (examples[4][0], [IGNORE] * 5 + examples[4][1][5:])  # a prompt-masked example
    model = pruned_tiny()
    with torch.no_grad():
        batch = collate(examples, 0)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss.item()
    rcfg = make_cfg(batch_size=3, grad_accum=2, max_steps=1)["recovery"]
    _, history = train_lora(model, examples, rcfg, steps=1, seed=3, pad_id=0)
    assert history["loss_curve"][0] == pytest.approx(expected, rel=1e-5)


def test_merged_logits_equal_adapter_logits_and_shapes_stay_pruned(trained, tmp_path):
    peft_model = trained["peft"]
    ids = collate(trained["examples"][:4], 0)["input_ids"]
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 0.1  # the adapters learned something, so the check below has teeth
    merged = merge_lora(peft_model)
    assert not any("lora" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (merged_logits - adapted).abs().max() < 1e-4
    sizes = [k for k, _ in KEEPS]
    assert get_adapter(merged).intermediate_sizes() == sizes
    assert merged.model.layers[1].self_attn.k_proj.out_features == 16  # one KV group of head_dim 16 left

    merged.save_pretrained(tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert get_adapter(loaded).intermediate_sizes() == sizes
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, merged_logits)


def test_alpaca_examples_mask_the_prompt():
    tok = load_tokenizer(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)
    instructions = ["Name a primary colour.", "  Translate 'cat' to French. "]
    responses = ["Red.", "Chat"]
    examples, dropped = alpaca_examples(tok, instructions, responses, seq_len=128)
    assert dropped == 0 and len(examples) == 2
    for (ids, labels), instr, resp in zip(examples, instructions, responses):
        prompt = ALPACA_PROMPT.format(instruction=instr.strip())
        n_prompt = len(tok(prompt)["input_ids"])
        assert len(ids) == len(labels)
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert IGNORE not in labels[n_prompt:] and labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]) == prompt
        assert tok.decode(labels[n_prompt:]) == resp + tok.eos_token
    # truncation keeps the mask aligned; a prompt that fills seq_len leaves nothing to learn and is dropped
    n_prompt = len(tok(ALPACA_PROMPT.format(instruction="Name a primary colour."))["input_ids"])
    (ids, labels), = alpaca_examples(tok, instructions[:1], ["Red is one; blue is another."], n_prompt + 2)[0]
    assert len(ids) == n_prompt + 2 and labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[-2:]
    assert alpaca_examples(tok, instructions, responses, seq_len=n_prompt) == ([], 2)


def test_bad_target_modules_name_the_missing_and_list_the_linears():
    rcfg = make_cfg(lora={"target_modules": ["q_proj", "qkv_proj", "fc1"]})["recovery"]
    with pytest.raises(ConfigError) as err:
        apply_lora(tiny_model("llama"), rcfg["lora"], seed=0)
    msg = str(err.value)
    assert "recovery.lora.target_modules" in msg and "qkv_proj, fc1" in msg
    assert "down_proj" in msg and "lm_head" in msg


def test_non_positive_steps_are_rejected():
    for bad in ({"max_steps": 0}, {"max_steps": -3}, {"epochs": 0}):
        with pytest.raises(ConfigError, match="recovery"):
            make_cfg(**bad)
    with pytest.raises(ConfigError, match="max_steps or recovery.epochs"):
        check_settings({"max_steps": None, "epochs": None})
    with pytest.raises(ConfigError, match="positive"):
        check_settings({"max_steps": 0, "epochs": 1})


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny random LLaMA with the real SmolLM2 tokenizer, saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = load_tokenizer(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)
    model = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_recover_command_end_to_end(local_model, tmp_path):
    cfg = make_cfg(str(local_model), max_steps=3, batch_size=2, seq_len=32, num_samples=8,
                   lora={"target_modules": ["q_proj", "down_proj"]})
    plan = random_plan(96, KEEPS)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "recovered"
    assert cli_main(["recover", "--config", str(tmp_path / "cfg.yaml"), "--model", "m",
                     "--plan", str(tmp_path / "plan.json"), "--out", str(out)]) == 0

    info = json.loads((out / "recovery.json").read_text())
    assert len(info["loss_curve"]) == 3 and all(loss > 0 for loss in info["loss_curve"])
    assert info["settings"]["steps"] == 3 and info["settings"]["lora"]["r"] == 8
    assert info["data"]["examples"] == 8 and info["data"]["label_tokens"] == 8 * 31
    assert info["data"]["documents"] == 100
    assert info["intermediate_sizes"] == [60, 40] and info["versions"]["peft"]
    # merged weights: the LoRA targets changed, everything else is the pruned dense model's
    recovered = load_pruned(out)
    reference = prune_model(load_pruned(local_model), plan)
    new, old = recovered.state_dict(), reference.state_dict()
    assert new.keys() == old.keys()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(k.endswith(("q_proj.weight", "down_proj.weight")) for k in changed)
    assert get_adapter(recovered).intermediate_sizes() == [60, 40]


def test_recovery_data_is_held_out_from_scoring_text():
    scored, held_out = set(load_texts("calibration")), load_texts("recovery")
    assert len(held_out) == 100 and not scored & set(held_out)


def test_bad_plan_fails_before_training_and_writes_nothing(local_model, tmp_path, capsys):
    cfg = make_cfg(str(local_model), max_steps=2)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(random_plan(96, KEEPS + ((10, None),))))  # 3 layers for a 2-layer model
    out = tmp_path / "out"
    with pytest.raises(HFPruneError, match="plan has 3 layers"):
        run_recovery(cfg, "m", plan, out)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["recover", "--config", str(tmp_path / "cfg.yaml"), "--model", "m", "--plan", str(plan),
                     "--out", str(out)]) == 2
    assert "plan has 3 layers" in capsys.readouterr().err
    (tmp_path / "cfg.yaml").unlink()
    plan.write_text(json.dumps({**random_plan(96, KEEPS), "model": "other"}))
    with pytest.raises(HFPruneError, match="is for model 'other', not 'm'"):
        run_recovery(cfg, "m", plan, out)
    with pytest.raises(HFPruneError, match="does not exist"):
        run_recovery(cfg, "m", tmp_path / "missing.json", out)
    plan.write_text(json.dumps(random_plan(96, KEEPS)))
    bad_targets = make_cfg(str(local_model), lora={"target_modules": ["wq"]})
    with pytest.raises(ConfigError, match="target_modules: wq not found"):
        run_recovery(bad_targets, "m", plan, out)
    assert list(tmp_path.iterdir()) == [plan]


def test_recover_on_lamini_from_a_hub_format_copy(local_model, tmp_path, monkeypatch):
    """`recovery.data: lamini` with `hub_datasets_dir`: MBZUAI/LaMini-instruction's parquet layout, read locally."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    hub = Path(__file__).resolve().parent / "fixtures" / "hub"
    cfg = make_cfg(str(local_model), data="lamini", max_steps=2, batch_size=2, seq_len=64, num_samples=6,
                   lora={"target_modules": ["q_proj"]})
    cfg["hub_datasets_dir"] = str(hub)
    (tmp_path / "plan.json").write_text(json.dumps(random_plan(96, KEEPS)))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "recovered"
    assert cli_main(["recover", "--config", str(tmp_path / "cfg.yaml"), "--model", "m",
                     "--plan", str(tmp_path / "plan.json"), "--out", str(out)]) == 0
    data = json.loads((out / "recovery.json").read_text())["data"]
    assert data["source"] == "MBZUAI/LaMini-instruction" and data["path"] == str(hub / "MBZUAI/LaMini-instruction")
    assert data["rows"] == 6 and data["examples"] + data["dropped_prompt_too_long"] == 6 and data["label_tokens"] > 0
