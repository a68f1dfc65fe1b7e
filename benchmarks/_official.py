"""The released HFPrune scoring loop (visresearch/HFPrune, prune.py `get_importance_taylor`), for benchmarks only.

Line for line what the released code does once the windows are built: every parameter frozen except the MLP
projections (so autograd computes and stores their weight gradients, which are never used), a forward hook on
every down_proj keeps its input and a full backward hook its input gradient, the entropy is computed from
full-vocabulary fp32 logits of the whole sequence and averaged over EVERY position (the last included), and
|h * g| summed over every position accumulates into a bfloat16 tensor per layer (`accumulate_dtype`). The
benchmark also runs it with an fp32 accumulator, and exactly: a float64 model, float64 logits (where the
released code upcasts to fp32) and a float64 accumulator, the reference whose kept sets hfprune must match.
The released code runs batch size 1 on a bf16 model with flash attention; here the batches and the model
dtype are the benchmark's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_entropy_scores(model, batches: list[torch.Tensor],
                            accumulate_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.requires_grad = False
    for idx in range(len(model.model.layers)):
        for p in model.model.layers[idx].mlp.down_proj.parameters():
            p.requires_grad = True
        for p in model.model.layers[idx].mlp.up_proj.parameters():
            p.requires_grad = True
        for p in model.model.layers[idx].mlp.gate_proj.parameters():
            p.requires_grad = True
    activations = {}
    gradients = {}

    def get_activation_hook(name):
        def hook(model, input, output):
            activations[name] = input[0].detach()
        return hook

    def get_gradient_hook(name):
        def hook(model, grad_input, grad_output):
            gradients[name] = grad_input[0].detach()
        return hook

    handles = []
    for idx, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_hook(get_activation_hook(idx)))
        handles.append(layer.mlp.down_proj.register_full_backward_hook(get_gradient_hook(idx)))

    importance = [torch.zeros(layer.mlp.down_proj.in_features, dtype=accumulate_dtype)
                  for layer in model.model.layers]
    upcast = torch.float64 if accumulate_dtype == torch.float64 else torch.float32
    for input_ids in batches:
        model.zero_grad()
        outputs = model(input_ids=input_ids)
        logits = outputs.logits
        probs = F.softmax(logits.to(upcast), dim=-1)
        log_probs = F.log_softmax(logits.to(upcast), dim=-1)
        entropy_loss = -torch.sum(probs * log_probs, dim=-1).mean()
        entropy_loss.requires_grad_(True)
        entropy_loss.backward()
        for idx in range(len(model.model.layers)):
            if idx in activations and idx in gradients:
                act = activations[idx]
                grad = gradients[idx]
                down_proj_importance = torch.abs(act * grad).sum(dim=(0, 1))
                importance[idx] += down_proj_importance.to(importance[idx].device, importance[idx].dtype)
        activations.clear()
        gradients.clear()
    for h in handles:
        h.remove()
    return {f"mlp.{i}": s.to(upcast) for i, s in enumerate(importance)}


def floor_pass(model, batches: list[torch.Tensor]) -> None:
    """The least any activation-gradient scorer must do: a forward and a backward to the input embeddings."""
    from hfprune.criteria.base import entropy

    for p in model.parameters():
        p.requires_grad_(False)
    for ids in batches:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits.float()
        torch.autograd.grad(entropy(logits).mean(), embeds)
