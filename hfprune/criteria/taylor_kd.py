"""`taylor_kd` (SDMPrune): C = (1-a)·CE + a·KL(softmax(teacher/t) || softmax(student)).

As SDMPrune's released code (prune/distill_prune.py): the temperature softens the TEACHER only, the KL is
`F.kl_div(log_softmax(student), softmax(teacher / t), reduction="batchmean") / seq_len` (a mean over positions)
with no t^2 factor. The teacher is the dense model itself; the student is the same weights after a CE
pre-prune (`preprune_keep`), applied as a 0/1 neuron mask. Because only the teacher is softened, the KL
gradient is not zero at the dense point (softmax(z/t) != softmax(z) for t != 1); the pre-prune is there
because SDMPrune does it, not to make the KL term move. Neurons removed by the pre-prune have h = 0 in the
student, so their final score is exactly 0: they rank last, as they stay pruned.

`preprune_keep`: {hidden_multiple: m} keeps int(m * hidden_size) neurons per layer (SDMPrune: m = 3.9, i.e.
7987 of 8192 for LLaMA-3.2-1B; nothing is pre-pruned where that is the whole layer), {ratio: r} removes the
fraction r of all parameters (a uniform plan), null pre-prunes nothing.
"""

from typing import ClassVar

import torch

from hfprune.criteria.base import GradientCriterion, cross_entropy
from hfprune.criteria.taylor_ce import TaylorCECriterion
from hfprune.errors import ConfigError


class TaylorKDCriterion(GradientCriterion):
    name = "taylor_kd"
    needs_teacher = True
    defaults: ClassVar[dict] = {"alpha": 0.4, "temperature": 0.2, "preprune_keep": {"hidden_multiple": 3.9}}

    def __init__(self, **options):
        super().__init__(**options)
        keep = self.options["preprune_keep"]
        if keep is not None and (not isinstance(keep, dict) or len(keep) != 1
                                 or next(iter(keep)) not in ("hidden_multiple", "ratio")):
            raise ConfigError(f"criterion_options.{self.name}.preprune_keep: {keep!r} must be null, "
                              "{hidden_multiple: M} or {ratio: R}")

    def preprune_criterion(self) -> GradientCriterion:
        """The CE criterion whose scores choose the pre-prune (shared with a requested one of the same name)."""
        return TaylorCECriterion()

    def position_loss(self, logits, labels, teacher_logits=None):
        a, t = float(self.options["alpha"]), float(self.options["temperature"])
        logp_s = torch.log_softmax(logits, dim=-1)
        logq = torch.log_softmax(teacher_logits / t, dim=-1)
        kl = (logq.exp() * (logq - logp_s)).sum(-1)
        return (1 - a) * cross_entropy(logits, labels) + a * kl
