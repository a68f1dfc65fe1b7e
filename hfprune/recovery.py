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
from hfprune.models import ModelSpec, additive_mask, ensure_available, load_model, resolve_dtype
from hfprune.runtime import (
    atomic_path,
    package_versions,
    resolve_device,
    seed_everything,
    write_json,
)
from hfprune.surgery import load_pruned, prune_model, read_plan, write_pruned

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
ADAPTER_DIR = "adapter"  # the unmerged PEFT adapter inside a recovered folder (released recipe)

Example = tuple[list[int], list[int]]
Row = list[Example]  # examples side by side in one training row


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


def num_steps(rcfg: dict, num_rows: int) -> int:
    """Optimizer steps: `max_steps` if set, else `epochs` passes over the rows (rounded up), each step taking
    `batch_size` x `grad_accum` rows."""
    check_settings(rcfg)
    if rcfg.get("max_steps") is not None:
        return rcfg["max_steps"]
    micro_batches = math.ceil(num_rows / rcfg["batch_size"])
    return max(1, math.ceil(rcfg["epochs"] * micro_batches / rcfg["grad_accum"]))


def training_precision(cfg: dict, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(dtype the model is loaded in, autocast dtype or None) for training.

    compact: fp32 on CPU (half-precision training there is slow and lossy), else the config's dtype, with the
    LoRA weights kept in fp32 by peft. released: every base weight in fp32 and, when `dtype` is bfloat16, the
    forward under bf16 autocast, as the released scripts.
    """
    if cfg["recovery"]["recipe"] == "released":
        return "float32", torch.bfloat16 if cfg["dtype"] == "bfloat16" else None
    return ("float32" if device.type == "cpu" else cfg["dtype"]), None


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


def alpaca_examples(tokenizer, instructions, responses, seq_len: int,
                    keep_prompt_only: bool = False) -> tuple[list[Example], int]:
    """Alpaca-prompted (prompt + response + EOS) examples, truncated to `seq_len`, loss on the response only.

    Prompt and response are tokenized separately, so the prompt/response boundary (and hence the mask) is exact.
    An example whose prompt alone fills `seq_len` carries no loss: dropped, or kept truncated with
    `keep_prompt_only` (the released recipe truncates every example and drops none). Returns (examples, number of
    such prompt-only examples).
    """
    prompts = [ALPACA_PROMPT.format(instruction=i.strip()) for i in instructions]
    prompt_ids = tokenizer(prompts)["input_ids"]  # the tokenizer's own special tokens (BOS where it adds one)
    response_ids = tokenizer([r.strip() for r in responses], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, prompt_only = [], 0
    for p, r in zip(prompt_ids, response_ids):
        prompt_only += len(p) >= seq_len
        if len(p) >= seq_len and not keep_prompt_only:
            continue
        ids = (p + r + eos)[:seq_len]
        examples.append((ids, ([IGNORE] * len(p) + r + eos)[:seq_len]))
    return examples, prompt_only


def lamini_examples(tokenizer, seq_len: int, num_samples: int | None, seed: int,
                    keep_prompt_only: bool, hub_dir: str | None = None) -> tuple[list[Example], dict]:
    """The paper's recovery data: a seeded subset (all rows if `num_samples` is null) of LaMini-instruction, from
    the hub or its copy under `hub_dir` (hfprune.data.hub_path)."""
    path = hub_path(LAMINI, hub_dir)
    ds = load_dataset(path, split="train")
    if num_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(num_samples, len(ds))))
    examples, prompt_only = alpaca_examples(tokenizer, ds["instruction"], ds["response"], seq_len, keep_prompt_only)
    if prompt_only == len(ds):
        raise ConfigError(f"recovery.seq_len {seq_len} is shorter than every Alpaca prompt; raise it")
    meta = {"source": LAMINI, "path": path, "rows": len(ds), "examples": len(examples),
            ("kept_prompt_only" if keep_prompt_only else "dropped_prompt_too_long"): prompt_only,
            "label_tokens": sum(sum(t != IGNORE for t in lab[1:]) for _, lab in examples)}
    return examples, meta


def recovery_examples(tokenizer, rcfg: dict, seed: int, hub_dir: str | None = None) -> tuple[list[Example], dict]:
    if rcfg["data"] == "lamini":
        return lamini_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"], seed,
                               keep_prompt_only=rcfg["recipe"] == "released", hub_dir=hub_dir)
    return calibration_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"])


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Greedy packing in order: an example joins the current row while the row stays within `seq_len` tokens,
    else it starts the next (the released pack_data_points_by_length, no limit on examples per row)."""
    rows: list[Row] = []
    used = seq_len  # forces a new row for the first example
    for ex in examples:
        if used + len(ex[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    return rows


def training_rows(examples: list[Example], rcfg: dict, seed: int) -> list[Row]:
    """compact: one example per row. released: the examples, in a seeded order (the released code shuffles the
    dataset once before packing), packed into `seq_len`-token rows."""
    if rcfg["recipe"] != "released":
        return [[ex] for ex in examples]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return pack([examples[i] for i in order], rcfg["seq_len"])


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples side by side, right-padded to the longest row -> input_ids, labels, position_ids
    (restarting at 0 in every example) and segments (the example's index in its row, -1 on padding).

    The first label of every example is dropped: in a packed row it would be predicted from the previous example
    (the released pack_data_points_FA does the same). Padding takes no loss.
    """
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, (ids, lab) in enumerate(row):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + 1:end] = torch.tensor(lab[1:], dtype=torch.long)
            segments[r, start:end] = k
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(length - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments}


def attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: a token attends to itself and the earlier tokens of its own example (padding
    to earlier padding, so no query row is fully masked)."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    allowed = (idx[None, None, :] <= idx[None, :, None]) & (segments[:, None, :] == segments[:, :, None])
    return additive_mask(allowed, dtype)


def _micro_batches(num_rows: int, batch_size: int, seed: int):
    """Endless seeded stream of row-index batches: a fresh permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_rows, generator=gen).tolist()
        for start in range(0, num_rows, batch_size):
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


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] next-token cross-entropy in fp32 of a `collate`d batch; 0 where the label is ignored.

    The additive mask takes the dtype the attention runs in: the autocast dtype under autocast, else the model's.
    """
    device_type = batch["input_ids"].device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else model.get_input_embeddings().weight.dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask(batch["segments"], dtype),
                   position_ids=batch["position_ids"], use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(labels.shape)


def train_lora(model: nn.Module, rows: list[Row], rcfg: dict, *, steps: int, seed: int, pad_id: int,
               device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None):
    """Apply LoRA to `model` and train it for `steps` optimizer steps on `rows`; returns (peft model, history).

    Each step accumulates `grad_accum` micro-batches of `batch_size` rows and normalises by the step's
    labelled-token count, so the logged loss is the mean token loss of the step whatever the padding and
    packing. With `autocast_dtype` the forward runs under autocast (the loss stays fp32).
    """
    from transformers import get_scheduler

    device = torch.device(device)
    peft_model = apply_lora(model, rcfg["lora"], seed).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rcfg["learning_rate"], weight_decay=WEIGHT_DECAY)
    scheduler = get_scheduler(SCHEDULES[rcfg["schedule"]], optimizer, num_warmup_steps=rcfg["warmup_steps"],
                              num_training_steps=steps)
    stream = _micro_batches(len(rows), rcfg["batch_size"], seed)
    losses, lrs = [], []
    every = max(1, steps // 20)
    peft_model.train()
    for step in range(steps):
        batches = [collate([rows[i] for i in next(stream)], pad_id) for _ in range(rcfg["grad_accum"])]
        # at least 1: a step of prompt-only rows (kept by the released recipe) has no loss, not a NaN
        n_tokens = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))
        total = 0.0
        for batch in batches:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = token_losses(peft_model, {k: v.to(device) for k, v in batch.items()}).sum() / n_tokens
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


# --- the stage -------------------------------------------------------------------------------------------------
def run_recovery(cfg: dict, model_name: str, plan_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Prune `model_name` by the plan, LoRA-train, and save the model (`save_recovered`) + recovery.json.

    Returns the recovery.json content; its `loss_curve` is the mean token loss per optimizer step.
    Bad settings, a plan that does not fit the model, or unknown LoRA targets fail before any training.
    """
    from transformers import AutoConfig

    rcfg, seed = cfg["recovery"], cfg["seed"]
    check_settings(rcfg)
    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    plan = read_plan(plan_path, model_name, AutoConfig.from_pretrained(ensure_available(spec, cfg["resources_dir"])))
    device = resolve_device(cfg["device"])
    dtype, autocast_dtype = training_precision(cfg, device)
    model, tokenizer = load_model(spec, cfg["resources_dir"], dtype=dtype)
    spec = spec.resolved(model.config)
    prune_model(model, plan)
    check_target_modules(model, rcfg["lora"]["target_modules"])
    examples, data_meta = recovery_examples(tokenizer, rcfg, seed, hub_datasets_dir(cfg))
    rows = training_rows(examples, rcfg, seed)
    steps = num_steps(rcfg, len(rows))
    log.info("recovery (%s) of %s by %s: %d examples in %d rows, %d steps on %s", rcfg["recipe"], model_name,
             plan_path, len(examples), len(rows), steps, device)
    sizes = get_adapter(model).intermediate_sizes()
    start = time.perf_counter()
    peft_model, history = train_lora(model, rows, rcfg, steps=steps, seed=seed, pad_id=tokenizer.pad_token_id,
                                     device=device, autocast_dtype=autocast_dtype)
    seconds = time.perf_counter() - start
    saved_dtype = resolve_dtype(cfg["dtype"] if rcfg["recipe"] == "released" else dtype)
    summary = {
        "model": model_name, "family": spec.family, "source": spec.source,
        "plan": {"path": str(plan_path), "sha256": hashlib.sha256(Path(plan_path).read_bytes()).hexdigest(),
                 **{k: plan.get(k) for k in ("criterion", "ratio", "achieved_ratio", "allocation", "scope")}},
        "intermediate_sizes": sizes,
        "settings": {**rcfg, "seed": seed, "steps": steps, "rows": len(rows),
                     "rows_per_step": rcfg["batch_size"] * rcfg["grad_accum"], "optimizer": "AdamW",
                     "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "dtype": dtype,
                     "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
                     "adapter": "unmerged" if rcfg["recipe"] == "released" else "merged", "device": str(device)},
        "data": data_meta,
        **history,
        "seconds": seconds,
        "versions": package_versions(),
    }
    with atomic_path(out_dir) as tmp:
        save_recovered(peft_model, tokenizer, tmp, rcfg["recipe"], saved_dtype)
        write_json(tmp / "recovery.json", summary)
    return summary
