"""`random`: seeded uniform scores, the floor every criterion must beat."""

from hfprune.criteria.base import Criterion


class RandomCriterion(Criterion):
    name = "random"
    requires_data = False
