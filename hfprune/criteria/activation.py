"""`activation`: gradient-free; mean |h_i| over calibration tokens times the L2 norm of down column i (for a
KV group: the same per o_proj input feature, summed over the group)."""

import torch

from hfprune.criteria.base import ActivationCriterion, group_sum


class ActivationNormCriterion(ActivationCriterion):
    name = "activation"

    @torch.no_grad()
    def activation_scores(self, adapter, mean_abs, attn):
        out = {}
        for i in range(adapter.num_layers):
            out[f"mlp.{i}"] = (mean_abs[f"mlp.{i}"] * adapter.mlp(i).down.weight.float().norm(dim=0)).cpu()
            if attn:
                a = adapter.attention(i)
                per_feature = mean_abs[f"attn_kv.{i}"] * a.o.weight.float().norm(dim=0)
                out[f"attn_kv.{i}"] = group_sum(per_feature, a.num_kv_heads).cpu()
        return out
