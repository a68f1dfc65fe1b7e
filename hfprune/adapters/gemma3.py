from hfprune.adapters.gemma2 import Gemma2Adapter


class Gemma3Adapter(Gemma2Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    description = "Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text; Gemma 2 layout + per-head q/k RMSNorm)"

    @classmethod
    def attention_norm_params(cls, config, head_dim: int) -> int:
        return 2 * head_dim  # q_norm and k_norm are shared across heads
