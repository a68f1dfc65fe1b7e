"""`taylor_kd` (SDMPrune): C = (1-a)·CE + a·KL(softmax(teacher/t) || softmax(student/t)).

The teacher is the dense model itself and the student the same weights with a small CE pre-prune applied as a
0/1 neuron mask (at the dense point the KL gradient is exactly zero, so without a pre-prune KD = scaled CE).
The KL term is NOT multiplied by t^2: we follow the formula in the reference (shared/reference/README.md);
Hinton-style KD scales by t^2, which at t=0.2 would shrink the KL weight 25-fold. Neurons removed by the
pre-prune have h = 0 in the student, so their final score is exactly 0: they rank last, as they stay pruned.
"""

from typing import ClassVar

import torch

from hfprune.criteria.base import GradientCriterion, cross_entropy


class TaylorKDCriterion(GradientCriterion):
    name = "taylor_kd"
    needs_teacher = True
    defaults: ClassVar[dict] = {"alpha": 0.4, "temperature": 0.2, "preprune_ratio": 0.01}

    def position_loss(self, logits, labels, teacher_logits=None):
        a, t = float(self.options["alpha"]), float(self.options["temperature"])
        logp_s = torch.log_softmax(logits / t, dim=-1)
        logp_t = torch.log_softmax(teacher_logits / t, dim=-1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        return (1 - a) * cross_entropy(logits, labels) + a * kl
