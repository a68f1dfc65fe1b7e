"""Device placement rules for models split over devices (hfprune.placement), tested as functions on CPU: a model
whose output layer and final norm sit on the `meta` device stands in for the last GPU of a device map, so every
rule is checked by the device of the tensors it really builds. The split-model run itself is `make gpu-check`'s.
Also: per-batch result copies and evaluation batch sizes do not change the backend's answers."""

from __future__ import annotations

import pytest
import torch

from hfprune.evaluation.backend import (
    SharedContextLM,
    default_max_batch_tokens,
    group_requests,
    per_request,
    scored_rows,
)
from hfprune.placement import (
    PerDevice,
    input_device,
    model_devices,
    on,
    peak_memory_mb,
)
from hfprune.surgery import input_mask
from tests.conftest import tiny_model
from tests.test_eval_backend import _requests, _tokenizer

META = torch.device("meta")
CPU = torch.device("cpu")


@pytest.fixture
def split_model():
    """A tiny LLaMA whose last layer, final norm and lm_head are on `meta` (the last device of a device map)."""
    model = tiny_model("llama")
    model.model.layers[-1].to(META)
    model.model.norm.to(META)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device=META)
    return model


def test_devices_of_a_split_model(split_model):
    assert input_device(split_model) == CPU  # input ids go to the embedding
    assert model_devices(split_model) == [CPU, META]  # synchronised and measured: both
    assert model_devices(tiny_model("qwen2")) == [CPU]


def test_indices_go_to_the_tensor_they_select_from(split_model):
    hidden = split_model.model.norm(torch.empty(2, 5, split_model.config.hidden_size, device=META))  # last device
    flat = scored_rows([1, 0], {0: (0, [2, 3]), 1: (1, [4])}, width=5)
    assert flat.tolist() == [9, 2, 3] and flat.device == CPU  # row * width + column, in request order
    idx = on(flat, hidden)
    rows = hidden.reshape(-1, hidden.shape[-1])[idx]
    assert idx.device == META and rows.shape == (3, split_model.config.hidden_size)
    logits = split_model.lm_head(rows)  # lm_head's device: the token indices go there
    toks = on(torch.tensor([1, 2, 3]), logits)
    assert toks.device == logits.device == META and logits[torch.arange(3, device=META), toks].shape == (3,)
    host = torch.arange(3)
    assert on(host, torch.zeros(1)) is host  # already there: no copy


def test_masks_are_made_on_their_modules_device_once():
    lin = torch.nn.Linear(6, 2, device=META, dtype=torch.bfloat16)
    mask = input_mask(lin, [1, 4])
    assert mask.device == META and mask.dtype == torch.bfloat16
    mask = input_mask(torch.nn.Linear(6, 2), [1, 4])
    assert mask.tolist() == [0, 1, 0, 0, 1, 0]
    valid = torch.tensor([[True, False]])
    copies = PerDevice(valid)
    (on_meta,) = copies.on(META)
    assert on_meta.device == META and copies.on(META)[0] is on_meta  # one copy per device and batch
    assert copies.on(CPU)[0].tolist() == [[True, False]]


def test_per_request_results_come_from_one_batch_copy():
    token_lp = torch.tensor([-1.0, -2.5, -0.25, -3.0, -0.5, -0.125])
    greedy = torch.tensor([True, False, True, True, True, True])
    got = per_request(token_lp, greedy, [2, 1, 3])
    assert got == [(-3.5, False), (-0.25, True), (-3.625, True)]
    assert all(isinstance(lp, float) and isinstance(ok, bool) for lp, ok in got)


def test_peak_memory_covers_the_devices_in_use():
    peak = peak_memory_mb([CPU])
    assert set(peak) == {"cpu", "total"} and peak["total"] == peak["cpu"] > 0


def test_default_batch_tokens_by_device_kind():
    assert default_max_batch_tokens("cpu", 8) == 2048  # 256 tokens per batch_size row, as before
    assert default_max_batch_tokens("cuda", 8) > 8 * default_max_batch_tokens("cpu", 8)


def test_loglikelihoods_identical_whatever_the_batch_size(smollm2_dir):
    """Rows batched by 1..many per forward (max_batch_tokens 48 up to everything at once): the same answers,
    bit for bit, on CPU."""
    tok = _tokenizer(smollm2_dir)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=64)
    reqs = _requests(len(tok))
    answers = []
    for max_batch_tokens in (48, 160, 100_000):
        lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64, row_tokens=48,
                             max_batch_tokens=max_batch_tokens)
        inputs = [(c + x)[-65:][:-1] for _, c, x in reqs]  # the model inputs, as the backend builds them
        batches = lm._batches(group_requests(inputs, lm.max_row_tokens))
        answers.append((len(batches), lm._loglikelihood_tokens(reqs, disable_tqdm=True)))
    sizes = [n for n, _ in answers]
    assert sizes[0] > sizes[1] > sizes[2] == 1  # really different batchings
    assert answers[0][1] == answers[1][1] == answers[2][1]


def test_cpu_efficiency_records_eager_decode_only_and_static_generation_runs():
    from hfprune.evaluation.efficiency import _static_decode_seconds, efficiency

    dense = tiny_model("llama")
    eff = efficiency(dense, prefill_tokens=8, decode_batch=2, decode_tokens=3, repeats=1)
    assert eff["settings"]["decode_modes"] == ["eager"] and eff["decode_tok_s"] > 0
    assert not any(k.startswith("decode_static") for k in eff)
    # the CUDA-graph route is transformers' static-cache generate; on CPU it runs uncompiled
    prompt = torch.randint(0, dense.config.vocab_size, (2, 5))
    assert _static_decode_seconds(dense, prompt, 3) > 0


def test_operational_settings_stay_out_of_the_digest():
    from hfprune.grid import digest_value
    from hfprune.validation import validate_config

    base = {"models": [{"name": "m", "source": "smollm2-135m"}], "criteria": ["magnitude"], "ratios": [0.2]}
    a = validate_config(base)
    b = validate_config({**base, "evaluation": {"max_batch_tokens": 64}})
    assert a["evaluation"] != b["evaluation"]
    assert digest_value("evaluation", a["evaluation"]) == digest_value("evaluation", b["evaluation"])
    assert "max_batch_tokens" in a["evaluation"]  # the job's own config keeps it
    c = validate_config({**base, "evaluation": {"limit": 3}})
    assert digest_value("evaluation", a["evaluation"]) != digest_value("evaluation", c["evaluation"])
    assert a["attn_implementation"] == "sdpa" and a["scoring"]["deterministic"] is False


def test_attention_kernel_is_pinned_on_load(tiny_llama_dir):
    from hfprune.models import ModelSpec, load_model

    spec = ModelSpec("tiny", "llama", str(tiny_llama_dir))
    assert load_model(spec)[0].config._attn_implementation == "sdpa"
    assert load_model(spec, attn_implementation="eager")[0].config._attn_implementation == "eager"


def test_deterministic_scoring_sets_torch_and_cublas_before_cuda():
    import subprocess
    import sys

    code = ("import os, torch; from hfprune.runtime import deterministic_algorithms; deterministic_algorithms(); "
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", ":4096:8"]
