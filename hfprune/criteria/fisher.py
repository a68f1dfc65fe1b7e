"""`fisher`: diagonal second-order baseline, sum over tokens of (h · dCE/dh)^2 (empirical Fisher)."""

from hfprune.criteria.taylor_ce import TaylorCECriterion


class FisherCriterion(TaylorCECriterion):
    """The CE loss of `taylor_ce`, with squared instead of absolute per-token contributions."""

    name = "fisher"

    def token_scores(self, contribution):
        return contribution.square()
