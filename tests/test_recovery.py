"""LoRA recovery: real optimisation on tiny pruned models, exact merge, pruned shapes kept, bad input; the released
recipe: packed rows with per-example attention, response-only loss, truncation, rows per step, fp32 base under
bf16 autocast, the adapter saved unmerged and evaluated so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_RESOURCES, tiny_model

from hfprune.adapters import get_adapter
from hfprune.cli import main as cli_main
from hfprune.data import load_texts
from hfprune.errors import ConfigError, HFPruneError
from hfprune.evaluation.cell import run_evaluation
from hfprune.models import ModelSpec, load_tokenizer
from hfprune.recovery import (
    ADAPTER_DIR,
    check_settings,
    load_recovered,
    merge_lora,
    num_steps,
    run_recovery,
    save_recovered,
    training_precision,
)
from hfprune.recovery_data import ALPACA_PROMPT, IGNORE, alpaca_examples, collate, pack, training_rows
from hfprune.recovery_train import apply_lora, token_losses, train_lora
from hfprune.surgery import load_pruned, prune_model
from hfprune.validation import validate_config


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


def singles(examples):
    """The compact recipe's rows: one example each."""
    return [[ex] for ex in examples]


def mean_loss(model, examples) -> float:
    with torch.no_grad():
        batch = collate(singles(examples), 0)
        return (token_losses(model, batch).sum() / (batch["labels"][:, 1:] != IGNORE).sum()).item()


@pytest.fixture(scope="module")
def trained():
    """A non-uniformly pruned tiny LLaMA after 12 LoRA steps on the recurrence data."""
    examples = recurrence_examples()
    model = pruned_tiny()
    base_loss = mean_loss(model, examples)
    rcfg = make_cfg(learning_rate=2e-2, batch_size=8, grad_accum=1, warmup_steps=2, max_steps=12)["recovery"]
    peft_model, history = train_lora(model, singles(examples), rcfg, steps=12, seed=0, pad_id=0)
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
        batch = collate(singles(examples), 0)
        expected = model(input_ids=batch["input_ids"], attention_mask=(batch["segments"] >= 0).long(),
                         labels=batch["labels"]).loss.item()
    rcfg = make_cfg(batch_size=3, grad_accum=2, max_steps=1)["recovery"]
    _, history = train_lora(model, singles(examples), rcfg, steps=1, seed=3, pad_id=0)
    assert history["loss_curve"][0] == pytest.approx(expected, rel=1e-5)


def test_merged_logits_equal_adapter_logits_and_shapes_stay_pruned(trained, tmp_path):
    peft_model = trained["peft"]
    ids = collate(singles(trained["examples"][:4]), 0)["input_ids"]
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


def test_bad_steps_and_recipe_are_rejected():
    for bad in ({"max_steps": 0}, {"max_steps": -3}, {"epochs": 0}):
        with pytest.raises(ConfigError, match="recovery"):
            make_cfg(**bad)
    with pytest.raises(ConfigError, match="'recovery.recipe': 'packed' is not one of"):
        make_cfg(recipe="packed")
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


# --- the released recipe -----------------------------------------------------------------------------------------
def random_examples(lengths, prompt: int = 2, seed: int = 0):
    """Random token examples of the given lengths, the first `prompt` tokens masked as a prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 211, (n,), generator=gen).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def released_cfg(**recovery) -> dict:
    return make_cfg(recipe="released", **recovery)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_give_each_example_its_own_loss(family):
    model = tiny_model(family)
    examples = random_examples((5, 9, 3, 12, 7, 16, 4))
    rows = pack(examples, 16)
    assert [[len(ids) for ids, _ in row] for row in rows] == [[5, 9], [3, 12], [7], [16], [4]]
    with torch.no_grad():
        batch = collate(rows, 0)
        packed = token_losses(model, batch)
        worst, start = 0.0, {}
        for r, row in enumerate(rows):
            offset = 0
            for ids, labels in row:
                alone = token_losses(model, collate([[(ids, labels)]], 0))[0]
                n = len(ids)
                assert alone.sum() > 0
                worst = max(worst, float((packed[r, offset:offset + n - 1] - alone[:n - 1]).abs().max()))
                start[(r, len(ids))] = offset
                offset += n
        assert worst < 1e-5
        # the same row under plain causal attention with running positions mixes the examples: the mask matters
        logits = model(input_ids=batch["input_ids"][:1], attention_mask=(batch["segments"][:1] >= 0).long()).logits
        second = slice(start[(0, 9)], start[(0, 9)] + 8)
        labels = batch["labels"][0, 1:][second]
        mixed = torch.nn.functional.cross_entropy(logits[0, :-1][second], labels, ignore_index=IGNORE,
                                                  reduction="none")
        assert (mixed - packed[0, second]).abs().max() > 1e-2


def test_loss_and_gradient_only_on_response_tokens():
    """Prompt tokens, each example's first token and padding take no loss and send no gradient to the logits."""
    model = tiny_model("llama")
    rows = pack(random_examples((6, 5, 8, 4), prompt=3), 12)  # [[6, 5], [8, 4]]: padding in the first row
    batch = collate(rows, 0)
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["logits"] = out

    model.lm_head.register_forward_hook(keep)
    losses = token_losses(model, batch)
    losses.sum().backward()
    grad = captured["logits"].grad.abs().sum(-1)  # the head sees positions 0..T-2; position t predicts token t + 1
    labelled = batch["labels"][:, 1:] != IGNORE
    expected = torch.zeros_like(labelled)
    for r, row in enumerate(rows):  # the response of every example: its tokens 3.. (labels shift by one)
        offset = 0
        for ids, _ in row:
            expected[r, offset + 2:offset + len(ids) - 1] = True
            offset += len(ids)
    assert torch.equal(labelled, expected) and labelled.sum() == (6 + 5 + 8 + 4) - 4 * 3
    assert (grad[labelled] > 0).all() and (grad[~labelled] == 0).all()
    assert (losses[labelled] > 0).all() and (losses[~labelled] == 0).all()
    assert (batch["segments"][0, 11:] == -1).all() and batch["input_ids"][0, 11:].eq(0).all()


def test_released_truncates_long_examples_and_drops_none():
    tok = load_tokenizer(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES)
    instructions = ["Name a primary colour.", "Name a primary colour. " * 20, "Say hi."]
    responses = ["Red is one; blue is another, and yellow the third. " * 4, "Blue.", "Hi."]
    n_prompt = len(tok(ALPACA_PROMPT.format(instruction=instructions[0]))["input_ids"])
    seq_len = n_prompt + 8
    kept, prompt_only = alpaca_examples(tok, instructions, responses, seq_len, keep_prompt_only=True)
    assert prompt_only == 1 and [len(ids) for ids, _ in kept][:2] == [seq_len, seq_len]
    (ids, labels), (_, long_labels) = kept[:2]
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]  # cut, not dropped
    assert long_labels == [IGNORE] * seq_len  # its prompt fills seq_len: kept, truncated, no loss
    dropped, prompt_only = alpaca_examples(tok, instructions, responses, seq_len)
    assert prompt_only == 1 and dropped == [kept[0], kept[2]]  # compact drops it
    rows = training_rows(kept, released_cfg(seq_len=seq_len)["recovery"], seed=0)
    assert sorted(ex for row in rows for ex in row) == sorted(kept)  # every example once
    assert all(sum(len(ids) for ids, _ in row) <= seq_len for row in rows)


def test_rows_per_step_accounting():
    """10 examples of 6 tokens pack 2 per 16-token row: 5 rows; 2 rows x 2 micro-batches per step and 2 epochs are
    ceil(5 / 2) = 3 micro-batches per epoch, 6 in all, 3 optimizer steps; every row is seen once per epoch."""
    examples = random_examples([6] * 10)
    rcfg = released_cfg(seq_len=16, batch_size=2, grad_accum=2, epochs=2, max_steps=None)["recovery"]
    rows = training_rows(examples, rcfg, seed=0)
    assert [len(row) for row in rows] == [2] * 5
    steps = num_steps(rcfg, len(rows))
    assert steps == 3
    model = tiny_model("llama")
    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                          with_kwargs=True)
    _, history = train_lora(model, rows, rcfg, steps=steps, seed=0, pad_id=0)
    assert len(history["loss_curve"]) == 3 and [len(b) for b in seen] == [2, 2, 1, 2, 2, 1]
    first_epoch, second_epoch = torch.cat(seen[:3]), torch.cat(seen[3:])
    every_row = collate(rows, 0)["input_ids"]
    for epoch in (first_epoch, second_epoch):
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, every_row.tolist()))
    assert num_steps({**rcfg, "epochs": 1}, 5) == 2 and num_steps({**rcfg, "grad_accum": 1}, 5) == 6


def test_released_precision_is_fp32_base_under_bf16_autocast():
    cfg = released_cfg()
    assert training_precision({**cfg, "dtype": "bfloat16"}, torch.device("cpu")) == ("float32", torch.bfloat16)
    assert training_precision({**cfg, "dtype": "float32"}, torch.device("cpu")) == ("float32", None)
    compact = make_cfg()
    assert training_precision({**compact, "dtype": "bfloat16"}, torch.device("cuda")) == ("bfloat16", None)
    assert training_precision({**compact, "dtype": "bfloat16"}, torch.device("cpu")) == ("float32", None)

    model = pruned_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def record(module, args, out):
        seen.append((module.weight.dtype, out.dtype, torch.is_autocast_enabled("cpu")))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record)
    rcfg = released_cfg(batch_size=2, max_steps=2)["recovery"]
    rows = training_rows(random_examples((9, 5, 12, 7)), {**rcfg, "seq_len": 16}, seed=0)
    peft_model, history = train_lora(model, rows, rcfg, steps=2, seed=0, pad_id=0, autocast_dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(history["loss_curve"])))
    # base projections, LoRA A/B and lm_head alike: fp32 weights, bf16 matmuls, autocast on
    assert len(seen) > 8 and set(seen) == {(torch.float32, torch.bfloat16, True)}
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())
    after = peft_model.unload().state_dict()  # the base is trained through, never changed
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_saved_adapter_is_unmerged_and_reloads_to_the_trained_model(tmp_path):
    model = pruned_tiny()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    rcfg = released_cfg(learning_rate=2e-2, batch_size=4, max_steps=6)["recovery"]
    examples = recurrence_examples(n=8, length=12)
    rows = training_rows(examples, {**rcfg, "seq_len": 32}, seed=0)
    peft_model, _ = train_lora(model, rows, rcfg, steps=6, seed=0, pad_id=0)
    ids = collate(singles(examples[:3]), 0)["input_ids"]
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert (trained - base).abs().max() > 0.1

    out = tmp_path / "recovered"
    out.mkdir()
    save_recovered(peft_model, None, out, "released", torch.float32)
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    saved = load_pruned(out).state_dict()  # the folder's own weights: the pruned base, no adapter folded in
    assert saved.keys() == base_state.keys() and all(torch.equal(saved[k], v) for k, v in base_state.items())
    reloaded = load_recovered(out)
    assert any("lora_A" in name for name, _ in reloaded.named_modules())  # unmerged: the adapter layers are back
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - trained).abs().max() < 1e-5


def test_released_recipe_end_to_end_is_evaluated_unmerged(local_model, tmp_path):
    """recover (bf16 config on CPU: fp32 base under autocast) -> the folder holds the untouched pruned base and
    the adapter -> evaluation attaches it: other numbers than the pruned cell's, the same size and speed model."""
    cfg = validate_config({
        "models": [{"name": "m", "family": "llama", "source": str(local_model)}], "criteria": ["random"],
        "ratios": [0.2], "device": "cpu", "dtype": "bfloat16", "resources_dir": REPO_RESOURCES,
        "recovery": {"recipe": "released", "max_steps": 2, "batch_size": 2, "seq_len": 32, "num_samples": 8,
                     "learning_rate": 1e-2},
        "evaluation": {"suite": "none", "perplexity": {"sources": ["wiki"], "seq_len": 32, "max_tokens": 128},
                       "fidelity": {"num_prompts": 2, "seq_len": 16},
                       "efficiency": {"prefill_tokens": 8, "decode_batch": 1, "decode_tokens": 2, "repeats": 1}}})
    plan = random_plan(96, KEEPS)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "recovered"
    summary = run_recovery(cfg, "m", tmp_path / "plan.json", out)
    assert json.loads((out / "recovery.json").read_text()) == json.loads(json.dumps(summary))
    settings = summary["settings"]
    assert (settings["recipe"], settings["dtype"], settings["autocast"], settings["adapter"]) == (
        "released", "float32", "bfloat16", "unmerged")
    assert settings["rows"] == 8 and settings["rows_per_step"] == 2  # 32-token windows fill a row each
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    saved = load_pruned(out).state_dict()
    reference = prune_model(load_pruned(local_model), plan).to(torch.bfloat16).state_dict()
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], v) for k, v in reference.items())

    pruned = run_evaluation(cfg, "m", plan_path=tmp_path / "plan.json")
    recovered = run_evaluation(cfg, "m", plan_path=tmp_path / "plan.json", recovered_dir=out)
    assert recovered["meta"]["recovered_adapter"] == "unmerged" and recovered["cell"]["recovered"]
    assert pruned["meta"]["recovered_adapter"] is None
    assert recovered["efficiency"]["params"] == pruned["efficiency"]["params"]
    assert recovered["perplexity"]["wiki"]["ppl"] != pruned["perplexity"]["wiki"]["ppl"]
    assert recovered["fidelity"]["kl"] != pruned["fidelity"]["kl"]


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
