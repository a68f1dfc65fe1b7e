from hfprune.adapters.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    family = "mistral"
    model_types = ("mistral",)
    description = "Mistral dense (MistralForCausalLM)"
