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
from hfprune.errors import ConfigError, HFPruneError, ScoreError
from hfprune.placement import PerDevice, model_devices, on, peak_memory_mb, reset_peak_memory

log = logging.getLogger(__name__)

# Default size of one chunk of fp32 logits (scoring.logits_chunk: null): 1365 tokens of a 49k vocabulary,
# 441 of a 152k one. Large enough for efficient lm_head products on CPU; small next to a model's activations.
LOGITS_CHUNK_BYTES = 256 * 2**20


# --- positions ---------------------------------------------------------------------------------------------
def counted_positions(attention_mask: torch.Tensor, labelled: bool = True) -> torch.Tensor:
    """Bool [B, T]: a real token whose next position is also a real token (with `labelled`), else any real
    token."""
    mask = attention_mask.bool()
    if not labelled:
        return mask
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:]
    return mask & nxt


def next_token_labels(input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.masked_fill(~valid, -100)


def _as_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    else:
        ids, mask = batch, None
    return ids, (torch.ones_like(ids) if mask is None else mask)


# --- forward capture -------------------------------------------------------------------------------------
class _Capture:
    """Forward pre-hooks that keep the input of every down_proj (and o_proj) while `active`."""

    def __init__(self, adapter, attn: bool):
        self.active = False
        self.h: list = [None] * adapter.num_layers
        self.o: list = [None] * adapter.num_layers
        self.handles = []
        for i in range(adapter.num_layers):
            self.handles.append(adapter.mlp(i).down.register_forward_pre_hook(self._hook(self.h, i)))
            if attn:
                self.handles.append(adapter.attention(i).o.register_forward_pre_hook(self._hook(self.o, i)))

    def _hook(self, store, i):
        def pre_hook(module, args):
            if self.active:  # not during gradient-checkpointing recomputation
                store[i] = args[0]
        return pre_hook

    def clear(self):
        for store in (self.h, self.o):  # in place: the hooks close over these lists
            store[:] = [None] * len(store)

    def remove(self):
        for h in self.handles:
            h.remove()


def _decoder_forward(model, adapter, ids, mask, grad: bool):
    """Final hidden state H of the decoder body; with `grad`, from an embeddings leaf that requires grad."""
    embed = adapter.embed_tokens()
    with torch.set_grad_enabled(grad):
        embeds = embed(ids.to(embed.weight.device)).detach()
        if grad:
            embeds.requires_grad_(True)
        out = model.model(inputs_embeds=embeds, attention_mask=mask.to(embeds.device), use_cache=False)
    return out[0]


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
def _check_finite(scores: dict[str, torch.Tensor], what: str, where: str) -> None:
    """ScoreError naming the first layer (in key order) whose running score is not finite; one host sync per
    device in the common, finite case."""
    by_device: dict = {}
    for s in scores.values():
        by_device.setdefault(s.device, []).append(s.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(parts)).all()) for parts in by_device.values()):
        return
    key = next(k for k, s in scores.items() if not bool(torch.isfinite(s).all()))
    raise ScoreError(f"{what}: non-finite score in {key} (layer {key.split('.')[1]}) {where}".rstrip()
                     + "; try dtype float32")


def _progress(batches, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm([_as_batch(b) for b in batches], desc=f"scoring {desc}", disable=not enabled, leave=False)


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """out = x @ weight.T (+ bias), written into a preallocated fp32 buffer (no fresh [n, V] allocation)."""
    if weight.dtype != out.dtype:
        return out.copy_(torch.nn.functional.linear(x, weight, bias))
    torch.mm(x, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


def _output_gradients(model, H, criteria, labels, valids, teacher_H, chunk: int | None,
                      transform=None) -> list[torch.Tensor]:
    """dC/dH per criterion over its counted tokens, `chunk` tokens at a time (fp32 logits never exist in full).

    `valids`: the counted positions [B, T] of each criterion. Only tokens some criterion counts are gathered
    (the others have dC/dH = 0) into contiguous [chunk, hidden] rows, so lm_head is one plain matrix product
    per chunk; a row a labelled criterion does not count (a last position, counted by entropy) has label -100
    and gets a zero gradient for it. A criterion with a closed-form `logit_gradient_` turns a
    reused logits buffer into dC/dlogits in place, then dC/dH = dC/dlogits @ W_lm_head / n; the others go
    through autograd on `position_loss`. A family's `transform` of lm_head's output (Gemma 2 softcapping,
    Granite scaling) is not in the closed forms: with one, every criterion goes through autograd.
    """
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    dev = weight.device
    hidden = H.shape[-1]
    Hd = H.detach().reshape(-1, hidden)
    grads = [torch.zeros_like(Hd) for _ in criteria]
    union = valids[0]
    for v in valids[1:]:
        union = union | v
    rows = union.reshape(-1).nonzero().squeeze(1)
    ns = [max(int(v.sum()), 1) for v in valids]
    partial = [bool((v != union).any()) for v in valids]  # rows this criterion does not count
    # once per batch: the rows on H's device (the last of a split model), the labels on lm_head's
    rows_h, rows_head = on(rows, Hd), on(rows, weight)
    labels = on(labels.reshape(-1), weight)
    teacher_Hf = teacher_H.reshape(-1, hidden) if teacher_H is not None else None
    closed = [transform is None and c.closed_form() for c in criteria]
    head = lm_head if transform is None else (lambda x: transform(lm_head(x).float()))
    need_graph = not all(closed)
    chunk = chunk or max(1, LOGITS_CHUNK_BYTES // (4 * weight.shape[0]))
    size = min(chunk, len(rows))
    # reused for every chunk: the logits, and a copy of them while another closed-form criterion still needs them
    logits_buf = torch.empty(size, weight.shape[0], device=dev) if any(closed) else None
    spare_buf = torch.empty_like(logits_buf) if sum(closed) > 1 else None
    for s in range(0, len(rows), chunk):
        r = rows_h[s:s + chunk]
        hc = Hd[r].to(dev).requires_grad_(need_graph)
        lab = labels[rows_head[s:s + chunk]]
        has_label = lab != -100
        lab_safe = lab.clamp_min(0)
        logits = teacher = None
        if need_graph:
            with torch.enable_grad():
                logits = head(hc).float()
        if teacher_Hf is not None:
            with torch.no_grad():
                teacher = head(teacher_Hf[on(r, teacher_Hf)].to(dev)).float().unsqueeze(0)
        if logits_buf is not None:
            z = logits_buf[:len(r)]
            if logits is None:
                _linear_into(z, hc, weight, bias)
            else:
                z.copy_(logits.detach())
        for k, crit in enumerate(criteria):
            if closed[k]:  # the last closed-form criterion of the chunk may consume z itself
                dz = z if not any(closed[k + 1:]) else spare_buf[:len(r)].copy_(z)
                dz = crit.logit_gradient_(dz, lab_safe)
                if partial[k]:
                    dz[~has_label] = 0
                g = (dz.to(weight.dtype) @ weight).div_(ns[k])
            else:
                loss = crit.position_loss(logits.unsqueeze(0), lab.unsqueeze(0), teacher)
                if partial[k]:
                    loss = torch.where(has_label, loss, 0)
                loss = loss.sum() / ns[k]
                (g,) = torch.autograd.grad(loss, hc, retain_graph=not all(closed[k + 1:]))
            grads[k][r] = g.to(Hd.device, Hd.dtype)
    return [g.view_as(H) for g in grads]


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


def _mlp_weights(adapter, i: int) -> list[torch.nn.Parameter]:
    mlp = adapter.mlp(i)
    return [m.weight for m in (mlp.gate, mlp.up, mlp.down) if m is not None]


def _neuron_parts(adapter, i: int, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp32 (W, dC/dW) of layer i's gate rows, up rows and down columns (transposed), [intermediate, hidden] each;
    `grads` in the order of `_mlp_weights` (a fused gate_up weight splits in two)."""
    weights = _mlp_weights(adapter, i)
    pairs = [(w.detach().float(), g.float()) for w, g in zip(weights[:-1], grads[:-1])]
    if adapter.mlp(i).gate is None:
        [(w, g)] = pairs
        pairs = list(zip(w.chunk(2, 0), g.chunk(2, 0)))
    return pairs + [(weights[-1].detach().float().t(), grads[-1].float().t())]


def _parameter_scores(model, adapter, batches, crit: ParameterGradientCriterion, chunk: int | None,
                      progress: bool, mask_plan: dict | None = None) -> tuple[dict, int]:
    """Scores of a weight-level criterion: dC/dH by chunks of logits, then autograd to the MLP weights."""
    from hfprune.surgery import neuron_mask

    units = [_as_batch(b) for b in batches]
    if crit.per_sequence:
        units = [(ids[j:j + 1], mask[j:j + 1]) for ids, mask in units for j in range(len(ids))]
    valids = [counted_positions(mask, labelled=crit.uses_labels) for _, mask in units]
    units = [{"input_ids": ids, "attention_mask": mask} for ids, mask in units]
    total = max(sum(int(v.sum()) for v in valids), 1)
    params = [w for i in range(adapter.num_layers) for w in _mlp_weights(adapter, i)]
    sizes = [len(_mlp_weights(adapter, i)) for i in range(adapter.num_layers)]
    scores: dict[str, torch.Tensor] = {}
    acc = None if crit.per_sequence else [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def add_scores(grads, where: str):
        start = 0
        for i, n in enumerate(sizes):
            s = crit.neuron_scores(_neuron_parts(adapter, i, grads[start:start + n]))
            start += n
            scores[f"mlp.{i}"] = s if f"mlp.{i}" not in scores else scores[f"mlp.{i}"] + s
        _check_finite(scores, f"criterion {crit.name!r}", where)

    for p in params:
        p.requires_grad_(True)
    try:
        for u, ((ids, mask), valid) in enumerate(zip(_progress(units, progress, crit.name), valids)):
            labels = next_token_labels(ids, counted_positions(mask))
            teacher_H = _decoder_forward(model, adapter, ids, mask, grad=False) if crit.needs_teacher else None
            # the mask stays on through the backward: gradient checkpointing recomputes the masked forward
            with neuron_mask(model, mask_plan) if mask_plan else contextlib.nullcontext():
                H = _decoder_forward(model, adapter, ids, mask, grad=True)
                (g,) = _output_gradients(model, H, [crit], labels, [valid], teacher_H, chunk,
                                         adapter.logits_transform())
                if acc is not None:  # C averaged over every counted token of the set, not of this batch
                    g.mul_(int(valid.sum()) / total)
                grads = torch.autograd.grad(H, params, grad_outputs=g)
            del H, g
            if acc is None:
                add_scores(grads, f"at sequence {u}")
            else:
                for a, gr in zip(acc, grads):
                    a.add_(gr.float())
            del grads
        if acc is not None:
            add_scores(acc, "")
    finally:
        for p in params:
            p.requires_grad_(False)
    return {k: v.cpu() for k, v in scores.items()}, total


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
    from hfprune.data import hub_datasets_dir, load_texts, sample_windows, text_source, texts_hash
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
