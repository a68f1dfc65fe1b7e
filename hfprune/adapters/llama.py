from hfprune.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama",)
    description = "LLaMA 2/3/3.x and SmolLM (LlamaForCausalLM)"
