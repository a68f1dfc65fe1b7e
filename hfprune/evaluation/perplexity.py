"""Perplexity on held-out text: non-overlapping windows of a fixed length (stride = seq_len).

ppl = exp(total NLL / total predicted tokens); every window predicts its tokens 2..seq_len, so a window of
``seq_len`` tokens contributes ``seq_len - 1`` predictions. Log-probabilities are taken in fp32.
"""

from __future__ import annotations

import math

import torch

from hfprune.data import text_source, texts_hash
from hfprune.placement import input_device
from hfprune.windows import eval_chunks


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) of each row of `input_ids` [batch, seq_len] -> [batch]."""
    ids = input_ids.to(input_device(model))
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)  # logits: on lm_head's device
    return nll.sum(dim=1).cpu()


def perplexity(model, chunks: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity of `model` over the rows of `chunks` [n, seq_len] (each row scored independently);
    "window_nll" holds each window's summed NLL (the per-unit records of the paired statistics)."""
    per_window = torch.cat([window_nll(model, chunks[start:start + batch_size]).double()
                            for start in range(0, chunks.shape[0], batch_size)])
    total = per_window.sum().item()
    tokens = chunks.shape[0] * (chunks.shape[1] - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens,
            "windows": chunks.shape[0], "seq_len": chunks.shape[1], "window_nll": per_window.tolist()}


def source_perplexity(model, tokenizer, source, seq_len: int, max_tokens: int | None, batch_size: int = 8,
                      protocol: str = "stream") -> dict:
    """Perplexity on a text source (a name, mapping or hfprune.data.TextSource) under a windowing protocol
    (hfprune.windows.eval_chunks: ``stream``, ours; ``wanda``, the published tables'); "window_doc" is the document
    each window starts in. The protocol and the hash of the texts read are recorded with the numbers."""
    source = text_source(source)
    chunks, docs, texts = eval_chunks(tokenizer, source, seq_len, max_tokens, protocol)
    out = perplexity(model, chunks, batch_size)
    out.update(protocol=protocol, texts_sha256=texts_hash(texts), window_doc=docs)
    return out
