"""`taylor_entropy` (HFPrune): C = entropy of the model's own output distribution; no labels, no teacher."""

from hfprune.criteria.base import GradientCriterion, entropy, entropy_gradient_


class TaylorEntropyCriterion(GradientCriterion):
    name = "taylor_entropy"
    uses_labels = False  # every position counts, the last included (released HFPrune code)

    def position_loss(self, logits, labels, teacher_logits=None):
        return entropy(logits)

    def logit_gradient_(self, logits, labels):
        return entropy_gradient_(logits)
