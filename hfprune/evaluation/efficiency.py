"""Size and speed of a pruned model relative to the dense one, measured in one process.

- params: all parameters (tied embeddings counted once); params_non_embedding: without the input embedding
  and an untied lm_head.
- macs_per_token: analytic, from the shapes: every nn.Linear (lm_head included) plus the attention score and
  value products of one token attending to `context` tokens (2 * num_heads * head_dim * context per layer).
- prefill_ms: latency of one forward pass over `prefill_tokens` tokens that yields the first new token
  (batch 1, KV cache on, logits of the last position only, as `generate` does), median of `repeats`.
- decode_tok_s: greedy decoding throughput, batch `decode_batch`, `decode_tokens` steps with the KV cache
  after a 16-token prompt (the prompt is not timed), median of `repeats`.
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
from hfprune.evaluation.perplexity import input_device

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    device = input_device(model)
    ids = ids.to(device)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    device = input_device(model)
    out = model(input_ids=prompt.to(device), use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - start


def measure(models: dict[str, nn.Module], prefill_tokens: int = 256, decode_batch: int = 8,
            decode_tokens: int = 16, repeats: int = 3, seed: int = 0) -> dict[str, dict]:
    """Size and speed of each model; timings interleaved across models. Returns {name: metrics}."""
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    prefill_ids = torch.randint(0, vocab, (1, prefill_tokens), generator=gen)
    prompt = torch.randint(0, vocab, (decode_batch, DECODE_PROMPT_TOKENS), generator=gen)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for name, model in models.items():
            p, d = _prefill_seconds(model, prefill_ids), _decode_seconds(model, prompt, decode_tokens)
            if rep:
                prefill[name].append(p)
                decode[name].append(d)
    out = {}
    for name, model in models.items():
        decode_rates = [decode_batch * decode_tokens / s for s in decode[name]]
        out[name] = {**param_counts(model), "macs_per_token": macs_per_token(model, prefill_tokens),
                     "prefill_ms": 1000 * statistics.median(prefill[name]),
                     "decode_tok_s": decode_batch * decode_tokens / statistics.median(decode[name]),
                     "prefill_ms_runs": [1000 * s for s in prefill[name]], "decode_tok_s_runs": decode_rates}
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
    out.update({f"{k}_ratio": own[k] / ref[k] for k in ref if not k.endswith("_runs")})
    for key in ("prefill_ms", "decode_tok_s"):
        per_round = [a / b for a, b in zip(own[f"{key}_runs"], ref[f"{key}_runs"], strict=True)]
        out[f"{key}_ratio_range"] = [min(per_round), max(per_round)]
    out.update(dense=ref, settings={**options, "macs_context": prefill_tokens,
                                    "decode_prompt_tokens": DECODE_PROMPT_TOKENS})
    return out
