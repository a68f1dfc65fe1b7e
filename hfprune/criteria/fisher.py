"""`fisher`: diagonal second-order baseline, sum over tokens of (h · dCE/dh)^2 (empirical Fisher)."""

from hfprune.criteria.base import GradientCriterion, cross_entropy


class FisherCriterion(GradientCriterion):
    name = "fisher"

    def position_loss(self, logits, labels, teacher_logits=None):
        return cross_entropy(logits, labels)

    def token_scores(self, contribution):
        return contribution.square()
