"""`magnitude`: data-free; L2 norm of a neuron's gate row, up row and down column together (for a KV group:
its q rows, k/v rows and o columns)."""

import torch

from hfprune.criteria.base import WeightCriterion, group_sum


def _rows2(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.float().square().sum(dim)


class MagnitudeCriterion(WeightCriterion):
    name = "magnitude"

    @torch.no_grad()
    def weight_scores(self, adapter, seed, attn):
        out = {}
        for i in range(adapter.num_layers):
            m = adapter.mlp(i)
            out[f"mlp.{i}"] = (sum(_rows2(w, 1) for w in m.row_weights()) + _rows2(m.down.weight, 0)).sqrt().cpu()
            if attn:
                a = adapter.attention(i)
                norm2 = sum(group_sum(_rows2(w, dim), a.num_kv_heads)
                            for w, dim in ((a.q.weight, 1), (a.k.weight, 1), (a.v.weight, 1), (a.o.weight, 0)))
                out[f"attn_kv.{i}"] = norm2.sqrt().cpu()
        return out
