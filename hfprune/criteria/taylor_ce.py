"""`taylor_ce` (LLM-Pruner): first-order Taylor importance with one-hot next-token cross-entropy."""

from hfprune.criteria.base import GradientCriterion, cross_entropy


class TaylorCECriterion(GradientCriterion):
    name = "taylor_ce"

    def position_loss(self, logits, labels, teacher_logits=None):
        return cross_entropy(logits, labels)
