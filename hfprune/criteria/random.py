"""`random`: seeded uniform scores, the floor every criterion must beat."""

import torch

from hfprune.criteria.base import WeightCriterion


class RandomCriterion(WeightCriterion):
    name = "random"
    seeded = True  # a fresh draw per calibration seed

    def weight_scores(self, adapter, seed, attn):
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for i in range(adapter.num_layers):
            out[f"mlp.{i}"] = torch.rand(adapter.mlp(i).down.in_features, generator=gen)
            if attn:
                out[f"attn_kv.{i}"] = torch.rand(adapter.attention(i).num_kv_heads, generator=gen)
        return out
