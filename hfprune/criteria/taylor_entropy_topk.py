"""`taylor_entropy_topk`: entropy of the output distribution renormalised over its top-K tokens."""

from typing import ClassVar

from hfprune.criteria.base import GradientCriterion, entropy


class TaylorEntropyTopKCriterion(GradientCriterion):
    name = "taylor_entropy_topk"
    defaults: ClassVar[dict] = {"k": 64}
    uses_labels = False

    def position_loss(self, logits, labels, teacher_logits=None):
        k = min(int(self.options["k"]), logits.shape[-1])
        return entropy(logits.topk(k, dim=-1).values)
