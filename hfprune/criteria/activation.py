"""`activation`: gradient-free; mean |h_i| over calibration tokens times the L2 norm of down column i."""

from hfprune.criteria.base import Criterion


class ActivationCriterion(Criterion):
    name = "activation"
