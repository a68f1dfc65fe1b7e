"""Faithful re-implementation of the official HFPrune scoring loop (LLM-Pruner lineage), for benchmarks only.

What the official code does, kept here on purpose: the MLP weights require grad (so autograd computes and
stores their gradients, which are never used), a forward hook on every down_proj keeps its input and a full
backward hook its input gradient, the loss is computed from full-vocabulary logits of the whole sequence,
and the score accumulates in the model's dtype. The loss is the same entropy (mean over positions that have
a next token) as hfprune's `taylor_entropy`, so both must keep the same neurons.
"""

from __future__ import annotations

import torch

from hfprune.criteria.base import entropy


def official_entropy_scores(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = model.model.layers
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    acts: dict[int, torch.Tensor] = {}
    scores = {i: torch.zeros(layer.mlp.down_proj.in_features, dtype=model.dtype) for i, layer in enumerate(layers)}
    handles = []
    for i, layer in enumerate(layers):
        def fwd(module, inputs, output, i=i):
            acts[i] = inputs[0].detach()

        def bwd(module, grad_input, grad_output, i=i):
            scores[i] += (acts[i] * grad_input[0])[:, :-1].abs().sum((0, 1))

        handles.append(layer.mlp.down_proj.register_forward_hook(fwd))
        handles.append(layer.mlp.down_proj.register_full_backward_hook(bwd))
    for ids in batches:
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits.float()
        loss = entropy(logits[:, :-1]).mean()
        loss.backward()
    for h in handles:
        h.remove()
    return {f"mlp.{i}": s.float() for i, s in scores.items()}


def floor_pass(model, batches: list[torch.Tensor]) -> None:
    """The least any activation-gradient scorer must do: a forward and a backward to the input embeddings."""
    for p in model.parameters():
        p.requires_grad_(False)
    for ids in batches:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits.float()
        torch.autograd.grad(entropy(logits[:, :-1]).mean(), embeds)
