"""Scores + target ratio -> kept neuron indices per layer (a small JSON; see docs/CONTRACTS.md).

`ratio` is the fraction of ALL model parameters removed (embeddings and lm_head included), as in the paper.
With a uniform allocation every layer removes round(ratio * params / (layers * params_per_neuron)) neurons,
which reproduces the paper's table from model configs alone. `global` allocation keeps the same total
number of neurons but ranks layer-normalised scores across layers, with a per-layer floor. `scope: mlp+attn`
also removes whole KV groups (a KV head, its query heads and their o_proj columns); their parameters count
toward the ratio, so fewer MLP neurons are removed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from hfprune.adapters import adapter_class
from hfprune.config import format_ratio  # noqa: F401  (the report and tracking.py import it from here still)
from hfprune.errors import ConfigError, HFPruneError


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def params_per_kv_group(config, family: str) -> int:
    """Parameters removed with one KV group: its q heads' q rows and o columns, its k and v rows (+ biases)."""
    d, h = _head_dim(config), config.hidden_size
    n_rep = config.num_attention_heads // config.num_key_value_heads
    q = n_rep * d
    per = 2 * q * h + 2 * d * h
    # the adapter's bias arithmetic with q_out/kv_out of one group (o_proj's bias is not per group)
    bias = adapter_class(family).attention_bias_params(config, q, d)
    if bias:
        bias -= h if getattr(config, "attention_bias", False) else 0
    return per + bias


def kv_groups_removed(config, kv_fraction: float) -> int:
    return round(kv_fraction * config.num_key_value_heads)


def neurons_to_keep(config, ratio: float, family: str, kv_fraction: float = 0.0) -> int:
    """MLP neurons kept per layer so that `ratio` of all parameters is removed (uniform allocation)."""
    cls = adapter_class(family)
    total = cls.count_params(config)
    n_layers = config.num_hidden_layers
    attn_removed = n_layers * kv_groups_removed(config, kv_fraction) * params_per_kv_group(config, family)
    removed = round((ratio * total - attn_removed) / (n_layers * cls.params_per_mlp_neuron(config)))
    keep = config.intermediate_size - max(removed, 0)
    if keep < 1:
        raise ConfigError(f"ratio {ratio} removes {removed} neurons per layer but layers only have "
                          f"{config.intermediate_size}; choose a smaller ratio")
    return keep


def check_feasible(model_config, ratio: float, family: str, allocation: str = "uniform", scope: str = "mlp",
                   min_keep_fraction: float = 0.05, kv_fraction: float = 0.0) -> tuple[int, int, int]:
    """(neurons kept per layer on average, per-layer floor of global allocation, KV groups removed per layer).

    Everything about a plan that the model's config decides, so that configs are checked before any scoring.
    """
    if allocation not in ("uniform", "global"):
        raise ConfigError(f"pruning.allocation: unknown value {allocation!r}; choose uniform or global")
    if scope not in ("mlp", "mlp+attn"):
        raise ConfigError(f"pruning.scope: unknown value {scope!r}; choose mlp or mlp+attn")
    adapter_class(family).check_scope(scope)
    if scope == "mlp":
        kv_fraction = 0.0
    keep = neurons_to_keep(model_config, ratio, family, kv_fraction)
    floor = max(1, math.ceil(min_keep_fraction * model_config.intermediate_size)) if allocation == "global" else 1
    if keep < floor:
        raise ConfigError(f"ratio {ratio} keeps {keep} neurons per layer on average, below the per-layer floor "
                          f"{floor} (pruning.min_keep_fraction); lower the ratio or the floor")
    n_kv = model_config.num_key_value_heads
    kv_remove = kv_groups_removed(model_config, kv_fraction)
    if kv_remove >= n_kv:
        raise ConfigError(f"pruning.attn_kv_group_fraction {kv_fraction} would remove all {n_kv} KV groups")
    return keep, floor, kv_remove


def removed_params(config, family: str, mlp_keep: list, kv_keep: list) -> int:
    """Parameters removed by per-layer kept MLP neurons and kept KV groups (None: all kept): what ratios count."""
    mlp = sum(config.intermediate_size - len(k) for k in mlp_keep) * adapter_class(family).params_per_mlp_neuron(config)
    return mlp + _kv_removed_params(config, family, kv_keep)


def _kv_removed_params(config, family: str, kv_keep: list) -> int:
    groups = sum(config.num_key_value_heads - len(k) for k in kv_keep if k is not None)
    return groups * params_per_kv_group(config, family)


def _check_keep(field: str, keep, size: int, unit: str) -> None:
    if not isinstance(keep, list) or not keep:
        raise HFPruneError(f"{field} must be a non-empty list of {unit} indices")
    for x in keep:
        if not isinstance(x, int) or isinstance(x, bool):
            raise HFPruneError(f"{field} holds {x!r}, not an integer {unit} index")
        if not 0 <= x < size:
            raise HFPruneError(f"{field} holds {unit} {x}, outside 0..{size - 1}")
    for a, b in itertools.pairwise(keep):
        if b == a:  # pruning would copy the same neuron twice into the smaller layer
            raise HFPruneError(f"{field} repeats {unit} {a}")
        if b < a:
            raise HFPruneError(f"{field} is not sorted ({a} before {b})")


def check_indices(plan: dict, mlp_sizes: list[int], kv_heads: list[int]) -> None:
    """One entry per layer, each keeping a non-empty, strictly increasing list of integer indices below the
    layer's size (MLP neurons; KV groups, or null for all)."""
    layers = plan["layers"]
    if len(layers) != len(mlp_sizes):
        raise HFPruneError(f"plan has {len(layers)} layers, the model {len(mlp_sizes)}; "
                           "was the plan made for another model?")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise HFPruneError(f"layers[{i}] must be an object with mlp_keep and kv_keep")
        _check_keep(f"layers[{i}].mlp_keep", entry.get("mlp_keep"), mlp_sizes[i], "neuron")
        if entry.get("kv_keep") is not None:
            _check_keep(f"layers[{i}].kv_keep", entry["kv_keep"], kv_heads[i], "KV group")


def check_counts(plan: dict, config) -> None:
    """The sizes and counts a plan records (those `make_plan` writes; hand-made plans may omit them) agree with
    its indices and with the model: a plan edited by hand, or made for another model, stops here."""
    cls = adapter_class(config)
    layers = plan["layers"]
    for key in ("intermediate_size_dense", "params_dense", "params_pruned", "achieved_ratio", "ratio"):
        if key in plan and (not isinstance(plan[key], (int, float)) or isinstance(plan[key], bool)):
            raise HFPruneError(f"{key} is {plan[key]!r}, not a number")
    if plan.get("intermediate_size_dense", config.intermediate_size) != config.intermediate_size:
        raise HFPruneError(f"intermediate_size_dense is {plan['intermediate_size_dense']}, the model's layers have "
                           f"{config.intermediate_size} neurons; was the plan made for another model?")
    dense = cls.count_params(config)
    if plan.get("params_dense", dense) != dense:
        raise HFPruneError(f"params_dense is {plan['params_dense']}, the model has {dense} parameters; "
                           "was the plan made for another model?")
    removed = removed_params(config, cls.family, [e["mlp_keep"] for e in layers], [e.get("kv_keep") for e in layers])
    kept = [len(e["mlp_keep"]) for e in layers]
    if plan.get("params_pruned", dense - removed) != dense - removed:
        raise HFPruneError(f"params_pruned is {plan['params_pruned']}, but its layers (keeping {sum(kept)} neurons) "
                           f"leave {dense - removed}: edited by hand? make it again with `hfprune plan`")
    if not math.isclose(plan.get("achieved_ratio", removed / dense), removed / dense, rel_tol=1e-9):
        raise HFPruneError(f"achieved_ratio is {plan['achieved_ratio']}, but its layers remove "
                           f"{removed / dense:.6f} of the parameters: edited by hand? make it again with `hfprune plan`")
    if "ratio" in plan and "params_pruned" in plan:
        # make_plan misses the ratio by under a neuron per layer (rounding), or overshoots by the KV groups
        # it removes when they alone exceed the ratio
        kv = _kv_removed_params(config, cls.family, [e.get("kv_keep") for e in layers])
        slack = (config.num_hidden_layers * cls.params_per_mlp_neuron(config) + kv) / dense
        if abs(removed / dense - plan["ratio"]) > slack:
            raise HFPruneError(f"ratio is {plan['ratio']}, but its layers remove {removed / dense:.4f} of the "
                               "parameters: edited by hand? make it again with `hfprune plan`")


def _as_array(scores) -> np.ndarray:
    """fp32 numpy view of a score vector: a numpy array (the plan job reads safetensors as numpy, so it never
    imports torch) or a torch tensor (scorer, tests)."""
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu()
    return np.asarray(scores, dtype=np.float32)


def _topk_sorted(scores, k: int) -> list[int]:
    # descending with ties broken by index (a stable sort of the negated scores, as torch.sort(stable=True)
    # orders them), so equal scores give a reproducible plan
    order = np.argsort(-_as_array(scores), kind="stable")[:k]
    return sorted(order.tolist())


def make_plan(scores: dict, model_config, ratio: float, family: str,
              allocation: str = "uniform", scope: str = "mlp", min_keep_fraction: float = 0.05,
              kv_fraction: float = 0.0, meta: dict | None = None, scores_name: str = "scores") -> dict:
    """Kept indices per layer from score tensors `mlp.<i>` (and `attn_kv.<i>` for scope mlp+attn); `scores_name`
    names them in errors (e.g. the score file)."""
    n_layers, size = model_config.num_hidden_layers, model_config.intermediate_size
    cls = adapter_class(family)
    layer_scores = []
    for i in range(n_layers):
        s = scores.get(f"mlp.{i}")
        if s is None or tuple(s.shape) != (size,):
            raise ConfigError(f"{scores_name}: missing or wrong-sized tensor 'mlp.{i}' (expected {size} values); "
                              "were they computed for this model?")
        layer_scores.append(_as_array(s))
    keep, floor, kv_remove = check_feasible(model_config, ratio, family, allocation, scope, min_keep_fraction,
                                            kv_fraction)
    if allocation == "uniform":
        mlp_keep = [_topk_sorted(s, keep) for s in layer_scores]
    else:
        mlp_keep = _global_keep(layer_scores, keep * n_layers, floor)
    n_kv = model_config.num_key_value_heads
    kv_keep: list = [None] * n_layers
    if scope == "mlp+attn":
        for i in range(n_layers):
            s = scores.get(f"attn_kv.{i}")
            if s is None or tuple(s.shape) != (n_kv,):
                raise ConfigError(f"{scores_name}: missing or wrong-sized tensor 'attn_kv.{i}' (expected {n_kv} "
                                  "values) needed by pruning.scope mlp+attn; score with scope mlp+attn")
            kv_keep[i] = _topk_sorted(s, n_kv - kv_remove)
    dense = cls.count_params(model_config)
    removed = removed_params(model_config, family, mlp_keep, kv_keep)
    return {**(meta or {}), "family": family, "ratio": ratio, "allocation": allocation, "scope": scope,
            "params_dense": dense, "params_pruned": dense - removed, "achieved_ratio": removed / dense,
            "intermediate_size_dense": size,
            "layers": [{"mlp_keep": m, "kv_keep": k} for m, k in zip(mlp_keep, kv_keep)]}


def _global_keep(layer_scores: list[np.ndarray], budget: int, floor: int) -> list[list[int]]:
    """Keep the `budget` neurons with the highest layer-normalised scores, at least `floor` per layer."""
    # scores of different layers live on different scales; dividing by the layer mean makes them comparable
    tiny = np.finfo(np.float32).tiny
    norm = [s / np.float32(max(s.mean(dtype=np.float64), tiny)) for s in layer_scores]
    chosen = [set(_topk_sorted(s, floor)) for s in norm]
    rest = budget - floor * len(norm)  # >= 0: check_feasible
    cand_scores, cand_ids = [], []
    for layer, s in enumerate(norm):
        mask = np.ones(len(s), dtype=bool)
        mask[list(chosen[layer])] = False
        idx = np.flatnonzero(mask)
        cand_scores.append(s[idx])
        cand_ids.append(np.stack([np.full_like(idx, layer), idx], 1))
    all_scores, all_ids = np.concatenate(cand_scores), np.concatenate(cand_ids)
    top = np.argsort(-all_scores, kind="stable")[:rest]
    for layer, idx in all_ids[top].tolist():
        chosen[layer].add(idx)
    return [sorted(c) for c in chosen]
