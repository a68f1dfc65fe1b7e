from hfprune.adapters.base import AttentionParts, MLPParts, ModelAdapter


class Phi3Adapter(ModelAdapter):
    family = "phi3"
    model_types = ("phi3",)
    description = "Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM; fused gate_up_proj and qkv_proj)"
    no_kv_pruning = "its fused qkv_proj is split by the config's head count, shared by every layer"

    def mlp(self, layer: int) -> MLPParts:
        m = self.layers()[layer].mlp
        return MLPParts(gate=None, up=m.gate_up_proj, down=m.down_proj)

    def attention(self, layer: int) -> AttentionParts:
        """Head counts and o_proj; q/k/v are None: they are one fused Linear, and KV pruning is refused."""
        a = self.layers()[layer].self_attn
        kv_out = a.num_key_value_heads * a.head_dim
        q_out = a.qkv_proj.out_features - 2 * kv_out
        return AttentionParts(module=a, q=None, k=None, v=None, o=a.o_proj,
                              num_heads=q_out // a.head_dim, num_kv_heads=a.num_key_value_heads,
                              head_dim=a.head_dim)
