"""`taylor_ce` (LLM-Pruner): first-order Taylor importance with one-hot next-token cross-entropy."""

from hfprune.criteria.base import GradientCriterion, cross_entropy, cross_entropy_gradient_


class TaylorCECriterion(GradientCriterion):
    name = "taylor_ce"

    def position_loss(self, logits, labels, teacher_logits=None):
        return cross_entropy(logits, labels)

    def logit_gradient_(self, logits, labels):
        return cross_entropy_gradient_(logits, labels)
