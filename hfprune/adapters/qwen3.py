from hfprune.adapters.base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    description = "Qwen3 dense (Qwen3ForCausalLM; per-head RMSNorm on q and k)"

    @classmethod
    def attention_norm_params(cls, config, head_dim: int) -> int:
        return 2 * head_dim  # q_norm and k_norm are shared across heads
