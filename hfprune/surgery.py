"""Apply a plan: as a 0/1 mask on an unpruned model, or physically by slicing the Linear layers.

A plan's `layers[i]` holds `mlp_keep` (kept intermediate neurons) and `kv_keep` (kept KV groups, or None).
Removing KV group j removes k/v head j and the `n_rep` query heads that share it (heads j*n_rep ..), plus their
o_proj input columns; zeroing those o_proj inputs is exactly equivalent, which is what the mask does.

Saved checkpoints: a plan that keeps the same sizes in every layer only changes `intermediate_size` (and head
counts), so the folder loads with plain `AutoModelForCausalLM.from_pretrained`. A non-uniform plan records
per-layer sizes in `config.hfprune_intermediate_sizes` / `config.hfprune_num_key_value_heads` and must be
loaded with `load_pruned(path)`, which builds the dense architecture, shrinks each layer and loads the weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from hfprune.adapters import get_adapter
from hfprune.errors import HFPruneError
from hfprune.plan import check_counts, check_indices
from hfprune.runtime import atomic_path, read_json, read_safetensors, reading


def _head_indices(kv_keep, n_rep: int, head_dim: int) -> torch.Tensor:
    """Feature indices of the query heads that belong to the kept KV groups."""
    heads = [g * n_rep + r for g in kv_keep for r in range(n_rep)]
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _kv_indices(kv_keep, head_dim: int) -> torch.Tensor:
    return torch.tensor([g * head_dim + d for g in kv_keep for d in range(head_dim)], dtype=torch.long)


def check_plan(adapter, plan: dict) -> None:
    """The plan's layer count and indices fit the model behind `adapter` (shapes only)."""
    layers = range(adapter.num_layers)
    check_indices(plan, [adapter.mlp(i).down.in_features for i in layers],
                  [adapter.attention(i).num_kv_heads for i in layers])
    if any(e.get("kv_keep") is not None and len(e["kv_keep"]) < adapter.attention(i).num_kv_heads
           for i, e in enumerate(plan["layers"])):
        adapter.check_scope("mlp+attn")  # families whose attention cannot lose KV groups refuse by name


def read_plan(plan_path: str | os.PathLike, model_name: str, base_config=None) -> dict:
    """Read a plan JSON made for `model_name`; with `base_config` (the dense model's config), also check it against
    that model before any weight is read: one entry per layer, indices unique, sorted and within the layer, and
    the recorded sizes and parameter counts consistent with them (hfprune.plan.check_indices / check_counts)."""
    path = Path(plan_path)
    if not path.is_file():
        raise HFPruneError(f"plan file {str(path)!r} does not exist; run `hfprune plan` first")
    plan = read_json(path, "plan file")
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list):
        raise HFPruneError(f"plan file {str(path)!r}: expected an object with a `layers` list (docs/CONTRACTS.md)")
    if plan.get("model", model_name) != model_name:
        raise HFPruneError(f"plan file {str(path)!r} is for model {plan['model']!r}, not {model_name!r}")
    if base_config is not None:
        layers = base_config.num_hidden_layers
        try:
            check_indices(plan, [base_config.intermediate_size] * layers, [base_config.num_key_value_heads] * layers)
            check_counts(plan, base_config)
        except HFPruneError as exc:
            raise HFPruneError(f"plan file {str(path)!r} does not fit model {model_name!r}: {exc}") from None
    return plan


def input_mask(linear: nn.Linear, keep) -> torch.Tensor:
    """0/1 mask over `linear`'s input features (1 at `keep`), made on its weight's device and in its dtype, where
    the input it multiplies arrives (accelerate moves a module's inputs to its weight's device)."""
    w = linear.weight
    mask = torch.zeros(linear.in_features, device=w.device, dtype=w.dtype)
    return mask.index_fill_(0, torch.as_tensor(keep, dtype=torch.long).to(w.device), 1)


@contextlib.contextmanager
def neuron_mask(model, plan: dict):
    """Within the block, removed neurons (and KV groups) output zero: forward pre-hooks on down_proj/o_proj.
    Each mask is made once, on its module's device; a forward converts it only under autocast."""
    adapter = get_adapter(model)
    check_plan(adapter, plan)
    handles = []

    def hook_for(mask: torch.Tensor):
        def pre_hook(module, args):
            x = args[0]
            m = mask if (mask.device, mask.dtype) == (x.device, x.dtype) else mask.to(x.device, x.dtype)
            return (x * m,) + args[1:]
        return pre_hook

    for i, entry in enumerate(plan["layers"]):
        mlp = adapter.mlp(i)
        handles.append(mlp.down.register_forward_pre_hook(hook_for(input_mask(mlp.down, entry["mlp_keep"]))))
        if entry.get("kv_keep") is not None:
            attn = adapter.attention(i)
            n_rep = attn.num_heads // attn.num_kv_heads
            keep = _head_indices(entry["kv_keep"], n_rep, attn.head_dim)
            handles.append(attn.o.register_forward_pre_hook(hook_for(input_mask(attn.o, keep))))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _slice_linear(linear: nn.Linear, out_idx=None, in_idx=None) -> None:
    """Keep rows `out_idx` / columns `in_idx` of a Linear in place (bias follows the rows)."""
    w = linear.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, out_idx.to(w.device)).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = w.shape[0]
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
        linear.in_features = w.shape[1]
    linear.weight = nn.Parameter(w.contiguous(), requires_grad=linear.weight.requires_grad)


def prune_model(model, plan: dict):
    """Physically remove the plan's dropped neurons (and KV groups) in place; returns the model."""
    adapter = get_adapter(model)
    check_plan(adapter, plan)
    config = model.config
    sizes, kv_heads = [], []
    for i, entry in enumerate(plan["layers"]):
        mlp = adapter.mlp(i)
        keep = torch.tensor(sorted(entry["mlp_keep"]), dtype=torch.long)
        for linear, rows in mlp.row_slices(keep):
            _slice_linear(linear, out_idx=rows)
        _slice_linear(mlp.down, in_idx=keep)
        sizes.append(len(keep))
        attn = adapter.attention(i)
        kv_keep = entry.get("kv_keep")
        if kv_keep is not None and len(kv_keep) < attn.num_kv_heads:
            kv_keep = sorted(kv_keep)
            n_rep = attn.num_heads // attn.num_kv_heads
            q_idx = _head_indices(kv_keep, n_rep, attn.head_dim)
            kv_idx = _kv_indices(kv_keep, attn.head_dim)
            _slice_linear(attn.q, out_idx=q_idx)
            _slice_linear(attn.k, out_idx=kv_idx)
            _slice_linear(attn.v, out_idx=kv_idx)
            _slice_linear(attn.o, in_idx=q_idx)
            adapter.set_attention_heads(i, len(kv_keep) * n_rep, len(kv_keep))
        kv_heads.append(adapter.attention(i).num_kv_heads)
    head_dim = adapter.attention(0).head_dim
    n_rep = config.num_attention_heads // config.num_key_value_heads
    config.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer holds after head removal
    for attr in ("hfprune_intermediate_sizes", "hfprune_num_key_value_heads"):
        if hasattr(config, attr):
            delattr(config, attr)
    if len(set(sizes)) == 1:
        config.intermediate_size = sizes[0]
    else:
        config.hfprune_intermediate_sizes = sizes
    if len(set(kv_heads)) == 1:
        config.num_key_value_heads = kv_heads[0]
        config.num_attention_heads = kv_heads[0] * n_rep
    else:
        config.hfprune_num_key_value_heads = kv_heads
    return model


def write_pruned(model, tokenizer, folder: str | os.PathLike) -> None:
    """Write a (pruned) model + tokenizer into `folder` as an HF checkpoint; not atomic (see `save_pruned`), and
    other files in the folder stay."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pruned(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a (pruned) model + tokenizer as an HF folder, atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        write_pruned(model, tokenizer, tmp)
    return out_dir


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """Load a folder written by `save_pruned`, uniform or not (non-uniform folders need this loader), with the
    attention kernel pinned."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    with reading(path / "config.json", "model config"):
        config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, "hfprune_intermediate_sizes", None)
    kv_heads = getattr(config, "hfprune_num_key_value_heads", None)
    if sizes is None and kv_heads is None:
        with reading(path, "model folder"):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                        attn_implementation=attn_implementation).eval()
    n_layers = config.num_hidden_layers
    sizes = sizes or [config.intermediate_size] * n_layers
    kv_heads = kv_heads or [config.num_key_value_heads] * n_layers
    n_rep = config.num_attention_heads // config.num_key_value_heads
    dense = config.__class__.from_dict({**config.to_dict(), "intermediate_size": max(sizes),
                                        "num_key_value_heads": max(kv_heads),
                                        "num_attention_heads": max(kv_heads) * n_rep})
    for attr in ("hfprune_intermediate_sizes", "hfprune_num_key_value_heads"):
        if hasattr(dense, attr):
            delattr(dense, attr)
    model = AutoModelForCausalLM.from_config(dense, dtype=dtype or config.dtype,
                                             attn_implementation=attn_implementation)
    # shrinking with a keep-the-first-n plan gives the right shapes; the weights are overwritten below
    prune_model(model, {"layers": [{"mlp_keep": list(range(s)), "kv_keep": list(range(k))}
                                   for s, k in zip(sizes, kv_heads)]})
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(read_safetensors(f, "model weights")[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise HFPruneError(f"{path}: checkpoint does not match its config (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.eval()
