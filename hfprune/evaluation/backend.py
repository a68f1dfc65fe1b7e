"""An lm-eval model backend (`hfprune`) that answers loglikelihood requests with far less compute than `hf`.

lm-eval's `HFLM` runs every (context, continuation) request as its own row: a multiple-choice question's
context is computed once per choice, and the output layer plus a log-softmax over the vocabulary run at every
position although only the continuation's positions are read. `SharedContextLM` answers the same requests
with the same numbers (up to float rounding) by:

1. **sharing prefixes**: requests whose model inputs start with the same tokens (the choices of one question;
   WinoGrande's two options share the sentence before the blank) become one packed row: the shared prefix
   once, then each request's remaining tokens as a branch. A 4-D attention mask makes the row a tree (a branch
   sees the prefix and itself, causally), and position ids restart after the prefix in every branch, so each
   branch computes exactly what its request would compute alone;
2. **batching across documents**: several groups share one row (each attends only to itself), rows are filled
   to about `row_tokens` tokens, padded to a multiple of 32 and batched with rows of the same width to about
   `max_batch_tokens` tokens per forward (a default per device kind): small per-document forwards are
   overhead-bound, and packing leaves little padding;
3. **scoring only what is read**: the decoder body runs on the batch, the output layer (`lm_head`) runs only on
   the hidden states at scored positions (deduplicated, a fixed number of rows per product), and the
   log-softmax runs in fp32. With fixed shapes per row a request's answer does not depend on its batch mates.

On a model split over devices, each index tensor is placed on the device of the tensor it selects from
(hfprune.placement); per-request results reach the host in one copy per batch.

The model input of a request is exactly HFLM's: context + continuation, left-truncated to `max_length + 1`
tokens, last token dropped. Results are (sum of the continuation's log-probs, whether every continuation
token is the argmax) per request, in request order, and go to lm-eval's cache hook as HFLM's do.
`loglikelihood_rolling` (perplexity tasks) uses the same path through HFLM's own windowing; generation and
seq2seq models use HFLM's code unchanged.

Before its first batch the backend checks, on a small tree, that the decoder + `lm_head` route with the
custom mask reproduces the model's own forward; attention kernels that ignore custom masks (e.g.
flash_attention_2) fail that check with an HFPruneError instead of giving wrong numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from hfprune.errors import HFPruneError
from hfprune.models import additive_mask
from hfprune.placement import input_device, on

log = logging.getLogger(__name__)

BACKENDS = ("shared", "stock")
# evaluation.max_batch_tokens: null -> padded tokens per forward by device kind. CPU: 256 per batch_size row, the
# size that was measured there (small forwards are overhead-bound, larger ones gain nothing). CUDA: an H100 is
# kernel-launch bound far below this; 32k tokens keep a forward's activations of an 8B model in bf16 at about
# 1 GiB per MLP intermediate (32k x 14336 x 2 B) with the tree mask handled by SDPA's memory-efficient kernel.
CUDA_BATCH_TOKENS = 32768


# Rows are padded to a multiple of WIDTH_QUANTUM tokens and batched only with rows of the same width, and lm_head
# runs on a fixed number of rows: a token's log-prob then never depends on what else is in its batch (on CPU it is
# bit-identical whatever max_batch_tokens is; a kernel's reduction order follows the shapes it is given).
WIDTH_QUANTUM = 32


def default_max_batch_tokens(device_type: str, batch_size: int) -> int:
    """Padded tokens per forward when evaluation.max_batch_tokens is null, by the kind of device evaluated on."""
    return CUDA_BATCH_TOKENS if device_type == "cuda" else 256 * batch_size


def head_rows(device_type: str) -> int:
    """Scored positions per lm_head product: few on CPU (the last chunk is padded up to it), more on CUDA (fp32
    log-probs of 512 rows x 152k tokens are 0.3 GiB)."""
    return 512 if device_type == "cuda" else 64


def row_width(used: int) -> int:
    """The padded width of a row holding `used` tokens."""
    return -(-used // WIDTH_QUANTUM) * WIDTH_QUANTUM


def scored_rows(reqs: list[int], scored: dict[int, tuple[int, list[int]]], width: int) -> torch.Tensor:
    """Flat row indices (row * width + column) into a [B * width, H] view of the hidden states of every scored
    position of `reqs`, in request order (on the host; `on` moves it to the hidden states' device)."""
    return torch.tensor([scored[r][0] * width + c for r in reqs for c in scored[r][1]], dtype=torch.long)


def per_request(token_lp: torch.Tensor, greedy: torch.Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    """(sum of log-probs, every token greedy) per request from its tokens' values, on their device, then one
    copy to the host for the whole batch (no per-request sync). Sums in fp64 in token order: a request's sum
    does not depend on what else is in its batch."""
    seg = on(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)), token_lp)
    sums = torch.zeros(len(lengths), dtype=torch.float64, device=token_lp.device)
    sums.index_add_(0, seg, token_lp.double())
    misses = torch.zeros(len(lengths), dtype=torch.float64, device=token_lp.device)
    misses.index_add_(0, seg, (~greedy).double())
    host = torch.stack([sums, misses]).cpu()
    return [(float(lp), not bool(m)) for lp, m in zip(host[0].tolist(), host[1].tolist(), strict=True)]


@dataclass
class _Group:
    """One packed row: a shared prefix (`prefix_len` tokens of `members[0]`'s input) then one branch per member."""

    first: list[int]
    prefix_len: int
    members: list[int] = field(default_factory=list)  # request indices
    lengths: list[int] = field(default_factory=list)  # their input lengths

    @property
    def packed_len(self) -> int:
        return self.prefix_len + sum(n - self.prefix_len for n in self.lengths)

    def joined_len(self, prefix_len: int, n: int) -> int:
        return prefix_len + sum(m - prefix_len for m in self.lengths) + n - prefix_len


def _lcp(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_requests(inputs: list[list[int]], max_row_tokens: int, min_gain: float = 0.25) -> list[_Group]:
    """Group model inputs that share a prefix into packed rows.

    Inputs are visited in lexicographic order, so inputs sharing a prefix are adjacent. An input joins the current
    group when that saves at least `min_gain` of its own length in computed tokens and the packed row stays within
    `max_row_tokens` (otherwise a new group starts); the group's prefix is the common prefix of all its members.
    """
    groups: list[_Group] = []
    cur: _Group | None = None
    for i in sorted(range(len(inputs)), key=inputs.__getitem__):
        inp = inputs[i]
        if cur is not None:
            shared = min(cur.prefix_len, _lcp(cur.first, inp, cur.prefix_len))
            joined = cur.joined_len(shared, len(inp))
            if shared > 0 and cur.packed_len + len(inp) - joined >= min_gain * len(inp) and joined <= max_row_tokens:
                cur.prefix_len = shared
                cur.members.append(i)
                cur.lengths.append(len(inp))
                continue
        cur = _Group(first=inp, prefix_len=len(inp), members=[i], lengths=[len(inp)])
        groups.append(cur)
    return groups


@register_model("hfprune", "hfprune-shared")
class SharedContextLM(HFLM):
    """HFLM whose loglikelihood requests share prefixes, batch across documents and score only read positions.

    `max_batch_tokens`: padded tokens per forward (default by device kind: `default_max_batch_tokens`); `row_tokens`: the width rows are
    filled to with independent groups (sequence packing: little padding, attention cost grows with the width);
    `max_row_tokens`: the longest a prefix group may grow to (a single longer request still gets its own row).
    """

    def __init__(self, *args, max_batch_tokens: int | None = None, row_tokens: int = 512,
                 max_row_tokens: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        bs = self.batch_size if isinstance(self.batch_size, int) else 8
        self.max_batch_tokens = int(max_batch_tokens or default_max_batch_tokens(self.device.type, bs))
        self.row_tokens = int(row_tokens)
        self.max_row_tokens = int(max_row_tokens)
        self.head_rows = head_rows(self.device.type)
        self._checked = False

    # ---- model pieces -------------------------------------------------------------------------------------
    def _decoder_and_head(self):
        model = self.model
        head = model.get_output_embeddings()
        decoder = model.get_decoder()
        if head is None or decoder is None or decoder is model:
            raise HFPruneError(f"hfprune eval backend: {type(model).__name__} has no separate decoder and output "
                               "layer; use evaluation.backend: stock")
        return decoder, head

    def _hidden(self, input_ids, position_ids, allowed):
        """Decoder body on a batch with a [B, T, T] boolean `allowed` (query, key) mask -> last hidden states."""
        decoder, _ = self._decoder_and_head()
        dtype = next(decoder.parameters()).dtype
        if self.mixed_precision_dtype is not None:
            dtype = self.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = decoder(input_ids=input_ids, attention_mask=additive_mask(allowed, dtype), position_ids=position_ids,
                          use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer on gathered hidden states [N, H] -> fp32 log-probs [N, V]."""
        _, head = self._decoder_and_head()
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        logits = logits.float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.log_softmax(logits, dim=-1)

    def _score_tokens(self, rows: torch.Tensor, inverse: torch.Tensor, toks: torch.Tensor):
        """Log-prob of each scored token and whether it is the argmax, from the hidden states `rows` [N, H] of
        the distinct scored positions (`inverse`: each token's row). lm_head runs on `head_rows` rows at a time
        (the last chunk padded with zeros), so [N, V] log-probs never exist and every product has one shape."""
        c = self.head_rows
        token_lp, best = None, []
        for s in range(0, rows.shape[0], c):
            chunk = rows[s:s + c]
            if len(chunk) < c:
                chunk = torch.cat([chunk, chunk.new_zeros(c - len(chunk), chunk.shape[1])])
            lp = self._logprobs(chunk)
            if token_lp is None:  # indices go to the log-probs' device (lm_head's, the last of a split model)
                inverse, toks = on(inverse, lp), on(toks, lp)
                token_lp = torch.zeros(toks.shape, dtype=lp.dtype, device=lp.device)
            local = inverse - s
            inside = (local >= 0) & (local < c)  # no host sync: every token is read, the chunk's are kept
            token_lp = torch.where(inside, lp[local.clamp(0, c - 1), toks], token_lp)
            best.append(lp.argmax(dim=-1))
        return token_lp, torch.cat(best)[inverse] == toks

    # ---- batch construction -------------------------------------------------------------------------------
    def _build_batch(self, rows: list[list[_Group]], inputs: list[list[int]], contlens: list[int],
                     width: int | None = None):
        """Rows of packed groups, right-padded to `width` (default: the longest row) -> (input_ids,
        position_ids, allowed [B, T, T], scored).

        `scored[request] = (row, packed columns of its scored positions)`. A row holds several independent groups
        side by side; a token may attend to earlier tokens of its own group's prefix and of its own branch.
        """
        width = width or max(sum(g.packed_len for g in row) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        grp = torch.full((len(rows), width), -1, dtype=torch.long)  # group within the row; -1 padding
        br = torch.full((len(rows), width), -2, dtype=torch.long)  # -1 shared prefix, k: branch k, -2 padding
        scored: dict[int, tuple[int, list[int]]] = {}
        for r, row in enumerate(rows):
            start = 0
            for j, g in enumerate(row):
                p = g.prefix_len
                ids[r, start:start + p] = torch.tensor(g.first[:p], dtype=torch.long)
                pos[r, start:start + p] = torch.arange(p)
                grp[r, start:start + g.packed_len] = j
                br[r, start:start + p] = -1
                base, cur = start, start + p
                for k, (req, n) in enumerate(zip(g.members, g.lengths, strict=True)):
                    m = n - p
                    if m:
                        ids[r, cur:cur + m] = torch.tensor(inputs[req][p:], dtype=torch.long)
                        pos[r, cur:cur + m] = torch.arange(p, n)
                        br[r, cur:cur + m] = k
                    scored[req] = (r, [base + i if i < p else cur + i - p for i in range(n - contlens[req], n)])
                    cur += m
                start = cur
        idx = torch.arange(width)
        allowed = ((idx[None, None, :] <= idx[None, :, None]) & (grp[:, None, :] == grp[:, :, None])
                   & ((br[:, None, :] == -1) | (br[:, None, :] == br[:, :, None])))
        return ids, pos, allowed, scored  # padding attends to earlier padding only (never a fully masked row)

    def _batches(self, groups: list[_Group]) -> list[tuple[int, list[list[_Group]]]]:
        """Groups -> rows (first-fit decreasing into rows of `row_tokens`, or one longer group) -> (width,
        rows) batches of at most `max_batch_tokens` padded tokens (a batch: rows of one `row_width`)."""
        rows: list[tuple[int, list[_Group]]] = []  # (capacity, groups)
        used: list[int] = []
        for g in sorted(groups, key=lambda g: -g.packed_len):
            for i, (cap, row) in enumerate(rows):
                if used[i] + g.packed_len <= cap:
                    row.append(g)
                    used[i] += g.packed_len
                    break
            else:
                rows.append((max(self.row_tokens, g.packed_len), [g]))
                used.append(g.packed_len)
        # rows of one padded width per batch, so a row's width never depends on its batch mates
        order = sorted(range(len(rows)), key=lambda i: (-row_width(used[i]), -used[i]))
        batches: list[tuple[int, list[list[_Group]]]] = []
        for i in order:
            width = row_width(used[i])
            if not batches or batches[-1][0] != width or (len(batches[-1][1]) + 1) * width > self.max_batch_tokens:
                batches.append((width, []))
            batches[-1][1].append(rows[i][1])
        return batches

    def _check_route(self, tokens: list[int]) -> None:
        """Packed tree + decoder/lm_head vs the model's own forward on the separate sequences (once per LM)."""
        self._checked = True
        prefix = (tokens * 8)[:8]
        branches = [prefix[::-1][:3], prefix[2:6]]
        inputs = [prefix + b for b in branches] + [prefix[1:5]]  # a tree of two branches + another group
        tree = _Group(first=inputs[0], prefix_len=len(prefix), members=[0, 1], lengths=[len(i) for i in inputs[:2]])
        alone = _Group(first=inputs[2], prefix_len=len(inputs[2]), members=[2], lengths=[len(inputs[2])])
        ids, pos, allowed, scored = self._build_batch([[tree, alone]], inputs, [len(i) for i in inputs])
        dev = input_device(self.model)
        refs = []
        with torch.no_grad():
            for inp in inputs:
                refs.append(F.log_softmax(self._model_call(torch.tensor([inp], device=dev))[0].float(), dim=-1))

        def worst(mask) -> float:
            """Largest |log-prob error| against the model's forward, over each position's 16 likeliest tokens
            (rare tokens' log-probs carry more rounding). The references are on the logits' device, the route's
            hidden states on the decoder's last one: each index goes to the tensor it selects from."""
            hidden = self._hidden(ids.to(dev), pos.to(dev), mask.to(dev))[0]
            errs = []
            for req, ref in enumerate(refs):
                top = ref.topk(min(16, ref.shape[-1]), dim=-1).indices
                got = self._logprobs(hidden[on(torch.tensor(scored[req][1]), hidden)])
                errs.append((got.gather(-1, on(top, got)) - on(ref.gather(-1, top), got)).abs().max())
            return float(torch.stack(errs).max())

        err = worst(allowed)
        dtype = next(self.model.parameters()).dtype
        if dtype in (torch.float32, torch.float64) and self.mixed_precision_dtype is None:
            # fp32 summation order alone reached 1.5e-3 on a LoRA-merged SmolLM2 (sdpa); a kernel that ignores
            # the tree mask is off by O(0.1-10)
            ok, bound = err <= 1e-2, "1e-2"
        else:
            # bf16 rounding alone moves SmolLM2's log-probs by ~0.4 between two correct routes, so the bound is
            # relative: what a kernel ignoring the tree mask (plain causal attention over the packed row) gives,
            # ~10 there
            ignored = worst(torch.tril(torch.ones_like(allowed[0]))[None].expand_as(allowed))
            ok, bound = err <= 0.1 * ignored, f"a tenth of the {ignored:.3g} a plain causal mask gives"
        if not ok:
            impl = getattr(self.model.config, "_attn_implementation", "?")
            raise HFPruneError(f"hfprune eval backend: the packed-tree route differs from the model's forward by "
                               f"{err:.3g} (> {bound}) with attention {impl!r} (custom 4-D masks unsupported?); "
                               "use evaluation.backend: stock or sdpa/eager attention")

    # ---- lm-eval entry point ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if not requests:
            return []
        max_len = self.max_length
        inputs, conts = [], []
        for (_, context_enc, continuation_enc) in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > max_len:
                raise HFPruneError(f"hfprune eval backend: a loglikelihood request needs a non-empty context and a "
                                   f"continuation of 1..{max_len} tokens (got {len(context_enc)} and "
                                   f"{len(continuation_enc)})")
            full = context_enc + continuation_enc
            if len(full) > max_len + 1:
                log.warning("context (%d) + continuation (%d) exceed max length %d: truncating from the left",
                            len(context_enc), len(continuation_enc), max_len)
            inputs.append(full[-(max_len + 1):][:-1])
            conts.append(continuation_enc)
        contlens = [len(c) for c in conts]
        if not self._checked:
            self._check_route(inputs[0])

        batches = self._batches(group_requests(inputs, self.max_row_tokens))
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        dev = input_device(self.model)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests (hfprune)")
        for width, batch in batches:
            ids, pos, allowed, scored = self._build_batch(batch, inputs, contlens, width)
            # inputs on the first device; the hidden states come out on the decoder's last device and the
            # log-probs on lm_head's: each index tensor goes to the device of the tensor it selects from
            hidden = self._hidden(ids.to(dev), pos.to(dev), allowed.to(dev))
            reqs = [r for row in batch for g in row for r in g.members]
            uniq, inverse = torch.unique(scored_rows(reqs, scored, width), return_inverse=True)
            toks = torch.tensor([t for r in reqs for t in conts[r]], dtype=torch.long)
            token_lp, greedy = self._score_tokens(hidden.reshape(-1, hidden.shape[-1])[on(uniq, hidden)], inverse,
                                                  toks)
            for r, answer in zip(reqs, per_request(token_lp, greedy, [contlens[r] for r in reqs]), strict=True):
                res[r] = answer
            pbar.update(len(reqs))
        pbar.close()
        for (request_str, _, _), answer in zip(requests, res, strict=True):
            if request_str is not None:  # loglikelihood_rolling's windows (key None) are cached per document
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res


def lm_class(name: str):
    """evaluation.backend -> the lm-eval LM class: 'shared' (this module) or 'stock' (lm-eval's HFLM)."""
    if name == "shared":
        return SharedContextLM
    if name == "stock":
        return HFLM
    raise HFPruneError(f"evaluation.backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
