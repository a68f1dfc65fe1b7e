"""What a pruning method touches in a decoder-only model, per family (SliceGPT-style adapters).

An adapter exposes, per decoder layer, the MLP projections (gate, up, down) and the attention projections
with head counts, plus the parameter arithmetic that maps a pruning ratio to neuron counts. The families
we support share the LLaMA layout (``model.model.layers[i].mlp.{gate,up,down}_proj``,
``self_attn.{q,k,v,o}_proj``); a family that differs overrides the accessors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfprune.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are touched: planning and validation read configs only
    import torch
    from torch import nn


@dataclass(frozen=True)
class MLPParts:
    gate: nn.Linear | None  # None: gate and up are one fused Linear `up` with rows [gate; up] (Phi-3)
    up: nn.Linear
    down: nn.Linear

    def row_weights(self) -> list[torch.Tensor]:
        """The gate and up weights, [intermediate, hidden] each: row i belongs to neuron i."""
        if self.gate is None:
            return list(self.up.weight.chunk(2, 0))
        return [self.gate.weight, self.up.weight]

    def row_slices(self, keep: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
        """(Linear, output rows to keep) that keep the neurons `keep`: both halves of a fused gate_up alike."""
        if self.gate is None:
            import torch

            return [(self.up, torch.cat([keep, keep + self.down.in_features]))]
        return [(self.gate, keep), (self.up, keep)]


@dataclass(frozen=True)
class AttentionParts:
    module: nn.Module
    q: nn.Linear | None  # None where q/k/v are fused (Phi-3; such families set `no_kv_pruning`)
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


class ModelAdapter:
    """Base adapter for LLaMA-layout causal LMs. Subclasses set `family`, `model_types`, `description`."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    description: str = ""
    # why whole KV groups cannot be removed in this family (scope mlp+attn is refused, naming it); None: they can
    no_kv_pruning: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def mlp(self, layer: int) -> MLPParts:
        m = self.layers()[layer].mlp
        return MLPParts(gate=m.gate_proj, up=m.up_proj, down=m.down_proj)

    def attention(self, layer: int) -> AttentionParts:
        a = self.layers()[layer].self_attn
        head_dim = a.head_dim
        return AttentionParts(
            module=a, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj,
            num_heads=a.q_proj.out_features // head_dim,
            num_kv_heads=a.k_proj.out_features // head_dim,
            head_dim=head_dim,
        )

    def intermediate_sizes(self) -> list[int]:
        return [self.mlp(i).down.in_features for i in range(self.num_layers)]

    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def logits_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the CausalLM head applies to lm_head's output (softcapping, scaling); None: nothing."""
        return None

    @classmethod
    def check_scope(cls, scope: str) -> None:
        """A one-line error, naming the family, where scope mlp+attn cannot be applied to it."""
        if scope == "mlp+attn" and cls.no_kv_pruning:
            raise ConfigError(f"pruning.scope: family {cls.family!r} does not support mlp+attn ({cls.no_kv_pruning})"
                              "; use scope mlp")

    # --- bookkeeping after physical pruning ------------------------------------------------------------
    def set_attention_heads(self, layer: int, num_heads: int, num_kv_heads: int) -> None:
        """Record new head counts on the attention module (transformers reads them in forward)."""
        a = self.layers()[layer].self_attn
        for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(a, name):
                setattr(a, name, value)
        a.num_key_value_groups = num_heads // num_kv_heads

    # --- parameter arithmetic (config only) ------------------------------------------------------------
    @classmethod
    def params_per_mlp_neuron(cls, config) -> int:
        """Parameters removed with one intermediate neuron: a gate row, an up row, a down column (+ biases)."""
        bias = 2 if getattr(config, "mlp_bias", False) else 0
        return 3 * config.hidden_size + bias

    @classmethod
    def count_params(cls, config) -> int:
        """Total parameters of the dense model, embeddings and lm_head included (the paper's denominator)."""
        h, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        attn = h * q_out + 2 * h * kv_out + q_out * h
        attn += cls.attention_bias_params(config, q_out, kv_out)
        attn += cls.attention_norm_params(config, head_dim)
        mlp = cls.params_per_mlp_neuron(config) * config.intermediate_size
        if getattr(config, "mlp_bias", False):
            mlp += h
        norms = cls.layer_norm_params(config)
        embed = vocab * h
        lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * h
        return embed + n_layers * (attn + mlp + norms) + h + lm_head

    @classmethod
    def attention_bias_params(cls, config, q_out: int, kv_out: int) -> int:
        return (q_out + 2 * kv_out + config.hidden_size) if getattr(config, "attention_bias", False) else 0

    @classmethod
    def attention_norm_params(cls, config, head_dim: int) -> int:
        return 0

    @classmethod
    def layer_norm_params(cls, config) -> int:
        return 2 * config.hidden_size  # RMSNorm before attention and before the MLP
