"""The LoRA training loop of recovery: one process, or DDP over the processes of a torchrun launch (accelerate),
with periodic and on-signal checkpoints (hfprune.checkpoints), progress lines and chunked cross-entropy.

A step takes `rows_per_step` rows (default batch_size x grad_accum) whatever the process count: the seeded
stream of `batch_size`-row micro-batches is the same in every process, and process r of N takes micro-batches
r, r + N, ... of the step's rows_per_step / batch_size. Each normalises its summed token loss by the step's
labelled tokens over all processes (all-reduced, the released Trainer's `num_items_in_batch`), so the summed
gradient equals one process's up to float reduction order. Only the main process logs and writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from hfprune.errors import ConfigError, HFPruneError
from hfprune.recovery_data import IGNORE, Row, attention_mask, collate, micro_batches
from hfprune.recovery_steps import CE_CHUNK_BYTES, accumulation, rows_per_step
from hfprune.runtime import seed_everything

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Fixed optimiser details, as the HF Trainer defaults (recorded in recovery.json with the settings).
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


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


def apply_lora(model: nn.Module, lora: dict, seed: int, gradient_checkpointing: bool = False):
    """Wrap the target projections with LoRA adapters (seeded init); only the adapters are trainable. With
    `gradient_checkpointing` the decoder layers are recomputed in the backward (non-reentrant; the inputs
    require grad so the frozen embedding still lets gradients reach the adapters)."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, lora["target_modules"])
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    seed_everything(seed)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _chunk_losses(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(labels.shape)


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """[B, T-1] next-token cross-entropy in fp32 of a `collate`d batch; 0 where the label is ignored.

    The output head and cross-entropy run over `chunk` positions at a time (default: CE_CHUNK_BYTES of fp32
    logits), each recomputed in the backward, so the full [B, T, V] logits are never kept. The additive mask takes
    the dtype the attention runs in: the autocast dtype under autocast, else the model's.
    """
    device_type = batch["input_ids"].device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else model.get_input_embeddings().weight.dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=attention_mask(batch["segments"], dtype),
                        position_ids=batch["position_ids"], use_cache=False).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    head = base.get_output_embeddings()
    chunk = chunk or max(1, CE_CHUNK_BYTES // (4 * head.out_features * labels.shape[0]))
    parts = []
    for s in range(0, labels.shape[1], chunk):
        h, lab = hidden[:, s:s + chunk], labels[:, s:s + chunk]
        several = chunk < labels.shape[1] and torch.is_grad_enabled()  # one chunk: nothing to save by recomputing
        parts.append(recompute(_chunk_losses, head, h, lab, use_reentrant=False) if several
                     else _chunk_losses(head, h, lab))
    return torch.cat(parts, dim=1)


class LossModule(nn.Module):
    """The summed token loss of a batch, as a module: DDP must wrap the whole forward that feeds the backward."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_losses(self.peft_model, batch).sum()


def _rng_state() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointing:
    """Where and how often a training loop checkpoints, and what it resumes from (hfprune.checkpoints)."""

    def __init__(self, root, every: int | None, meta: dict, resume: dict | None = None):
        self.root, self.every, self.meta, self.resume = root, every, meta, resume


def _gather(accelerator, obj) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def train_lora(model: nn.Module, rows: list[Row], rcfg: dict, *, steps: int, seed: int, pad_id: int,
               device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None, accelerator=None,
               checkpointing: Checkpointing | None = None, stop=None, progress=None):
    """Apply LoRA to `model` and train it for `steps` optimizer steps on `rows`; returns (peft model, history).

    Each step takes `rows_per_step` rows (this process: its share, see above) and normalises by the step's
    labelled-token count, so the logged loss is the mean token loss of the step whatever the padding, packing and
    process count. With `autocast_dtype` the forward runs under autocast (the loss stays fp32). `accelerator`: an
    accelerate Accelerator under torchrun (None: one process). `checkpointing`: checkpoint every `every` steps and
    when `stop` (hfprune.checkpoints.StopFlag) has a signal, then raise Stopped; resume from its `resume` state.
    `progress(step, metrics)`: called on the main process every `log_every` steps.
    """
    from transformers import get_scheduler

    from hfprune import checkpoints

    device = torch.device(device)
    n_proc = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    main = rank == 0
    per_process = accumulation(rcfg, n_proc)
    peft_model = apply_lora(model, rcfg["lora"], seed, rcfg.get("gradient_checkpointing", False)).to(device)
    torch.manual_seed(seed + rank)  # LoRA dropout: the same init everywhere, a different mask per process
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rcfg["learning_rate"], weight_decay=WEIGHT_DECAY)
    scheduler = get_scheduler(SCHEDULES[rcfg["schedule"]], optimizer, num_warmup_steps=rcfg["warmup_steps"],
                              num_training_steps=steps)
    module = LossModule(peft_model)
    if n_proc > 1:
        module = accelerator.prepare_model(module)
    stream = micro_batches(len(rows), rcfg["batch_size"], seed)
    losses, lrs, start = [], [], 0
    resume = checkpointing.resume if checkpointing else None
    if resume is not None:
        peft_model.load_state_dict(resume["adapter"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        losses, lrs, start = list(resume["loss_curve"]), list(resume["lr_curve"]), resume["step"]
        for _ in range(start * per_process * n_proc):  # the data position: the stream's first steps are done
            next(stream)
        if len(resume["rng"]) == n_proc:
            _set_rng_state(resume["rng"][rank])
    log_every = rcfg.get("log_every") or max(1, steps // 20)
    every = checkpointing.every if checkpointing else None
    peft_model.train()
    clock, tokens_seen = time.perf_counter(), 0
    for step in range(start, steps):
        shares = [next(stream) for _ in range(per_process * n_proc)][rank::n_proc]
        batches = [collate([rows[i] for i in ids], pad_id) for ids in shares]
        local = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)], device=device)
        labelled = int(accelerator.reduce(local, "sum")) if n_proc > 1 else int(local)
        # at least 1: a step of prompt-only rows (kept by the released recipe) has no loss, not a NaN
        n_tokens = max(1, labelled)
        total = torch.zeros((), device=device)
        for j, batch in enumerate(batches):
            sync = n_proc == 1 or j == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = module({k: v.to(device) for k, v in batch.items()}) / n_tokens
                (loss * n_proc).backward()  # DDP averages gradients over processes; the step wants their sum
            total += loss.detach()
        if n_proc > 1:
            total = accelerator.reduce(total, "sum")
        total = float(total)
        if not math.isfinite(total):
            raise HFPruneError(f"recovery: training loss became {total} at step {step + 1}; lower "
                               "recovery.learning_rate")
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        tokens_seen += labelled
        done = step + 1
        if main and (done % log_every == 0 or done == steps):
            elapsed = time.perf_counter() - clock
            # the loss of the step as it goes (recovery_loss, the whole curve, is logged once at the end)
            metrics = {"recovery_progress_loss": total, "recovery_rows": done * rows_per_step(rcfg),
                       "recovery_tokens_per_s": tokens_seen / elapsed, "recovery_lr": lrs[-1],
                       "recovery_eta_s": elapsed / (done - start) * (steps - done)}
            log.info("recovery step %d/%d: rows %d, loss %.4f, lr %.3g, %.0f tokens/s, ETA %.2f h", done, steps,
                     metrics["recovery_rows"], total, lrs[-1], metrics["recovery_tokens_per_s"],
                     metrics["recovery_eta_s"] / 3600)
            if progress is not None:
                progress(done, metrics)
        if checkpointing is None or done == steps:
            continue
        signalled = torch.tensor([float(bool(stop and stop.signal))], device=device)
        if n_proc > 1:  # every process stops at the same step, when any was signalled
            signalled = accelerator.reduce(signalled, "sum")
        if (every and done % every == 0) or signalled.item():
            state = {"adapter": {k: v.detach().cpu() for k, v in peft_model.state_dict().items() if "lora_" in k},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": done,
                     "loss_curve": losses, "lr_curve": lrs, "rng": _gather(accelerator, _rng_state())}
            if main:
                path = checkpoints.save(checkpointing.root, done, state, {**checkpointing.meta, "processes": n_proc})
                log.info("recovery: checkpoint at step %d/%d in %s", done, steps, path)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if signalled.item():
                raise checkpoints.Stopped(f"recovery stopped by a signal after step {done}/{steps}; checkpoint in "
                                          f"{checkpointing.root}: rerun the job to resume")
    peft_model.eval()
    trainable = sum(p.numel() for p in params)
    return peft_model, {"loss_curve": losses, "lr_curve": lrs, "trainable_params": trainable}
