"""`llm_pruner` (LLM-Pruner, the method): element-wise first-order Taylor of the MLP weights, one-hot CE.

As LLM-Pruner's released hf_prune.py (main: `--pruner_type taylor`, default `--taylor param_first`,
`--grouping_strategy sum`) and LLMPruner/pruner/hf_llama_pruner.py (TaylorImportance.__call__, `_reduce`): the
calibration examples go through ONE forward/backward of Hugging Face's mean next-token CE; salience =
W * dL/dW per element; a channel's local importance is |salience| summed over its gate_proj / up_proj row
(out channel) or down_proj column (in channel); the group's three are summed. Here dL/dW is the gradient of the
CE averaged over every counted token of the calibration set, accumulated over batches in fp32: one backward
over the whole set as a single batch.
"""

from hfprune.criteria.base import ParameterGradientCriterion
from hfprune.criteria.taylor_ce import TaylorCECriterion


class LLMPrunerCriterion(ParameterGradientCriterion, TaylorCECriterion):
    name = "llm_pruner"
    per_sequence = False

    def neuron_scores(self, parts):
        return sum((w * g).abs().sum(-1) for w, g in parts)
