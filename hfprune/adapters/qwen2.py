from hfprune.adapters.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
    description = "Qwen2 / Qwen2.5 (Qwen2ForCausalLM; q/k/v projections carry biases)"

    @classmethod
    def attention_bias_params(cls, config, q_out: int, kv_out: int) -> int:
        return q_out + 2 * kv_out  # biases on q, k, v but not o
