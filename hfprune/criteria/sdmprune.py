"""`sdmprune` (SDMPrune, the method): `taylor_kd`'s loss, options and CE pre-prune, scored from the MLP WEIGHTS.

As SDMPrune's released prune/distill_prune.py (get_importance_taylor, get_importance_kl, prune): per calibration
sequence (batch 1) T[i, d] = W*dC/dW of gate_proj[i, d] + up_proj[i, d] + down_proj[d, i] (added before the
absolute value), `importance += |T|` element-wise, and at prune time the mean over the hidden dim d. A sum over
sequences and a mean over d commute, so each sequence adds mean_d |T[i, d]|. The released code multiplies by 100
before the absolute value against bf16 underflow; a constant factor changes no ranking and our sums are fp32.
The pre-prune (stage 1, get_importance_taylor) is the same weight score with plain CE on the dense model, not
taylor_ce's activation score. Neurons the pre-prune removed get exactly 0 (their h is 0 in the student).
"""

from hfprune.criteria.base import ParameterGradientCriterion
from hfprune.criteria.taylor_ce import TaylorCECriterion
from hfprune.criteria.taylor_kd import TaylorKDCriterion


class _SDMPruneScore(ParameterGradientCriterion):
    per_sequence = True

    def neuron_scores(self, parts):
        return sum(w * g for w, g in parts).abs().mean(-1)


class SDMPruneCECriterion(_SDMPruneScore, TaylorCECriterion):
    """Stage 1, the pre-prune's scores: one-hot CE (not registered: only `sdmprune` runs it)."""

    name = "sdmprune_ce"


class SDMPruneCriterion(_SDMPruneScore, TaylorKDCriterion):
    name = "sdmprune"

    def preprune_criterion(self):
        return SDMPruneCECriterion()
