"""Turn a score file and a target ratio into a plan JSON (kept neuron indices per layer)."""

import hashlib
import json
from pathlib import Path

from hfprune.commands import add_config_argument, add_model_argument
from hfprune.config import model_entry
from hfprune.errors import HFPruneError
from hfprune.validation import load_job_config

HELP = "scores + ratio (fraction of all parameters removed) -> kept neurons per layer (plan JSON)"


def add_arguments(parser):
    add_config_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--scores", required=True, help="score file written by `hfprune score`")
    parser.add_argument("--ratio", required=True, type=float, help="fraction of ALL parameters to remove")
    parser.add_argument("--out", required=True, help="output plan JSON")


# what the ratio arithmetic (hfprune.plan) reads; head_dim, attention_bias and mlp_bias are optional there
_PLAN_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def _model_config(spec, resources_dir):
    """The model's architecture facts from config.json (or the embedded model's registry entry) read as JSON:
    importing transformers for AutoConfig would cost more than the whole plan. AutoConfig where a field the
    plan needs is missing (its class default applies) or the config is not local."""
    from hfprune.models import architecture, ensure_available

    arch = architecture(spec, resources_dir)
    if arch is not None and all(getattr(arch, k, None) is not None for k in _PLAN_FIELDS):
        return arch
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ensure_available(spec, resources_dir))


def run(args) -> int:
    from hfprune.config import format_ratio
    from hfprune.models import ModelSpec
    from hfprune.plan import make_plan
    from hfprune.runtime import read_safetensors, reading, write_json

    cfg = load_job_config(args.config)
    spec = ModelSpec.from_config(model_entry(cfg, args.model))
    scores_path = Path(args.scores)
    if not scores_path.is_file():
        raise HFPruneError(f"--scores {str(scores_path)!r} does not exist; run `hfprune score` first")
    if not 0 < args.ratio < 1:
        raise HFPruneError(f"--ratio {args.ratio} must be in (0, 1)")
    import numpy as np

    # numpy, not torch: importing torch would be most of this job's time
    scores, metadata = read_safetensors(scores_path, "--scores", framework="numpy")
    with reading(scores_path, "--scores"):
        header = json.loads(metadata.get("hfprune", "{}"))
    # topk ranks NaN above every number: a NaN neuron would be kept silently
    bad = [k for k, v in scores.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise HFPruneError(f"--scores {str(scores_path)!r} holds NaN/inf in {', '.join(bad)}; rescore it")
    if header.get("model") not in (None, spec.name):
        raise HFPruneError(f"--scores {scores_path} were computed for model {header['model']!r}, not {spec.name!r}")
    if header.get("ratio") is not None and format_ratio(header["ratio"]) != format_ratio(args.ratio):
        raise HFPruneError(f"--scores {scores_path} were computed for ratio {header['ratio']} (per-ratio criterion "
                           f"options), not {args.ratio}")
    pruning = cfg["pruning"]
    model_config = _model_config(spec, cfg["resources_dir"])
    spec = spec.resolved(model_config)
    plan = make_plan(scores, model_config, args.ratio, spec.family, allocation=pruning["allocation"],
                     scope=pruning["scope"], min_keep_fraction=pruning["min_keep_fraction"],
                     kv_fraction=pruning["attn_kv_group_fraction"],
                     meta={"model": spec.name, "criterion": header.get("criterion"),
                           "seed": header.get("calibration_seed")},
                     scores_name=f"--scores {str(scores_path)!r}")
    plan["scores_file"] = str(scores_path)
    plan["scores_sha256"] = hashlib.sha256(scores_path.read_bytes()).hexdigest()
    write_json(args.out, plan)
    print(f"{args.out}: kept {sum(len(x['mlp_keep']) for x in plan['layers'])} neurons, "
          f"achieved ratio {plan['achieved_ratio']:.4f}")
    return 0
