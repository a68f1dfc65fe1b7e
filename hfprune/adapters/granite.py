from hfprune.adapters.base import ModelAdapter


class GraniteAdapter(ModelAdapter):
    family = "granite"
    model_types = ("granite",)
    description = "Granite 3.x dense (GraniteForCausalLM; embedding/residual/attention multipliers, scaled logits)"

    def logits_transform(self):
        scale = getattr(self.config, "logits_scaling", 1.0)
        return None if scale == 1 else lambda z: z / scale
