"""What a model and a machine allow, checked from config.json alone before any weight is read.

Sequence lengths: every token sequence a stage feeds the model at once must fit the model's positions
(`max_position_embeddings`); beyond them RoPE models do not fail, they silently run out of distribution (and
slowly out of memory).

Scoring memory: an estimate of a scoring job's peak against the device's memory, so that a config that cannot
fit stops at once with the knob to turn instead of swapping for minutes or being OOM-killed. The estimate
(bytes; b = bytes per weight of `dtype`, n = batch x seq_len tokens of one batch, h = hidden size, I =
intermediate size, L = layers, H = attention heads, T = seq_len, V = vocabulary):

- weights: parameters x b;
- per layer, what the backward keeps (parameters are frozen, so a Linear keeps nothing for its input gradient;
  RMSNorms, rotary, attention and the gated MLP do): n x (4I + 8h) x b, plus attention probabilities
  batch x H x T^2 in fp32 where the attention kernel stores them (an upper bound on fused kernels);
  the four I-wide terms are the gate output, SiLU(gate), the up output and the captured down_proj input;
- gradient criteria: L such layers, or with gradient checkpointing each layer's input and captured
  down_proj input (L x n x (h + I) x b) plus one layer being recomputed; plus one layer's gradients in
  flight, and the logits of one chunk (scoring.logits_chunk tokens x V in fp32, default 256 MiB) four times
  (the reused buffer, its spare copy, softmax temporaries, the teacher's logits), eight times for criteria
  differentiated by autograd (taylor_kd, taylor_entropy_topk);
- weight-level criteria (`ParameterGradientCriterion`): also the gradients of every MLP weight
  (L x 3 x h x I x b), and their fp32 sum where the criterion scores the whole set's gradient;
- activation criteria: the captured down_proj inputs of every layer plus one layer; weight criteria: weights;
- the runtime: 1 GiB on CPU (Python, torch, tokenizer, text), 0.5 GiB on CUDA (allocator slack).

The budget: HFPRUNE_MEMORY_BUDGET_MB if set (tests, or to overrule the guard), else MemAvailable of
/proc/meminfo (psutil elsewhere) on CPU; on GPU, outside a job resources.gpu_memory_gb (the Snakemake process
never initialises CUDA: it would hold memory on GPU 0 for the whole run, and on a SLURM login node it sees no
GPU), inside a score job the free memory of the GPUs it holds (all of them with a device_map).
"""

from __future__ import annotations

import logging
import os

from hfprune.errors import ConfigError

log = logging.getLogger(__name__)
MEMORY_BUDGET_ENV = "HFPRUNE_MEMORY_BUDGET_MB"
STAGES = ("score", "evaluate", "recover")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
RUNTIME_BYTES = {"cpu": GIB, "cuda": GIB // 2}
LOGITS_COPIES = 4  # closed-form criteria; through autograd (taylor_kd, taylor_entropy_topk) log-softmax,
LOGITS_COPIES_AUTOGRAD = 8  # the teacher's softened logits and their gradients add as many again


def _criteria(names):
    from hfprune.criteria import CRITERIA, get_criterion

    for name in names:
        if name not in CRITERIA:
            get_criterion(name)  # raises the error that lists the criteria
    return [CRITERIA[name] for name in names]


def sequence_lengths(cfg: dict, stages=STAGES, criteria=None) -> list[tuple[str, int, str]]:
    """(config field, positions the model sees at once, what they are) for every sequence the stages use."""
    from hfprune.evaluation.efficiency import DECODE_PROMPT_TOKENS

    out = []
    cal, ev, rec = cfg["calibration"], cfg["evaluation"], cfg["recovery"]
    if "score" in stages and any(c.requires_data for c in _criteria(criteria or cfg["criteria"])):
        out.append(("calibration.seq_len", cal["seq_len"], f"{cal['seq_len']} tokens"))
    if "evaluate" in stages:
        if ev["perplexity"]["sources"]:
            n = ev["perplexity"]["seq_len"]
            out.append(("evaluation.perplexity.seq_len", n, f"{n} tokens"))
        if ev["fidelity"]["enabled"]:
            out.append(("evaluation.fidelity.seq_len", ev["fidelity"]["seq_len"], f"{ev['fidelity']['seq_len']} tokens"))
        eff = ev["efficiency"]
        if eff["enabled"]:
            out.append(("evaluation.efficiency.prefill_tokens", eff["prefill_tokens"], f"{eff['prefill_tokens']} tokens"))
            out.append(("evaluation.efficiency.decode_tokens", DECODE_PROMPT_TOKENS + eff["decode_tokens"],
                        f"a {DECODE_PROMPT_TOKENS}-token prompt + {eff['decode_tokens']} decoded tokens"))
    if "recover" in stages and rec["enabled"]:
        out.append(("recovery.seq_len", rec["seq_len"], f"{rec['seq_len']} tokens"))
    return out


def check_sequence_lengths(cfg: dict, name: str, arch, stages=STAGES, criteria=None, source: str = "config"):
    limit = getattr(arch, "max_position_embeddings", None)
    if limit is None:
        return
    for field, positions, what in sequence_lengths(cfg, stages, criteria):
        if positions > limit:
            raise ConfigError(f"{source}: invalid config field {field!r}: {what} exceed the {limit} positions of "
                              f"model {name!r} (max_position_embeddings in its config.json); lower it")


def layer_activation_bytes(arch, batch: int, seq: int, b: int) -> int:
    """What one decoder layer keeps for an input-gradient backward (see above): batch x seq x (4I + 8h) x b, plus
    fp32 attention probabilities batch x H x seq^2 (an upper bound on fused kernels)."""
    n = batch * seq
    return (n * (4 * arch.intermediate_size + 8 * arch.hidden_size) * b
            + batch * arch.num_attention_heads * seq * seq * 4)


def scoring_memory(arch, cfg: dict, criteria=None) -> dict[str, int]:
    """Estimated peak bytes of scoring `arch` with the config's criteria (or `criteria`), by part (see above)."""
    from hfprune.adapters import adapter_class
    from hfprune.criteria import ParameterGradientCriterion
    from hfprune.scorer_core import LOGITS_CHUNK_BYTES

    crits = _criteria(criteria or cfg["criteria"])
    b = DTYPE_BYTES[cfg["dtype"]]
    cal, scoring = cfg["calibration"], cfg["scoring"]
    h, inter, layers = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    seq = cal["seq_len"]
    batch = min(cal["batch_size"], cal["num_sequences"])
    n = batch * seq
    layer = layer_activation_bytes(arch, batch, seq, b)
    parts = {"weights": adapter_class(arch).count_params(arch) * b, "activations": 0, "logits": 0}
    if any(c.requires_gradient for c in crits):
        kept = layers * n * (h + inter) * b + layer if scoring["gradient_checkpointing"] else layers * layer
        parts["activations"] = kept + layer
        chunk = scoring["logits_chunk"] or max(1, LOGITS_CHUNK_BYTES // (4 * arch.vocab_size))
        grad = [c for c in crits if c.requires_gradient]
        copies = LOGITS_COPIES if all(c.closed_form() for c in grad) else LOGITS_COPIES_AUTOGRAD
        parts["logits"] = copies * min(chunk, n) * arch.vocab_size * 4
        weight_level = [c for c in grad if issubclass(c, ParameterGradientCriterion)]
        if weight_level:
            mlp_weights = layers * 3 * h * inter
            summed = any(not c.per_sequence for c in weight_level)
            parts["weight_gradients"] = mlp_weights * (b + (4 if summed else 0))
    elif any(c.requires_data for c in crits):
        parts["activations"] = layers * n * inter * b + layer
    return parts


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def memory_budget(cfg: dict, model: str, in_job: bool = False) -> tuple[int, str, str] | None:
    """(bytes, what they are, device kind) a scoring job of `model` may use; None where it cannot be told here.

    Outside a job (the Snakemake process, `hfprune validate`) CUDA is never touched: a GPU config is checked
    against resources.gpu_memory_gb x the score job's GPUs (one without a device map), or left to its jobs. A job
    measures the GPUs it holds (hfprune.resources.held_gpu_memory)."""
    from hfprune.config import gpus_per_job, model_resources

    env = os.environ.get(MEMORY_BUDGET_ENV)
    per_gpu = model_resources(cfg, model)["gpu_memory_gb"]
    device = cfg["device"]
    if device == "auto":
        if in_job:
            from hfprune.runtime import resolve_device

            device = resolve_device("auto").type
        else:  # where the jobs will run is unknown here: GPUs if their memory is given, else the budget's machine
            device = "cpu" if per_gpu is None and env else "cuda"
    if env:
        try:
            return int(float(env) * 2**20), MEMORY_BUDGET_ENV, device
        except ValueError:
            raise ConfigError(f"{MEMORY_BUDGET_ENV}={env!r} is not a number of MiB") from None
    if device == "cpu":
        return _available_ram(), "available RAM", device
    split = cfg["device_map"] is not None
    if in_job:
        from hfprune.resources import held_gpu_memory

        free = held_gpu_memory(all_devices=split)
        return None if free is None else (free, "free memory of the job's GPUs", device)
    if per_gpu is None:
        _note_once("no resources.gpu_memory_gb: the GPU memory check of scoring is left to each score job")
        return None
    gpus = gpus_per_job(cfg, model, "score") if split else 1
    return int(per_gpu * GIB * gpus), f"resources.gpu_memory_gb x {gpus} GPU(s)", device


_NOTED: set[str] = set()


def _note_once(note: str) -> None:
    if note not in _NOTED:
        _NOTED.add(note)
        log.warning(note)


def check_scoring_memory(cfg: dict, name: str, arch, criteria=None, source: str = "config",
                         in_job: bool = False) -> None:
    budget = memory_budget(cfg, name, in_job)
    if budget is None:
        return
    limit, what, device = budget
    parts = scoring_memory(arch, cfg, criteria)
    parts["runtime"] = RUNTIME_BYTES[device]
    need = sum(parts.values())
    if need <= limit:
        return
    cal = cfg["calibration"]
    lower = [k for k, use in (("calibration.batch_size", min(cal["batch_size"], cal["num_sequences"]) > 1),
                              ("calibration.seq_len", True),
                              ("scoring.logits_chunk", parts["logits"] > parts["activations"])) if use]
    other = [k for k, use in (("set scoring.gradient_checkpointing: true",
                               parts["activations"] and not cfg["scoring"]["gradient_checkpointing"]),
                              ("use dtype bfloat16", cfg["dtype"] == "float32")) if use]
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)
    raise ConfigError(f"{source}: scoring model {name!r} needs about {need / GIB:.1f} GiB ({detail}), more than the "
                      f"{limit / GIB:.1f} GiB of {what}; lower {' or '.join(lower)}"
                      + "".join(f", or {k}" for k in other))


def check_model_limits(cfg: dict, name: str, arch, stages=STAGES, criteria=None, source: str = "config",
                       in_job: bool = False) -> None:
    """Sequence lengths against the model's positions, and (for scoring) memory against the device's."""
    check_sequence_lengths(cfg, name, arch, stages, criteria, source)
    if "score" in stages:
        check_scoring_memory(cfg, name, arch, criteria, source, in_job)


def job_architecture(cfg: dict, model_name: str):
    """The config.json facts of a config's model, without weights: embedded, local or cached; else a hub model's
    config.json is fetched (transformers.AutoConfig; an error if no hub is reachable)."""
    from hfprune.config import model_entry
    from hfprune.models import ModelSpec, architecture

    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    arch = architecture(spec, cfg["resources_dir"])
    if arch is None:  # a hub model not cached yet
        from transformers import AutoConfig

        arch = AutoConfig.from_pretrained(spec.source)
    spec.resolved(arch)  # the family check comes before anything that reads the architecture
    return arch


def check_job(cfg: dict, model_name: str, stage: str, criteria=None, source: str = "config") -> None:
    """`check_model_limits` for one job, before it loads any weight (a hub model's config.json is fetched; offline,
    one that was never fetched stops the job here)."""
    from hfprune.config import model_entry
    from hfprune.models import ModelSpec, check_cached

    check_cached(ModelSpec.from_config(model_entry(cfg, model_name)), source)
    check_model_limits(cfg, model_name, job_architecture(cfg, model_name), (stage,), criteria, source, in_job=True)
