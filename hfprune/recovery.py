"""LoRA recovery fine-tuning of a pruned model; the adapter is merged back, so shapes stay pruned.

Flow (`run_recovery`): load the dense model, prune it in memory by the plan (hfprune.surgery), wrap the
config's target projections with peft LoRA adapters, train them with AdamW on causal-LM data, merge the
adapters into the pruned weights and save an ordinary checkpoint (`surgery.save_pruned`) plus
`recovery.json` (loss per optimizer step, settings, data, seconds, versions).

Data (`recovery.data`):
- ``calibration`` (offline default): a SMOKE recovery, not the paper's. Plain next-token training on
  non-overlapping windows of the ``recovery`` text source, i.e. calibration documents held out from the
  text the criteria score with (hfprune.data.RECOVERY_DOCS), so recovery never trains on scored text.
- ``lamini`` (the paper's): MBZUAI/LaMini-instruction (its `instruction` / `response` columns) from the hub, or
  from its copy under ``hub_datasets_dir`` ($HFPRUNE_HUB_DATASETS), in an Alpaca-style prompt, with the loss on
  the response tokens only.
Both give examples as (input_ids, labels) lists; labels are -100 where no loss is taken.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hfprune.adapters import get_adapter
from hfprune.config import model_entry
from hfprune.data import contiguous_chunks, hub_datasets_dir, hub_path, load_dataset, load_texts, texts_hash
from hfprune.errors import ConfigError, HFPruneError
from hfprune.models import ModelSpec, ensure_available, load_model
from hfprune.runtime import (
    atomic_path,
    package_versions,
    resolve_device,
    seed_everything,
    write_json,
)
from hfprune.surgery import prune_model, read_plan, save_pruned

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that takes no loss (prompt, padding)
LAMINI = "MBZUAI/LaMini-instruction"
# The Alpaca prompt without an input field (LaMini rows have only an instruction and a response).
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Fixed optimiser details, as the HF Trainer defaults (recorded in recovery.json with the settings).
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0

Example = tuple[list[int], list[int]]


# --- settings ------------------------------------------------------------------------------------------------
def check_settings(rcfg: dict) -> None:
    """Step settings that the schema cannot express (it rejects non-positive values of each field)."""
    max_steps, epochs = rcfg.get("max_steps"), rcfg.get("epochs")
    if max_steps is None and epochs is None:
        raise ConfigError("recovery: set recovery.max_steps or recovery.epochs (both are null)")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"recovery.max_steps must be a positive number of steps, got {max_steps}")
    if max_steps is None and epochs <= 0:
        raise ConfigError(f"recovery.epochs must be positive, got {epochs}")


def num_steps(rcfg: dict, num_examples: int) -> int:
    """Optimizer steps: `max_steps` if set, else `epochs` passes over the examples (rounded up)."""
    check_settings(rcfg)
    if rcfg.get("max_steps") is not None:
        return rcfg["max_steps"]
    micro_batches = math.ceil(num_examples / rcfg["batch_size"])
    return max(1, math.ceil(rcfg["epochs"] * micro_batches / rcfg["grad_accum"]))


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct names (last path component) of the model's Linear modules, the possible LoRA targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_target_modules(model: nn.Module, targets) -> None:
    """Every target must name a Linear module (by its last name or a dotted suffix, as peft matches them)."""
    full = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        raise ConfigError(f"recovery.lora.target_modules: {', '.join(missing)} not found among the model's "
                          f"Linear modules ({', '.join(linear_module_names(model))})")


# --- data ------------------------------------------------------------------------------------------------------
def calibration_examples(tokenizer, seq_len: int, num_samples: int | None) -> tuple[list[Example], dict]:
    """Non-overlapping `seq_len` windows of the held-out calibration text, loss on every next token."""
    texts = load_texts("recovery")
    max_tokens = None if num_samples is None else num_samples * seq_len
    chunks = contiguous_chunks(tokenizer, texts, seq_len, max_tokens)
    if num_samples is not None and len(chunks) < num_samples:
        raise ConfigError(f"recovery.num_samples: {num_samples} windows of {seq_len} tokens requested, the held-out "
                          f"calibration text has {len(chunks)}; lower recovery.num_samples or recovery.seq_len")
    examples = [(row, list(row)) for row in chunks.tolist()]
    meta = {"source": "recovery (held-out calibration documents)", "documents": len(texts),
            "texts_sha256": texts_hash(texts), "examples": len(examples),
            "label_tokens": len(examples) * (seq_len - 1)}  # every position but the first is predicted
    return examples, meta


def alpaca_examples(tokenizer, instructions, responses, seq_len: int) -> tuple[list[Example], int]:
    """Alpaca-prompted (prompt + response + EOS) examples, truncated to `seq_len`, loss on the response only.

    Prompt and response are tokenized separately, so the prompt/response boundary (and hence the mask) is exact.
    Examples whose prompt alone fills `seq_len` carry no loss and are dropped; returns (examples, dropped).
    """
    prompts = [ALPACA_PROMPT.format(instruction=i.strip()) for i in instructions]
    prompt_ids = tokenizer(prompts)["input_ids"]  # the tokenizer's own special tokens (BOS where it adds one)
    response_ids = tokenizer([r.strip() for r in responses], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for p, r in zip(prompt_ids, response_ids):
        if len(p) >= seq_len:
            continue
        ids = (p + r + eos)[:seq_len]
        examples.append((ids, ([IGNORE] * len(p) + r + eos)[:seq_len]))
    return examples, len(prompt_ids) - len(examples)


def lamini_examples(tokenizer, seq_len: int, num_samples: int | None, seed: int,
                    hub_dir: str | None = None) -> tuple[list[Example], dict]:
    """The paper's recovery data: a seeded subset (all rows if `num_samples` is null) of LaMini-instruction, from
    the hub or its copy under `hub_dir` (hfprune.data.hub_path)."""
    path = hub_path(LAMINI, hub_dir)
    ds = load_dataset(path, split="train")
    if num_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(num_samples, len(ds))))
    examples, dropped = alpaca_examples(tokenizer, ds["instruction"], ds["response"], seq_len)
    if not examples:
        raise ConfigError(f"recovery.seq_len {seq_len} is shorter than every Alpaca prompt; raise it")
    meta = {"source": LAMINI, "path": path, "rows": len(ds), "examples": len(examples), "dropped_prompt_too_long": dropped,
            "label_tokens": sum(sum(t != IGNORE for t in lab) for _, lab in examples)}
    return examples, meta


def recovery_examples(tokenizer, rcfg: dict, seed: int, hub_dir: str | None = None) -> tuple[list[Example], dict]:
    if rcfg["data"] == "lamini":
        return lamini_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"], seed, hub_dir)
    return calibration_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding takes no loss and is masked out of attention."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _micro_batches(num_examples: int, batch_size: int, seed: int):
    """Endless seeded stream of example-index batches: a fresh permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_examples, generator=gen).tolist()
        for start in range(0, num_examples, batch_size):
            yield order[start:start + batch_size]


# --- training --------------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, lora: dict, seed: int):
    """Wrap the target projections with LoRA adapters (seeded init); only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, lora["target_modules"])
    seed_everything(seed)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions, in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def train_lora(model: nn.Module, examples: list[Example], rcfg: dict, *, steps: int, seed: int, pad_id: int,
               device: torch.device | str = "cpu"):
    """Apply LoRA to `model` and train it for `steps` optimizer steps; returns (peft model, history).

    Each step accumulates `grad_accum` micro-batches of `batch_size` examples and normalises by the step's
    labelled-token count, so the logged loss is the mean token loss of the step whatever the padding.
    """
    from transformers import get_scheduler

    device = torch.device(device)
    peft_model = apply_lora(model, rcfg["lora"], seed).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rcfg["learning_rate"], weight_decay=WEIGHT_DECAY)
    scheduler = get_scheduler(SCHEDULES[rcfg["schedule"]], optimizer, num_warmup_steps=rcfg["warmup_steps"],
                              num_training_steps=steps)
    stream = _micro_batches(len(examples), rcfg["batch_size"], seed)
    losses, lrs = [], []
    every = max(1, steps // 20)
    peft_model.train()
    for step in range(steps):
        batches = [collate([examples[i] for i in next(stream)], pad_id) for _ in range(rcfg["grad_accum"])]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss = token_loss_sum(peft_model, {k: v.to(device) for k, v in batch.items()}) / n_tokens
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            raise HFPruneError(f"recovery: training loss became {total} at step {step + 1}; lower "
                               "recovery.learning_rate")
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if (step + 1) % every == 0 or step + 1 == steps:
            log.info("recovery step %d/%d: loss %.4f, lr %.3g", step + 1, steps, total, lrs[-1])
    peft_model.eval()
    trainable = sum(p.numel() for p in params)
    return peft_model, {"loss_curve": losses, "lr_curve": lrs, "trainable_params": trainable}


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the (pruned) base weights: an ordinary model with the same shapes."""
    return peft_model.merge_and_unload().eval()


# --- the stage -------------------------------------------------------------------------------------------------
def run_recovery(cfg: dict, model_name: str, plan_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Prune `model_name` by the plan, LoRA-train, merge, and save the merged checkpoint + recovery.json.

    Returns the recovery.json content; its `loss_curve` is the mean token loss per optimizer step.
    Bad settings, a plan that does not fit the model, or unknown LoRA targets fail before any training.
    """
    from transformers import AutoConfig

    rcfg, seed = cfg["recovery"], cfg["seed"]
    check_settings(rcfg)
    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    plan = read_plan(plan_path, model_name, AutoConfig.from_pretrained(ensure_available(spec, cfg["resources_dir"])))
    device = resolve_device(cfg["device"])
    # fp32 on CPU (half-precision training there is slow and lossy); on GPU the config's weights dtype, with
    # the LoRA weights kept in fp32 by peft and the loss computed in fp32
    dtype = "float32" if device.type == "cpu" else cfg["dtype"]
    model, tokenizer = load_model(spec, cfg["resources_dir"], dtype=dtype)
    spec = spec.resolved(model.config)
    prune_model(model, plan)
    check_target_modules(model, rcfg["lora"]["target_modules"])
    examples, data_meta = recovery_examples(tokenizer, rcfg, seed, hub_datasets_dir(cfg))
    steps = num_steps(rcfg, len(examples))
    log.info("recovery of %s by %s: %d examples, %d steps on %s", model_name, plan_path, len(examples), steps,
             device)
    start = time.perf_counter()
    peft_model, history = train_lora(model, examples, rcfg, steps=steps, seed=seed, pad_id=tokenizer.pad_token_id,
                                     device=device)
    merged = merge_lora(peft_model).cpu()
    seconds = time.perf_counter() - start
    summary = {
        "model": model_name, "family": spec.family, "source": spec.source,
        "plan": {"path": str(plan_path), "sha256": hashlib.sha256(Path(plan_path).read_bytes()).hexdigest(),
                 **{k: plan.get(k) for k in ("criterion", "ratio", "achieved_ratio", "allocation", "scope")}},
        "intermediate_sizes": get_adapter(merged).intermediate_sizes(),
        "settings": {**rcfg, "seed": seed, "steps": steps, "optimizer": "AdamW", "weight_decay": WEIGHT_DECAY,
                     "max_grad_norm": MAX_GRAD_NORM, "dtype": dtype, "device": str(device)},
        "data": data_meta,
        **history,
        "seconds": seconds,
        "versions": package_versions(),
    }
    with atomic_path(out_dir) as tmp:
        save_pruned(merged, tokenizer, tmp)
        write_json(tmp / "recovery.json", summary)
    return summary
