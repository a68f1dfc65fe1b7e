"""Output fidelity of a (pruned) model to the dense model, as in the paper's Table 7.

At every position of every held-out prompt both models give a next-token distribution (teacher forcing on
the same tokens). Per position we compute

- the Jensen-Shannon distance sqrt(JS(p, q)) with log base 2, so it lies in [0, 1] (0 = identical). The
  paper does not state its base; its values (0.24-0.36 at ratios 0.2-0.3) fit either. With natural logs
  multiply by sqrt(ln 2) = 0.8326;
- the Jaccard similarity |A ∩ B| / |A ∪ B| of the two top-k token sets (1 = same set);
- KL(dense || pruned) in nats;
- top-1 agreement: 1 where the two argmax tokens are the same, else 0 (LLMC's token agreement);

and report their means over all positions. p = dense, q = model. Everything is computed in fp32 and in
probability space where it matters, so a model compared with itself gives exactly 0 / 1 / 0.
"""

from __future__ import annotations

import math

import torch

from hfprune.data import load_texts, text_source, texts_hash
from hfprune.errors import HFPruneError
from hfprune.placement import input_device
from hfprune.windows import sample_windows


def position_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per-position JS distance (base 2), top-k Jaccard, KL(ref || model) and top-1 agreement for logits
    [..., vocab]."""
    ref_logits, logits = ref_logits.float(), logits.float().to(ref_logits.device)
    p, q = torch.softmax(ref_logits, -1), torch.softmax(logits, -1)
    m = 0.5 * (p + q)
    # xlogy(p, p) - xlogy(p, m) is exactly 0 where p == m, and 0 where p underflows to 0
    js = 0.5 * ((torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1))
    js_distance = (js.clamp_min(0) / math.log(2)).sqrt()
    logp, logq = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    kl = (p * (logp - logq)).sum(-1).clamp_min(0)
    a, b = ref_logits.topk(top_k, dim=-1).indices, logits.topk(top_k, dim=-1).indices
    inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1).float()
    jaccard = inter / (2 * top_k - inter)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).float()
    return {"js_distance": js_distance, "topk_jaccard": jaccard, "kl": kl, "top1_agreement": top1}


@torch.no_grad()
def fidelity(reference, model, input_ids: torch.Tensor, top_k: int = 15, batch_size: int = 4) -> dict:
    """Mean fidelity metrics of `model` against `reference` over all positions of `input_ids` [n, seq_len];
    "per_prompt" holds each metric's mean over each prompt's positions (the per-unit records).

    The two models run batch by batch, so only one batch of logits of each is held at a time.
    """
    per_prompt: dict[str, list[torch.Tensor]] = {}
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start:start + batch_size]
        ref = reference(input_ids=batch.to(input_device(reference)), use_cache=False).logits
        out = model(input_ids=batch.to(input_device(model)), use_cache=False).logits
        for key, values in position_metrics(ref, out, top_k).items():
            per_prompt.setdefault(key, []).append(values.double().mean(-1).cpu())
    prompts = {k: torch.cat(v) for k, v in per_prompt.items()}
    # every prompt has seq_len positions, so the mean of prompt means is the mean over all positions
    return {**{k: v.mean().item() for k, v in prompts.items()}, "k": top_k, "prompts": input_ids.shape[0],
            "seq_len": input_ids.shape[1], "positions": input_ids.numel(), "js_log_base": 2,
            "per_prompt": {k: v.tolist() for k, v in prompts.items()}}


def source_fidelity(reference, model, tokenizer, source, num_prompts: int, seq_len: int, top_k: int,
                    seed: int) -> dict:
    """Fidelity on `num_prompts` seeded random windows of a held-out text source (a name, mapping or
    hfprune.data.TextSource)."""
    source = text_source(source)
    texts = load_texts(source)
    try:
        windows, docs = sample_windows(tokenizer, texts, num_prompts, seq_len, seed, return_docs=True)
    except HFPruneError as exc:
        raise HFPruneError(f"evaluation.fidelity.source {source.label!r}: {exc}") from None
    out = fidelity(reference, model, windows, top_k)
    out.update(source=source.label, seed=seed, texts_sha256=texts_hash(texts), prompt_doc=docs)
    return out
