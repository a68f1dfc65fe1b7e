from hfprune.adapters.base import ModelAdapter


class Gemma2Adapter(ModelAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    description = "Gemma 2 (Gemma2ForCausalLM; pre/post feed-forward norms, final logit softcapping)"

    def logits_transform(self):
        cap = getattr(self.config, "final_logit_softcapping", None)
        return None if cap is None else lambda z: (z / cap).tanh() * cap

    @classmethod
    def layer_norm_params(cls, config) -> int:
        return 4 * config.hidden_size  # input, post-attention, pre- and post-feedforward RMSNorms
