from hfprune.adapters.base import ModelAdapter


class GemmaAdapter(ModelAdapter):
    family = "gemma"
    model_types = ("gemma",)
    description = "Gemma (GemmaForCausalLM; GeGLU MLP, scaled embeddings, tied lm_head)"
