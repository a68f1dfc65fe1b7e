"""LoRA recovery fine-tuning of a pruned model; shapes stay pruned.

Flow (`run_recovery`): load the dense model, prune it in memory by the plan (hfprune.surgery), wrap the
config's target projections with peft LoRA adapters, train them with AdamW on causal-LM data, and save the
pruned model (`surgery.save_pruned`) plus `recovery.json` (loss per optimizer step, settings, data, seconds,
versions). `recovery.recipe` picks how:
- ``compact`` (default): one example per right-padded row, the base in the config dtype (fp32 on CPU), the
  adapters merged into the pruned weights (an ordinary checkpoint).
- ``released`` (the released HFPrune scripts: fintune_lora.py, dataset/LaMini_dataset.py,
  dataset/packing/packed_dataset.py): examples truncated to `seq_len` and packed greedily, in a seeded order,
  into `seq_len`-token rows in which each example attends only to itself (a 4-D block-diagonal causal mask,
  position ids restarting per example); base weights in fp32, the forward under bf16 autocast when `dtype` is
  bfloat16 (peft's prepare_model_for_kbit_training + accelerate bf16); the adapter saved UNMERGED in
  ``adapter/`` beside the untouched pruned base, and evaluated so (`attach_adapter`).
Both recipes take `batch_size` rows per micro-batch and `grad_accum` micro-batches per optimizer step, and
normalise by the step's labelled-token count: the loss of a step is the mean token loss over every labelled
token of its rows (the released Trainer's `num_items_in_batch` reduction).
Training (hfprune.recovery_train) runs in one process, or as DDP over the processes of a torchrun launch
(`hfprune recover --nproc N`, N from resources.gpus_per_job on GPUs) with the same rows per step; it checkpoints
every `recovery.checkpoint_every` steps and on SIGTERM / SIGUSR1 (hfprune.checkpoints), and a rerun of the job
resumes from the last checkpoint. Data: hfprune.recovery_data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from hfprune import checkpoints
from hfprune.adapters import get_adapter
from hfprune.config import model_entry
from hfprune.data import hub_datasets_dir
from hfprune.errors import ConfigError
from hfprune.models import ModelSpec, ensure_available, load_model, resolve_dtype
from hfprune.recovery_data import recovery_examples, training_rows
from hfprune.recovery_steps import accumulation, check_settings, num_steps, rows_per_step
from hfprune.recovery_train import (
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    Checkpointing,
    check_target_modules,
    train_lora,
)
from hfprune.runtime import atomic_path, package_versions, resolve_device, write_json
from hfprune.surgery import load_pruned, prune_model, read_plan, write_pruned

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the unmerged PEFT adapter inside a recovered folder (released recipe)


# --- settings ------------------------------------------------------------------------------------------------
def training_precision(cfg: dict, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(dtype the model is loaded in, autocast dtype or None) for training.

    compact: fp32 on CPU (half-precision training there is slow and lossy), else the config's dtype, with the
    LoRA weights kept in fp32 by peft. released: every base weight in fp32 and, when `dtype` is bfloat16, the
    forward under bf16 autocast, as the released scripts.
    """
    if cfg["recovery"]["recipe"] == "released":
        return "float32", torch.bfloat16 if cfg["dtype"] == "bfloat16" else None
    return ("float32" if device.type == "cpu" else cfg["dtype"]), None


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the (pruned) base weights: an ordinary model with the same shapes."""
    return peft_model.merge_and_unload().eval()


def has_adapter(recovered_dir: str | os.PathLike) -> bool:
    """Whether a recovered folder holds an unmerged adapter (released recipe) rather than merged weights."""
    return (Path(recovered_dir) / ADAPTER_DIR / "adapter_config.json").is_file()


def attach_adapter(model: nn.Module, recovered_dir: str | os.PathLike) -> nn.Module:
    """`model` (the pruned base loaded from `recovered_dir`) with the folder's unmerged LoRA adapter injected, if
    it has one (released recipe), else `model` itself (compact: already merged).

    Returns the transformers model with peft's LoRA layers inside (base + B·A·scale computed apart, as trained),
    so everything that takes a HF model evaluates it unchanged.
    """
    if not has_adapter(recovered_dir):
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, Path(recovered_dir) / ADAPTER_DIR).get_base_model().eval()


def load_recovered(recovered_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A recovered folder as evaluated: the pruned model, with its adapter unmerged where it has one."""
    return attach_adapter(load_pruned(recovered_dir, dtype=dtype), recovered_dir)


def save_recovered(peft_model, tokenizer, out_dir: Path, recipe: str, dtype: torch.dtype) -> nn.Module:
    """Write the trained model into the folder `out_dir` (the caller makes it atomic): compact, merged; released,
    the adapter in ADAPTER_DIR beside the untouched pruned base. The model is saved in `dtype`; returns it."""
    if recipe == "released":
        peft_model.save_pretrained(out_dir / ADAPTER_DIR)  # before unload(), which drops the adapter layers
        model = peft_model.unload()
    else:
        model = merge_lora(peft_model)
    model = model.to(dtype=dtype, device="cpu").eval()
    write_pruned(model, tokenizer, out_dir)
    return model


def check_recovery_memory(cfg: dict, model_name: str, arch, plan: dict, processes: int) -> None:
    """The estimated peak of one training process (hfprune.estimates.recovery_memory, every layer as wide as the
    plan's widest) against this machine's memory (hfprune.limits.memory_budget; on CPU the processes share it),
    before any weight is loaded."""
    import copy

    from hfprune import estimates
    from hfprune.limits import GIB, RUNTIME_BYTES, memory_budget

    budget = memory_budget(cfg, model_name, in_job=True)
    if budget is None:
        return
    limit, what, device = budget
    if device == "cpu":
        limit //= processes
    pruned = copy.copy(arch)
    pruned.intermediate_size = max(len(layer["mlp_keep"]) for layer in plan["layers"])
    parts = {**estimates.recovery_memory(pruned, cfg), "runtime": RUNTIME_BYTES[device]}
    need = sum(parts.values())
    if need > limit:
        detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)
        knobs = "lower recovery.batch_size (recovery.rows_per_step keeps the step) or recovery.seq_len" + (
            "" if cfg["recovery"].get("gradient_checkpointing") else ", or set recovery.gradient_checkpointing: true")
        raise ConfigError(f"recovering model {model_name!r} needs about {need / GIB:.1f} GiB per process ({detail}), "
                          f"more than the {limit / GIB:.1f} GiB of {what}; {knobs}")


# --- the stage -------------------------------------------------------------------------------------------------
def make_accelerator(device: torch.device):
    """accelerate's Accelerator when this process is one of several of a torchrun launch, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


def peak_gpu_memory(accelerator) -> list[float] | None:
    """Peak allocated GiB of each process's GPU (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    mine = torch.cuda.max_memory_allocated() / 2**30
    if accelerator is None or accelerator.num_processes == 1:
        return [mine]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, mine)
    return out


def resume_point(cfg: dict, model_name: str, plan_path, out_dir) -> tuple[Path, dict | None]:
    """(the job's checkpoint folder, the meta of its last checkpoint or None); a checkpoint of another plan or
    other settings is refused (hfprune.checkpoints.check_meta)."""
    root = checkpoints.checkpoint_root(cfg, out_dir)
    last = checkpoints.latest(root)
    if last is None:
        return root, None
    meta = checkpoints.read_meta(last)
    checkpoints.check_meta(meta, last, checkpoints.settings_digest(cfg, model_entry(cfg, model_name)),
                           hashlib.sha256(Path(plan_path).read_bytes()).hexdigest(), plan_path)
    return root, {**meta, "path": str(last)}


def run_recovery(cfg: dict, model_name: str, plan_path: str | os.PathLike, out_dir: str | os.PathLike,
                 run_id: str | None = None, progress=None) -> dict:
    """Prune `model_name` by the plan, LoRA-train, and save the model (`save_recovered`) + recovery.json.

    Returns the recovery.json content; its `loss_curve` is the mean token loss per optimizer step.
    Bad settings, a plan that does not fit the model, or unknown LoRA targets fail before any training.
    Under torchrun every process trains its share and only the main one writes. A checkpoint of this job resumes
    (`run_id`, the job's MLflow run, is kept in the checkpoints); `progress(step, metrics)` see train_lora.
    """
    from transformers import AutoConfig

    rcfg, seed = cfg["recovery"], cfg["seed"]
    check_settings(rcfg)
    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    arch = AutoConfig.from_pretrained(ensure_available(spec, cfg["resources_dir"]))
    plan = read_plan(plan_path, model_name, arch)
    device = resolve_device(cfg["device"])
    accelerator = make_accelerator(device)
    if accelerator is not None:
        device = accelerator.device
    processes = accelerator.num_processes if accelerator else 1
    accumulation(rcfg, processes)
    check_recovery_memory(cfg, model_name, arch, plan, processes)
    root, resume_meta = resume_point(cfg, model_name, plan_path, out_dir)
    main = accelerator is None or accelerator.is_main_process
    dtype, autocast_dtype = training_precision(cfg, device)
    # straight onto this process's device, before the data is built
    model, tokenizer = load_model(spec, cfg["resources_dir"], dtype=dtype,
                                  device_map=None if device.type == "cpu" else {"": device})
    spec = spec.resolved(model.config)
    prune_model(model, plan)
    check_target_modules(model, rcfg["lora"]["target_modules"])
    examples, data_meta = recovery_examples(tokenizer, rcfg, seed, hub_datasets_dir(cfg))
    rows = training_rows(examples, rcfg, seed)
    steps = num_steps(rcfg, len(rows))
    log.info("recovery (%s) of %s by %s: %d examples in %d rows, %d steps on %s x %d", rcfg["recipe"], model_name,
             plan_path, len(examples), len(rows), steps, device, processes)
    resume = None
    if resume_meta is not None:
        resume = checkpoints.load_state(Path(resume_meta["path"]))
        log.info("recovery: resuming from step %d of %s", resume["step"], resume_meta["path"])
    meta = {"digest": checkpoints.settings_digest(cfg, model_entry(cfg, model_name)),
            "plan_sha256": hashlib.sha256(Path(plan_path).read_bytes()).hexdigest(), "run_id": run_id}
    sizes = get_adapter(model).intermediate_sizes()
    start = time.perf_counter()
    with checkpoints.stop_signals() as stop:
        peft_model, history = train_lora(
            model, rows, rcfg, steps=steps, seed=seed, pad_id=tokenizer.pad_token_id, device=device,
            autocast_dtype=autocast_dtype, accelerator=accelerator, stop=stop, progress=progress,
            checkpointing=Checkpointing(root, rcfg.get("checkpoint_every"), meta, resume))
    seconds = time.perf_counter() - start
    saved_dtype = resolve_dtype(cfg["dtype"] if rcfg["recipe"] == "released" else dtype)
    summary = {
        "model": model_name, "family": spec.family, "source": spec.source,
        "plan": {"path": str(plan_path), "sha256": meta["plan_sha256"],
                 **{k: plan.get(k) for k in ("criterion", "ratio", "achieved_ratio", "allocation", "scope")}},
        "intermediate_sizes": sizes,
        "settings": {**rcfg, "seed": seed, "steps": steps, "rows": len(rows), "rows_per_step": rows_per_step(rcfg),
                     "processes": processes, "grad_accum_per_process": accumulation(rcfg, processes),
                     "optimizer": "AdamW", "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM,
                     "dtype": dtype,
                     "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
                     "adapter": "unmerged" if rcfg["recipe"] == "released" else "merged", "device": str(device)},
        "data": data_meta,
        **history,
        "resumed_from_step": resume["step"] if resume else None,
        "peak_gpu_memory_gb": peak_gpu_memory(accelerator),
        "seconds": seconds,  # of this run only, when resumed
        "versions": package_versions(),
    }
    if main:
        with atomic_path(out_dir) as tmp:
            save_recovered(peft_model, tokenizer, tmp, rcfg["recipe"], saved_dtype)
            write_json(tmp / "recovery.json", summary)
        checkpoints.remove(root)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return summary
