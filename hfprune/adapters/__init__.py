"""Model-family adapters. Adding a family = one module with a ModelAdapter subclass + one line here."""

from __future__ import annotations

from hfprune.adapters.base import AttentionParts, MLPParts, ModelAdapter
from hfprune.adapters.gemma import GemmaAdapter
from hfprune.adapters.gemma2 import Gemma2Adapter
from hfprune.adapters.gemma3 import Gemma3Adapter
from hfprune.adapters.granite import GraniteAdapter
from hfprune.adapters.llama import LlamaAdapter
from hfprune.adapters.mistral import MistralAdapter
from hfprune.adapters.olmo2 import Olmo2Adapter
from hfprune.adapters.phi3 import Phi3Adapter
from hfprune.adapters.qwen2 import Qwen2Adapter
from hfprune.adapters.qwen3 import Qwen3Adapter
from hfprune.errors import UnsupportedModelError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls for cls in (LlamaAdapter, Qwen2Adapter, Qwen3Adapter, MistralAdapter, GemmaAdapter,
                                Gemma2Adapter, Gemma3Adapter, Olmo2Adapter, GraniteAdapter, Phi3Adapter)
}

__all__ = ["ADAPTERS", "AttentionParts", "MLPParts", "ModelAdapter", "adapter_class", "get_adapter",
           "supported_families"]


def supported_families() -> str:
    return "; ".join(f"{name}: {cls.description}" for name, cls in ADAPTERS.items())


def adapter_class(config_or_family) -> type[ModelAdapter]:
    """Adapter class for a family name or an HF config (by its model_type)."""
    if isinstance(config_or_family, str):
        if config_or_family in ADAPTERS:
            return ADAPTERS[config_or_family]
        raise UnsupportedModelError(
            f"unknown model family {config_or_family!r}; supported families are: {supported_families()}")
    model_type = getattr(config_or_family, "model_type", None)
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls
    arch = (getattr(config_or_family, "architectures", None) or [model_type])[0]
    raise UnsupportedModelError(
        f"unsupported architecture {arch!r} (model_type {model_type!r}); supported families are: "
        f"{supported_families()}")


def get_adapter(model, family: str | None = None) -> ModelAdapter:
    """Adapter for a loaded model; if `family` is given it must match the model's architecture."""
    cls = adapter_class(model.config)
    if family is not None and adapter_class(family) is not cls:
        raise UnsupportedModelError(
            f"model family {family!r} given in config, but the model is {model.config.model_type!r} "
            f"({cls.family}); fix the model's `family` field")
    return cls(model)
