"""`magnitude`: data-free; L2 norm of a neuron's gate row, up row and down column together."""

from hfprune.criteria.base import Criterion


class MagnitudeCriterion(Criterion):
    name = "magnitude"
    requires_data = False
