"""The parameter-gradient (weight-level) path of the scorer: `ParameterGradientCriterion` (`sdmprune`,
`llm_pruner`), see hfprune/scorer.py's docstring."""

from __future__ import annotations

import contextlib

import torch

from hfprune.criteria import ParameterGradientCriterion
from hfprune.scorer_core import (
    _as_batch,
    _check_finite,
    _decoder_forward,
    _output_gradients,
    _progress,
    counted_positions,
    next_token_labels,
)


def _mlp_weights(adapter, i: int) -> list[torch.nn.Parameter]:
    mlp = adapter.mlp(i)
    return [m.weight for m in (mlp.gate, mlp.up, mlp.down) if m is not None]


def _neuron_parts(adapter, i: int, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp32 (W, dC/dW) of layer i's gate rows, up rows and down columns (transposed), [intermediate, hidden] each;
    `grads` in the order of `_mlp_weights` (a fused gate_up weight splits in two)."""
    weights = _mlp_weights(adapter, i)
    pairs = [(w.detach().float(), g.float()) for w, g in zip(weights[:-1], grads[:-1])]
    if adapter.mlp(i).gate is None:
        [(w, g)] = pairs
        pairs = list(zip(w.chunk(2, 0), g.chunk(2, 0)))
    return pairs + [(weights[-1].detach().float().t(), grads[-1].float().t())]


def _parameter_scores(model, adapter, batches, crit: ParameterGradientCriterion, chunk: int | None,
                      progress: bool, mask_plan: dict | None = None) -> tuple[dict, int]:
    """Scores of a weight-level criterion: dC/dH by chunks of logits, then autograd to the MLP weights."""
    from hfprune.surgery import neuron_mask

    units = [_as_batch(b) for b in batches]
    if crit.per_sequence:
        units = [(ids[j:j + 1], mask[j:j + 1]) for ids, mask in units for j in range(len(ids))]
    valids = [counted_positions(mask, labelled=crit.uses_labels) for _, mask in units]
    units = [{"input_ids": ids, "attention_mask": mask} for ids, mask in units]
    total = max(sum(int(v.sum()) for v in valids), 1)
    params = [w for i in range(adapter.num_layers) for w in _mlp_weights(adapter, i)]
    sizes = [len(_mlp_weights(adapter, i)) for i in range(adapter.num_layers)]
    scores: dict[str, torch.Tensor] = {}
    acc = None if crit.per_sequence else [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def add_scores(grads, where: str):
        start = 0
        for i, n in enumerate(sizes):
            s = crit.neuron_scores(_neuron_parts(adapter, i, grads[start:start + n]))
            start += n
            scores[f"mlp.{i}"] = s if f"mlp.{i}" not in scores else scores[f"mlp.{i}"] + s
        _check_finite(scores, f"criterion {crit.name!r}", where)

    for p in params:
        p.requires_grad_(True)
    try:
        for u, ((ids, mask), valid) in enumerate(zip(_progress(units, progress, crit.name), valids)):
            labels = next_token_labels(ids, counted_positions(mask))
            teacher_H = _decoder_forward(model, adapter, ids, mask, grad=False) if crit.needs_teacher else None
            # the mask stays on through the backward: gradient checkpointing recomputes the masked forward
            with neuron_mask(model, mask_plan) if mask_plan else contextlib.nullcontext():
                H = _decoder_forward(model, adapter, ids, mask, grad=True)
                (g,) = _output_gradients(model, H, [crit], labels, [valid], teacher_H, chunk,
                                         adapter.logits_transform())
                if acc is not None:  # C averaged over every counted token of the set, not of this batch
                    g.mul_(int(valid.sum()) / total)
                grads = torch.autograd.grad(H, params, grad_outputs=g)
            del H, g
            if acc is None:
                add_scores(grads, f"at sequence {u}")
            else:
                for a, gr in zip(acc, grads):
                    a.add_(gr.float())
            del grads
        if acc is not None:
            add_scores(acc, "")
    finally:
        for p in params:
            p.requires_grad_(False)
    return {k: v.cpu() for k, v in scores.items()}, total

