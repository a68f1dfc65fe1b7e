"""Size and speed of a pruned model relative to the dense one, measured in one process.

- params: all parameters (tied embeddings counted once); params_non_embedding: without the input embedding
  and an untied lm_head.
- macs_per_token: analytic, from the shapes: every nn.Linear (lm_head included) plus the attention score and
  value products of one token attending to `context` tokens (2 * num_heads * head_dim * context per layer).
- prefill_ms: latency of one forward pass over `prefill_tokens` tokens that yields the first new token
  (batch 1, KV cache on, logits of the last position only, as `generate` does), median of `repeats`.
- decode_tok_s: greedy decoding throughput, batch `decode_batch`, `decode_tokens` steps with the KV cache
  after a 16-token prompt (the prompt is not timed), median of `repeats`: eager PyTorch, one Python step per
  token. On a GPU eager decode at a small batch is bound by kernel launches, so pruned MLPs show ~1.0x there;
- decode_static_tok_s (CUDA only): the same decode through transformers' static-cache generation, which compiles
  the step with torch.compile(mode="reduce-overhead") (CUDA graphs): the figure reflects the model, not Python.
  Timed as generate(decode_tokens + 1 new tokens) minus generate(1) (the prefill); the compile falls in the
  warm-up round. `settings.decode_modes` says which ran ("eager" alone on CPU).
Synchronisation covers every device of a model (a device map's GPUs).
Models are timed alternately (dense, pruned, dense, ...) after one warm-up each, so drifting machine load
hits both alike. Every "*_ratio" is pruned / dense (of the medians); "*_runs" keep every repeat and
"*_ratio_range" the [min, max] of the per-repeat ratios (dense and pruned of one round timed back to back),
so a report shows the spread, not one draw.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from hfprune.adapters import get_adapter
from hfprune.placement import input_device, model_devices, synchronize

DECODE_PROMPT_TOKENS = 16


def param_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied_head = head.weight.numel() if head is not None and head.weight is not embed else 0
    return {"params": total, "params_non_embedding": total - embed.numel() - untied_head}


def macs_per_token(model, context: int) -> int:
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    adapter = get_adapter(model)
    attn = sum(2 * a.num_heads * a.head_dim * context
               for a in (adapter.attention(i) for i in range(adapter.num_layers)))
    return linear + attn


DECODE_MODES = {"eager": "eager", "static": "static cache + CUDA graphs"}


def decode_modes(devices) -> list[str]:
    """The decode measurements a model on `devices` gets: eager always; static-cache CUDA graphs on CUDA."""
    return ["eager", "static"] if any(d.type == "cuda" for d in devices) else ["eager"]


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    devices = model_devices(model)
    ids = ids.to(input_device(model))
    synchronize(devices)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
    synchronize(devices)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    devices = model_devices(model)
    out = model(input_ids=prompt.to(input_device(model)), use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(devices)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(devices)
    return time.perf_counter() - start


@torch.no_grad()
def _generate_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Wall time of transformers' greedy static-cache generation of exactly `new_tokens` tokens (compiled with
    CUDA graphs on CUDA; the model keeps its static cache between calls)."""
    devices = model_devices(model)
    ids = prompt.to(input_device(model))
    synchronize(devices)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, cache_implementation="static", pad_token_id=0)
    synchronize(devices)
    return time.perf_counter() - start


def _static_decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    return max(_generate_seconds(model, prompt, steps + 1) - _generate_seconds(model, prompt, 1), 1e-9)


def measure(models: dict[str, nn.Module], prefill_tokens: int = 256, decode_batch: int = 8,
            decode_tokens: int = 16, repeats: int = 3, seed: int = 0) -> dict[str, dict]:
    """Size and speed of each model; timings interleaved across models. Returns {name: metrics}."""
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    prefill_ids = torch.randint(0, vocab, (1, prefill_tokens), generator=gen)
    prompt = torch.randint(0, vocab, (decode_batch, DECODE_PROMPT_TOKENS), generator=gen)
    static = {name: "static" in decode_modes(model_devices(m)) for name, m in models.items()}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    decode_static: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):  # round 0 is the warm-up (and, on CUDA, the compile)
        for name, model in models.items():
            p, d = _prefill_seconds(model, prefill_ids), _decode_seconds(model, prompt, decode_tokens)
            s = _static_decode_seconds(model, prompt, decode_tokens) if static[name] else None
            if rep:
                prefill[name].append(p)
                decode[name].append(d)
                if s is not None:
                    decode_static[name].append(s)
    out = {}
    for name, model in models.items():
        out[name] = {**param_counts(model), "macs_per_token": macs_per_token(model, prefill_tokens),
                     "prefill_ms": 1000 * statistics.median(prefill[name]),
                     "prefill_ms_runs": [1000 * s for s in prefill[name]]}
        for key, runs in (("decode_tok_s", decode[name]), ("decode_static_tok_s", decode_static[name])):
            if runs:
                out[name][key] = decode_batch * decode_tokens / statistics.median(runs)
                out[name][f"{key}_runs"] = [decode_batch * decode_tokens / s for s in runs]
    return out


def efficiency(dense, pruned=None, *, prefill_tokens: int = 256, decode_batch: int = 8, decode_tokens: int = 16,
               repeats: int = 3, seed: int = 0) -> dict:
    """Metrics of `pruned` (or of `dense` alone for the dense row) with "*_ratio" = pruned / dense."""
    models = {"dense": dense} if pruned is None else {"dense": dense, "pruned": pruned}
    options = {"prefill_tokens": prefill_tokens, "decode_batch": decode_batch, "decode_tokens": decode_tokens,
               "repeats": repeats, "seed": seed}
    res = measure(models, **options)
    ref, own = res["dense"], res.get("pruned", res["dense"])
    out = dict(own)
    out.update({f"{k}_ratio": own[k] / ref[k] for k in ref if not k.endswith("_runs") and k in own})
    for key in ("prefill_ms", "decode_tok_s", "decode_static_tok_s"):
        if f"{key}_runs" not in own or f"{key}_runs" not in ref:
            continue
        per_round = [a / b for a, b in zip(own[f"{key}_runs"], ref[f"{key}_runs"], strict=True)]
        out[f"{key}_ratio_range"] = [min(per_round), max(per_round)]
    modes = ["eager"] + (["static"] if "decode_static_tok_s" in own else [])
    out.update(dense=ref, settings={**options, "macs_context": prefill_tokens,
                                    "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                                    "decode_modes": [DECODE_MODES[m] for m in modes]})
    return out
