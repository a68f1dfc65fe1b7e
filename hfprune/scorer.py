"""Score every MLP neuron (and KV group) of a model with one or more criteria.

Gradient criteria use activation gradients only: all parameters are frozen and the input embeddings are a
leaf that requires grad, so autograd builds the graph but never computes or stores a parameter gradient.
Per batch: one forward captures h (input of every down_proj) and the final hidden state H; dC/dH is computed
chunk by chunk over the counted tokens (fp32 logits exist for one chunk only, which matters with a 152k
vocabulary), in closed form where the criterion has one;
then one backward per criterion from H, with dC/dH as grad_output, reaches every h. A tensor hook on each h
turns its gradient into the score contribution right away (fp32), so per-layer gradients are freed as the
backward proceeds. Several gradient criteria share the forward (the graph is retained between them).

Positions: padding never counts. A criterion that reads the next token (`uses_labels`: CE, KD, fisher) counts
a position when it holds a real token AND has a real next token (the last position is excluded); a label-free
one (entropy, top-K entropy) counts every real position, the last included, as the released HFPrune code does.
C is the mean over the criterion's counted positions of the batch; the neuron score is the sum over those
tokens of token_scores(h_i * dC/dh_i).

`taylor_kd` runs as SDMPrune does: CE scores (shared with a requested `taylor_ce`) -> a uniform pre-prune
(`preprune_keep`, int(3.9 x hidden) neurons per layer by default; none where that is the whole layer) -> the
student (dense weights + 0/1 neuron mask) is scored against the unmasked dense
model's outputs, computed in a separate no-grad forward: no teacher copy is held in memory.

Weight-level methods (`ParameterGradientCriterion`: `sdmprune`, `llm_pruner`) differentiate the same chunked
output loss (dC/dH from `_output_gradients`) back to the MLP weights, the only parameters that then require
grad, and hand each layer's (W, dC/dW) to the criterion: per sequence, or once from the fp32 sum over batches.
`sdmprune` pre-prunes with its own CE weight score, as SDMPrune's released code does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from hfprune.adapters import get_adapter
from hfprune.criteria import (
    ActivationCriterion,
    Criterion,
    GradientCriterion,
    ParameterGradientCriterion,
    WeightCriterion,
    get_criterion,
)
from hfprune.criteria.base import group_sum
from hfprune.errors import ConfigError, HFPruneError
from hfprune.placement import PerDevice, model_devices, peak_memory_mb, reset_peak_memory
from hfprune.scorer_core import (
    _Capture,
    _check_finite,
    _decoder_forward,
    _output_gradients,
    _progress,
    counted_positions,
    next_token_labels,
)
from hfprune.scorer_weights import _parameter_scores

log = logging.getLogger(__name__)


@torch.no_grad()
def _mean_abs_inputs(model, adapter, batches, attn: bool, progress: bool) -> tuple[dict, int]:
    """Mean |input| of every down_proj (and o_proj) over the counted calibration tokens (fp32)."""
    sums: dict[str, torch.Tensor] = {}
    capture = _Capture(adapter, attn)
    tokens = 0
    try:
        for ids, mask in _progress(batches, progress, "activation"):
            valid = counted_positions(mask)
            tokens += int(valid.sum())
            weights = PerDevice(valid.unsqueeze(-1).float())  # one copy per device and batch
            capture.active = True
            _decoder_forward(model, adapter, ids, mask, grad=False)
            capture.active = False
            for i in range(adapter.num_layers):
                pairs = [(f"mlp.{i}", capture.h[i])] + ([(f"attn_kv.{i}", capture.o[i])] if attn else [])
                for key, x in pairs:
                    s = (x.float().abs() * weights.on(x.device)[0]).sum((0, 1))
                    sums[key] = s if key not in sums else sums[key] + s
            capture.clear()
    finally:
        capture.remove()
    return {k: v / max(tokens, 1) for k, v in sums.items()}, tokens



# --- gradient criteria -------------------------------------------------------------------------------------
def _gradient_scores(model, adapter, batches, criteria: list[GradientCriterion], attn: bool, chunk: int | None,
                     progress: bool, mask_plan: dict | None = None) -> tuple[dict, int]:
    """One shared forward per batch, one backward per criterion (see the module docstring)."""
    from hfprune.surgery import neuron_mask

    needs_teacher = any(c.needs_teacher for c in criteria)
    acc: list[dict[str, torch.Tensor]] = [{} for _ in criteria]
    # valid: the counted positions of each criterion; on_device: their copies on each device, made once per batch
    state = {"k": 0, "batch": 0, "valid": None, "on_device": None}
    tokens = 0

    def accumulate(key: str, store: list, i: int, groups: int | None):
        def hook(g):  # no host sync in here: the non-finite check runs once per batch, after the backward
            crit = criteria[state["k"]]
            x = store[i]
            if state["k"] + 1 == len(criteria):
                store[i] = None  # last use: free h while the backward goes on
            contrib = x.float() * g.float()
            if groups is not None:
                contrib = group_sum(contrib, groups)
            v = state["on_device"].on(contrib.device)[state["k"]]
            s = (crit.token_scores(contrib) * v).sum((0, 1))
            total = acc[state["k"]]
            total[key] = s if key not in total else total[key] + s
        return hook

    capture = _Capture(adapter, attn)
    names = "+".join(c.name for c in criteria)
    try:
        for b, (ids, mask) in enumerate(_progress(batches, progress, names)):
            labelled = counted_positions(mask)
            real = counted_positions(mask, labelled=False)
            state["batch"], state["valid"] = b, [labelled if c.uses_labels else real for c in criteria]
            state["on_device"] = PerDevice(*(v.unsqueeze(-1) for v in state["valid"]))
            labels = next_token_labels(ids, labelled)
            tokens += max(int(v.sum()) for v in state["valid"])
            teacher_H = None
            if needs_teacher:  # the dense model, without the student's pre-prune mask
                teacher_H = _decoder_forward(model, adapter, ids, mask, grad=False)
            # the mask stays on through the backward: gradient checkpointing recomputes the masked forward
            with neuron_mask(model, mask_plan) if mask_plan else contextlib.nullcontext():
                capture.active = True
                H = _decoder_forward(model, adapter, ids, mask, grad=True)
                capture.active = False
                for i in range(adapter.num_layers):
                    capture.h[i].register_hook(accumulate(f"mlp.{i}", capture.h, i, None))
                    if attn:
                        groups = adapter.attention(i).num_kv_heads
                        capture.o[i].register_hook(accumulate(f"attn_kv.{i}", capture.o, i, groups))
                grads = _output_gradients(model, H, criteria, labels, state["valid"], teacher_H, chunk,
                                          adapter.logits_transform())
                # the earliest captured tensor: a backward that reaches it passes every other one
                first = capture.o[0] if attn else capture.h[0]
                for k in range(len(criteria)):
                    state["k"] = k
                    last = k + 1 == len(criteria)
                    torch.autograd.grad(H, first, grad_outputs=grads[k], retain_graph=not last)
                    grads[k] = None
                del H, grads, first
            capture.clear()
            for crit, total in zip(criteria, acc):  # a non-finite contribution stays non-finite in the sums
                _check_finite(total, f"criterion {crit.name!r}", f"at batch {b}")
    finally:
        capture.remove()
    return [{k: v.cpu() for k, v in a.items()} for a in acc], tokens


# --- entry points ------------------------------------------------------------------------------------------
def score_model(model, batches, criteria: list[Criterion | str], *, scope: str = "mlp", seed: int = 0,
                logits_chunk: int | None = None, gradient_checkpointing: bool = False,
                progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{criterion name: {"mlp.<i>": [intermediate] fp32, ("attn_kv.<i>": [num_kv_heads])}}.

    `batches`: LongTensors [B, T] or dicts with input_ids and attention_mask. Gradient criteria requested
    together share one forward per batch (`taylor_kd` needs its own, masked, student forward).
    """
    return _score(model, batches, criteria, scope=scope, seed=seed, logits_chunk=logits_chunk,
                  gradient_checkpointing=gradient_checkpointing, progress=progress)[0]


def _score(model, batches, criteria, *, scope, seed, logits_chunk, gradient_checkpointing, progress):
    crits = [get_criterion(c) if isinstance(c, str) else c for c in criteria]
    adapter = get_adapter(model)
    adapter.check_scope(scope)
    for c in crits:
        c.check_scope(scope)
    attn = scope == "mlp+attn"
    batches = list(batches)
    out: dict[str, dict] = {}
    tokens = 0
    was_training = model.training
    saved_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # frozen; a weight-level criterion unfreezes the MLP weights for its pass
        p.requires_grad_(False)
    if gradient_checkpointing:
        # HF checkpoints layers only in training mode; these families have no active dropout at p=0
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        for c in crits:
            if isinstance(c, WeightCriterion):
                out[c.name] = c.weight_scores(adapter, seed, attn)
        act = [c for c in crits if isinstance(c, ActivationCriterion)]
        if act:  # one forward pass serves every activation criterion
            mean_abs, tokens = _mean_abs_inputs(model, adapter, batches, attn, progress)
            out.update({c.name: c.activation_scores(adapter, mean_abs, attn) for c in act})
        kd = [c for c in crits if c.needs_teacher]
        # the pre-prunes need CE scores: computed with the other criteria (shared with a requested one)
        pre = {}
        for c in kd:
            if _preprunes(c.options["preprune_keep"], adapter):
                p = c.preprune_criterion()
                pre.setdefault(p.name, next((x for x in crits if x.name == p.name), p))
        todo = [c for c in crits if c.requires_gradient and not c.needs_teacher]
        todo += [p for p in pre.values() if p not in todo]
        grad = [c for c in todo if not isinstance(c, ParameterGradientCriterion)]
        scores: dict[str, dict] = {}
        if grad:
            results, tokens = _gradient_scores(model, adapter, batches, grad, attn, logits_chunk, progress)
            scores.update({c.name: r for c, r in zip(grad, results)})
        for c in todo:
            if isinstance(c, ParameterGradientCriterion):
                scores[c.name], tokens = _parameter_scores(model, adapter, batches, c, logits_chunk, progress)
        for c in kd:
            plan = _preprune_plan(c, scores.get(c.preprune_criterion().name), model.config, adapter)
            if isinstance(c, ParameterGradientCriterion):
                scores[c.name], tokens = _parameter_scores(model, adapter, batches, c, logits_chunk, progress,
                                                           mask_plan=plan)
            else:
                (scores[c.name],), tokens = _gradient_scores(model, adapter, batches, [c], attn, logits_chunk,
                                                             progress, mask_plan=plan)
        out.update({c.name: scores[c.name] for c in crits if c.name in scores})
    finally:
        for p, flag in zip(model.parameters(), saved_flags):
            p.requires_grad_(flag)
        if gradient_checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
    return out, tokens


def preprune_removes(keep: dict | None, hidden: int, intermediate: int) -> bool:
    """Whether a `preprune_keep` setting removes any neuron of a model (hidden size, largest MLP layer)."""
    if keep is None:
        return False
    if "ratio" in keep:
        return True
    return int(float(keep["hidden_multiple"]) * hidden) < intermediate


def _preprunes(keep: dict | None, adapter) -> bool:
    return preprune_removes(keep, adapter.mlp(0).down.out_features,
                            max(adapter.mlp(i).down.in_features for i in range(adapter.num_layers)))


def _preprune_plan(crit: Criterion, ce_scores: dict | None, config, adapter) -> dict | None:
    """The CE pre-prune of a KD criterion (SDMPrune): a uniform mask plan, or None where nothing is removed."""
    from hfprune.plan import _topk_sorted, make_plan

    keep = crit.options["preprune_keep"]
    if not _preprunes(keep, adapter):
        return None
    field = f"criterion_options.{crit.name}.preprune_keep"
    if "ratio" in keep:
        try:
            return make_plan(ce_scores, config, float(keep["ratio"]), adapter.family)
        except ConfigError as exc:
            raise ConfigError(f"{field}.ratio: {exc}") from None
    # as SDMPrune: k = int(multiple * hidden) neurons kept in every layer (top CE scores)
    k = int(float(keep["hidden_multiple"]) * adapter.mlp(0).down.out_features)
    if k < 1:
        raise ConfigError(f"{field}.hidden_multiple: keeps {k} neurons")
    return {"layers": [{"mlp_keep": _topk_sorted(ce_scores[f"mlp.{i}"], k), "kv_keep": None}
                       for i in range(adapter.num_layers)]}


def calibration_batches(tokens: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": tokens[s:s + batch_size], "attention_mask": torch.ones_like(tokens[s:s + batch_size])}
            for s in range(0, len(tokens), batch_size)]


def run_scoring(cfg: dict, model_name: str, criterion: str, out_path: str | Path, ratio=None) -> dict:
    """Score one model x criterion from a validated config; write `<out>.safetensors` + `<out>.json`.

    `ratio`: the pruning ratio the scores serve, needed (only) by a criterion with per-ratio options
    (criterion_options.<c>.by_ratio); recorded in the sidecar.

    Returns the summary (seconds, peak_memory_mb, tokens, ...), which is also the sidecar's `run` entry.
    The safetensors header holds no timestamp, so the same seed gives a byte-identical file.
    """
    from safetensors.torch import save_file

    from hfprune.config import criterion_options, model_entry, per_ratio
    from hfprune.data import hub_datasets_dir, load_texts, text_source, texts_hash
    from hfprune.models import ModelSpec, load_model
    from hfprune.resources import placement
    from hfprune.runtime import (
        atomic_path,
        deterministic_algorithms,
        package_versions,
        resolve_device,
        seed_everything,
        write_json,
    )
    from hfprune.timing import job_timing
    from hfprune.windows import sample_windows

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise HFPruneError(f"--out {str(out_path)!r} must end in .safetensors")
    if ratio is not None and not per_ratio(cfg, criterion):
        ratio = None  # its scores serve every ratio
    crit = get_criterion(criterion, criterion_options(cfg, criterion, ratio))
    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    if cfg["scoring"]["deterministic"]:
        deterministic_algorithms()  # before anything starts CUDA
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    loading = time.perf_counter()
    placed = placement(cfg, model_name, device)  # `device: cpu` means CPU: no device map there
    model, tok = load_model(spec, cfg["resources_dir"], dtype=cfg["dtype"],
                            attn_implementation=cfg["attn_implementation"], **placed)
    spec = spec.resolved(model.config)  # the family, where the config could not name it before the download
    if placed["device_map"] is None:
        model.to(device)
    devices = model_devices(model)
    reset_peak_memory(devices)
    cal = cfg["calibration"]
    tokens = torch.empty(0, dtype=torch.long)
    texts_sha256 = None
    if crit.requires_data:
        source = text_source(cal["source"], "calibration", hub_datasets_dir(cfg))
        texts = load_texts(source)
        texts_sha256 = texts_hash(texts)
        try:
            tokens = sample_windows(tok, texts, cal["num_sequences"], cal["seq_len"], cal["seed"],
                                    sampling=cal["sampling"])
        except HFPruneError as exc:
            raise HFPruneError(f"calibration.source {source.label!r}: {exc}") from None
    token_hash = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    scope = cfg["pruning"]["scope"]
    start = time.perf_counter()
    loaded = start - loading  # the model and the calibration windows
    scores, n_tokens = _score(model, calibration_batches(tokens, cal["batch_size"]), [crit], scope=scope,
                              seed=cal["seed"], logits_chunk=cfg["scoring"]["logits_chunk"],
                              gradient_checkpointing=cfg["scoring"]["gradient_checkpointing"], progress=True)
    seconds = time.perf_counter() - start
    peak = peak_memory_mb(devices)  # every device the model uses (a device map's GPUs summed)
    summary = {"seconds": round(seconds, 3), "peak_memory_mb": round(peak.pop("total"), 1),
               "peak_memory_mb_per_device": {d: round(v, 1) for d, v in peak.items()},
               "tokens": n_tokens, "device": str(device), "dtype": cfg["dtype"]}
    # the draw this file belongs to (the cell's seed label); `seeded` says whether the scores depend on it
    header = {"model": spec.name, "family": spec.family, "criterion": criterion, "scope": scope,
              "calibration_sha256": token_hash, "seed": cfg["seed"], "calibration_seed": cal["seed"],
              "seeded": crit.seeded, **({"ratio": float(ratio)} if ratio is not None else {})}
    sidecar = {"model": spec.name, "family": spec.family, "source": spec.source, "criterion": criterion,
               "criterion_options": crit.options, "ratio": None if ratio is None else float(ratio), "scope": scope,
               "calibration": {**({**{k: cal[k] for k in ("source", "sampling", "num_sequences", "seq_len", "seed",
                                                        "batch_size")}, "texts_sha256": texts_sha256}
                                  if crit.requires_data else {}), "tokens": n_tokens, "sha256": token_hash},
               "seed": cfg["seed"], "calibration_seed": cal["seed"], "seeded": crit.seeded, "dtype": cfg["dtype"],
               "device": str(device), "seconds": summary["seconds"],
               "peak_memory_mb": summary["peak_memory_mb"],
               "peak_memory_mb_per_device": summary["peak_memory_mb_per_device"],
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "versions": package_versions()}
    summary["timing"] = sidecar["timing"] = job_timing({"load": loaded, "score": seconds})
    with atomic_path(out_path) as tmp:
        # one metadata key: safetensors writes a multi-key header in hash order, which breaks byte-identity
        save_file({k: v.float().contiguous() for k, v in scores[criterion].items()}, str(tmp),
                  metadata={"hfprune": json.dumps(header, sort_keys=True)})
        write_json(out_path.with_suffix(".json"), sidecar)
    log.info("scored %s / %s: %d tokens in %.1f s, peak %.0f MiB", spec.name, criterion, n_tokens, seconds,
             summary["peak_memory_mb"])
    return summary
