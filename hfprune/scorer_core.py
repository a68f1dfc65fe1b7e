"""The machinery both gradient paths of the scorer share (see hfprune/scorer.py's docstring): counted positions
and next-token labels, forward capture of the down_proj (and o_proj) inputs, the decoder forward from an
embeddings leaf, the non-finite check, and dC/dH of the output loss by chunks of fp32 logits."""

from __future__ import annotations

import torch

from hfprune.errors import ScoreError
from hfprune.placement import on

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
