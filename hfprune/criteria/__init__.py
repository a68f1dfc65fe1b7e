"""Criteria registry: adding a criterion = one module with a Criterion subclass + one line here.

The names equal the `criteria` enum of hfprune/schemas/config.schema.yaml (a test checks it).
"""

from __future__ import annotations

from hfprune.criteria.activation import ActivationNormCriterion
from hfprune.criteria.base import (
    ActivationCriterion,
    Criterion,
    GradientCriterion,
    ParameterGradientCriterion,
    WeightCriterion,
)
from hfprune.criteria.fisher import FisherCriterion
from hfprune.criteria.llm_pruner import LLMPrunerCriterion
from hfprune.criteria.magnitude import MagnitudeCriterion
from hfprune.criteria.random import RandomCriterion
from hfprune.criteria.sdmprune import SDMPruneCriterion
from hfprune.criteria.taylor_ce import TaylorCECriterion
from hfprune.criteria.taylor_entropy import TaylorEntropyCriterion
from hfprune.criteria.taylor_entropy_topk import TaylorEntropyTopKCriterion
from hfprune.criteria.taylor_kd import TaylorKDCriterion
from hfprune.errors import ConfigError

CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (
    RandomCriterion, MagnitudeCriterion, ActivationNormCriterion, TaylorCECriterion, TaylorEntropyCriterion,
    TaylorEntropyTopKCriterion, TaylorKDCriterion, FisherCriterion, SDMPruneCriterion, LLMPrunerCriterion)}

__all__ = ["CRITERIA", "ActivationCriterion", "Criterion", "GradientCriterion", "ParameterGradientCriterion",
           "WeightCriterion", "get_criterion"]


def get_criterion(name: str, options: dict | None = None) -> Criterion:
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name](**(options or {}))
