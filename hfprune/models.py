"""Resolve a config model entry (name, family, source) to a loaded HF causal LM and its tokenizer.

`source` is one of: an embedded packaged model (see hfprune.assets.EMBEDDED_MODELS), a local folder, or a
hub id ("org/name"). Embedded models are materialised once under ``<resources>/models/<source>/``.
`family` is optional: it is the adapter family of the checkpoint's `model_type`, read from config.json facts
(`checkpoint_family`; for a hub model not yet in the cache, from the config of the job that downloads it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from hfprune.adapters import adapter_class
from hfprune.assets import EMBEDDED_MODELS, materialise
from hfprune.errors import HFPruneError, UnsupportedModelError
from hfprune.resources import check_offload
from hfprune.runtime import read_json, reading

if TYPE_CHECKING:  # torch loads with the model: config facts (plan jobs, validation) need none
    import torch

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str | None  # None: not written in the config and not yet readable from the checkpoint
    source: str

    @classmethod
    def from_config(cls, entry: dict) -> ModelSpec:
        return cls(name=entry["name"], family=entry.get("family"), source=entry["source"])

    def resolved(self, config) -> ModelSpec:
        """This spec with the family of the checkpoint whose HF `config` is given (a written one must match)."""
        check_family(config, self)
        return replace(self, family=adapter_class(config).family)

    @property
    def kind(self) -> str:
        if self.source in EMBEDDED_MODELS:
            return "embedded"
        if self.source.startswith((".", "/", "~")) or Path(self.source).expanduser().exists():
            return "local"
        if "/" in self.source:
            return "hub"
        raise HFPruneError(
            f"model {self.name!r}: source {self.source!r} is not an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), an existing local folder, or a hub id of the form "
            "'org/name'; fix the model's `source` field")


def embedded_dir(resources_dir: str | os.PathLike, source: str) -> Path:
    """Folder of a materialised embedded model: keyed by source, so config entries that share a packaged model
    share its folder (also the assets rule's output pattern, with source "{source}")."""
    return Path(resources_dir) / "models" / source


def model_dir(spec: ModelSpec, resources_dir: str | os.PathLike = "resources") -> Path | str:
    """Where `from_pretrained` reads this model from (a folder, or a hub id)."""
    if spec.kind == "embedded":
        return embedded_dir(resources_dir, spec.source)
    if spec.kind == "local":
        path = Path(spec.source).expanduser()
        if not (path / "config.json").is_file():
            raise HFPruneError(f"model {spec.name!r}: local source folder {str(path)!r} does not exist or has no "
                               "config.json; fix the model's `source` field")
        return path
    return spec.source


def ensure_available(spec: ModelSpec, resources_dir: str | os.PathLike = "resources") -> Path | str:
    """Materialise an embedded model if needed and return where to load it from."""
    path = model_dir(spec, resources_dir)
    if spec.kind == "embedded":
        if spec.family is not None and EMBEDDED_MODELS[spec.source].family != spec.family:
            raise HFPruneError(f"model {spec.name!r}: embedded model {spec.source!r} is family "
                               f"{EMBEDDED_MODELS[spec.source].family!r}, not {spec.family!r}; fix `family`")
        materialise(spec.source, path)
    return path


def architecture(spec: ModelSpec, resources_dir: str | os.PathLike = "resources") -> SimpleNamespace | None:
    """The model's config.json fields, read without weights or network (what the ratio arithmetic needs).

    None for a hub model that is not in the local cache: the job that downloads it checks it instead.
    """
    if spec.kind == "embedded":
        return SimpleNamespace(**EMBEDDED_MODELS[spec.source].architecture)
    if spec.kind == "local":
        path = model_dir(spec, resources_dir) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(spec.source, "config.json")
        if not isinstance(path, str):
            return None
    return SimpleNamespace(**read_json(path, "model config"))


def checkpoint_family(spec: ModelSpec, resources_dir: str | os.PathLike = "resources") -> str | None:
    """The family of the checkpoint's model_type, from config.json facts alone (no weights, no network); None
    where they cannot be read here or name no supported family (check_models and the jobs report why)."""
    try:
        arch = architecture(spec, resources_dir)
        return None if arch is None else adapter_class(arch).family
    except HFPruneError:
        return None


def user_offline() -> bool:
    """Whether the user set HF_HUB_OFFLINE (not hfprune's own default, see hfprune/__init__.py): then nothing is
    downloaded, hub sources included."""
    return (os.environ.get("HFPRUNE_OFFLINE_DEFAULT") != "1"
            and os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"))


def check_cached(spec: ModelSpec, config_path: str = "CONFIG") -> None:
    """Offline (HF_HUB_OFFLINE=1 of the user's), a hub model must be in the cache: say so at once, with the
    command that fetches it, instead of failing deep inside transformers."""
    if spec.kind != "hub" or not user_offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec.source, "config.json"), str):
        raise HFPruneError(f"model {spec.name!r}: hub model {spec.source!r} is not in the cache ({constants.HF_HUB_CACHE}) "
                           f"and HF_HUB_OFFLINE=1; run `hfprune prefetch --config {config_path}` on a machine with "
                           "network (same HF_HOME)")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HFPruneError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, name)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, T, T] boolean (query, key) mask -> the [B, 1, T, T] additive mask HF decoders take as-is (0 where
    allowed, the dtype's minimum elsewhere): additive, not boolean, because eager attention adds it to the scores."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def load_tokenizer(spec: ModelSpec, resources_dir="resources"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_available(spec, resources_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, resources_dir="resources", dtype: str = "float32", device_map=None,
               attn_implementation: str = "sdpa", max_memory: dict | None = None, allow_offload: bool = False):
    """Load (model, tokenizer) in eval mode; `device_map` and `max_memory` are passed to accelerate for multi-GPU
    placement (hfprune.resources.placement), and a model it offloads to cpu/disk stops the job unless
    `allow_offload`. The attention kernel is pinned (config `attn_implementation`), never left to transformers'
    own choice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.family is not None:
        adapter_class(spec.family)  # unknown family -> clear error before any I/O
    if spec.kind == "hub" and not user_offline():
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[var] = "0"
    path = ensure_available(spec, resources_dir)
    check_family(AutoConfig.from_pretrained(path), spec)  # before any weight is read
    check_weight_files(path)
    placed = {"device_map": device_map, **({"max_memory": max_memory} if max_memory else {})}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
                                                 **placed)
    if device_map is not None:
        check_offload(model, spec.name, allow_offload)
    model.eval()
    return model, load_tokenizer(spec, resources_dir)


def check_weight_files(path: Path | str) -> None:
    """Every safetensors file of a model folder has a whole header and all the bytes it announces (an interrupted
    copy or download is one line naming the file, not safetensors' traceback); reads headers only."""
    if not Path(path).is_dir():  # a hub id: from_pretrained downloads and verifies it
        return
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with reading(file, "model weights file"), safe_open(str(file), "pt"):
            pass


def check_family(config, spec: ModelSpec) -> None:
    """Unsupported architecture or a written `family` that contradicts the checkpoint -> clear error."""
    try:
        cls = adapter_class(config)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"model {spec.name!r}: {exc}") from None
    if spec.family is not None and cls is not adapter_class(spec.family):
        raise HFPruneError(f"model {spec.name!r}: config says family {spec.family!r} but the checkpoint is "
                           f"{config.model_type!r} ({cls.family}); fix or drop the model's `family`")
