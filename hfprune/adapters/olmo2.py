from hfprune.adapters.base import ModelAdapter


class Olmo2Adapter(ModelAdapter):
    family = "olmo2"
    model_types = ("olmo2",)
    description = "OLMo 2 (Olmo2ForCausalLM; norms after attention/MLP, q/k RMSNorm over all heads)"
    no_kv_pruning = "its q_norm/k_norm normalise over all heads together, so removing heads changes the others"

    @classmethod
    def attention_norm_params(cls, config, head_dim: int) -> int:
        return (config.num_attention_heads + config.num_key_value_heads) * head_dim
