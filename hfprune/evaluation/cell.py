"""One grid cell's evaluation: dense model, base model + plan (pruned in memory), or a recovered folder.

Everything cheap is checked before any model is loaded: suite and task names (and metric overrides), text
sources, the plan against the base model's config, the recovered folder against the plan. Then:
load dense -> build the evaluated model (a pruned copy, or the recovered folder) -> efficiency against the dense
model (timed alternately) -> attach a recovered folder's unmerged LoRA adapter, if it has one -> fidelity
against the dense model -> free the dense model -> lm-eval -> perplexity. Efficiency is measured before the
adapter goes in: it is the pruned model's, which the merged model shares (the adapter adds no parameters then).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from hfprune import timing
from hfprune.config import model_entry
from hfprune.data import hub_datasets_dir, load_texts, text_source
from hfprune.errors import HFPruneError
from hfprune.evaluation.efficiency import efficiency
from hfprune.evaluation.fidelity import source_fidelity
from hfprune.evaluation.perplexity import source_perplexity
from hfprune.evaluation.records import (
    fidelity_records,
    perplexity_records,
    records_path,
    task_records,
    write_records,
)
from hfprune.evaluation.runner import evaluate_tasks, select_tasks
from hfprune.models import ModelSpec, ensure_available, load_model, resolve_dtype
from hfprune.resources import placement
from hfprune.runtime import (
    package_versions,
    quiet_lm_eval_git,
    reading,
    resolve_device,
    seed_everything,
    write_json,
)


def _check_recovered(recovered_dir, plan: dict) -> None:
    from transformers import AutoConfig

    path = Path(recovered_dir)
    if not (path / "config.json").is_file():
        raise HFPruneError(f"recovered model folder {str(path)!r} does not exist or has no config.json")
    with reading(path / "config.json", "recovered model config"):
        config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, "hfprune_intermediate_sizes", None) or [config.intermediate_size] * len(plan["layers"])
    expected = [len(layer["mlp_keep"]) for layer in plan["layers"]]
    if list(sizes) != expected:
        raise HFPruneError(f"recovered model {path} has MLP sizes {sorted(set(sizes))}, its plan "
                           f"{sorted(set(expected))}: the folder was not made from this plan")


def run_evaluation(cfg: dict, model_name: str, plan_path=None, recovered_dir=None, out_path=None) -> dict:
    """Evaluate one cell and write its metrics JSON atomically to `out_path` (if given), with the per-unit
    records beside it (hfprune.evaluation.records); returns the dict.

    plan_path None and recovered_dir None: the dense row. plan_path: base model pruned in memory by the plan.
    recovered_dir (with plan_path, which names the cell): a folder written by `hfprune.recovery.run_recovery`
    (merged, or the pruned base + an unmerged adapter).
    """
    setup = time.perf_counter()  # checks, imports and lm-eval's tasks: not compute, but timed (meta.timing)
    from transformers import AutoConfig

    from hfprune.recovery import attach_adapter, has_adapter
    from hfprune.surgery import load_pruned, prune_model, read_plan
    from hfprune.tasks import resolve_suite

    ev = cfg["evaluation"]
    spec = ModelSpec.from_config(model_entry(cfg, model_name))
    if recovered_dir is not None and plan_path is None:
        raise HFPruneError("a recovered model needs its plan (--plan): the plan names the cell and is checked "
                           "against the folder")
    # ---- cheap checks, before any model is loaded
    specs = [] if ev["suite"] == "none" else resolve_suite(ev["suite"], ev["tasks"], ev["include_path"])
    pruned = plan_path is not None
    fid_cfg, eff_cfg, ppl_cfg = ev["fidelity"], ev["efficiency"], ev["perplexity"]
    hub_dir = hub_datasets_dir(cfg)
    ppl_sources = [text_source(s, "eval", hub_dir) for s in ppl_cfg["sources"]]
    fid_source = text_source(fid_cfg["source"], "eval", hub_dir)
    for source in ppl_sources + ([fid_source] if pruned and fid_cfg["enabled"] else []):
        load_texts(source)  # a missing file or an unreachable hub: one line naming the source
    base_config = AutoConfig.from_pretrained(ensure_available(spec, cfg["resources_dir"]))
    plan = read_plan(plan_path, model_name, base_config) if pruned else None
    if recovered_dir is not None:
        _check_recovered(recovered_dir, plan)
    selection = select_tasks(specs, ev["limit"], ev["subsample_seed"], ev["metrics"], backend=ev["backend"],
                             include_path=ev["include_path"], task_data=ev["task_data"]) if specs else None
    timing.add("setup", time.perf_counter() - setup)

    # ---- models
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    placed = placement(cfg, model_name, device)  # `device: cpu` means CPU: no device map there
    dense, tokenizer = load_model(spec, cfg["resources_dir"], cfg["dtype"], attn_implementation=cfg["attn_implementation"],
                                  **placed)
    spec = spec.resolved(dense.config)  # the family, where the config could not name it before the download
    if placed["device_map"] is None:
        dense.to(device)
    if recovered_dir is not None:
        model = load_pruned(recovered_dir, dtype=resolve_dtype(cfg["dtype"]),
                            attn_implementation=cfg["attn_implementation"]).to(device)
    elif pruned:
        model = prune_model(copy.deepcopy(dense), plan)
    else:
        model = dense
    seconds["load"] = time.perf_counter() - start

    eff = None
    if eff_cfg["enabled"]:
        start = time.perf_counter()
        eff = efficiency(dense, model if pruned else None, seed=cfg["seed"], **{k: v for k, v in eff_cfg.items()
                                                                              if k != "enabled"})
        seconds["efficiency"] = time.perf_counter() - start
    if recovered_dir is not None:
        model = attach_adapter(model, recovered_dir)
    fidelity, records = None, []
    if pruned and fid_cfg["enabled"]:
        start = time.perf_counter()
        fidelity = source_fidelity(dense, model, tokenizer, fid_source, fid_cfg["num_prompts"],
                                   fid_cfg["seq_len"], fid_cfg["top_k"], seed=cfg["seed"])
        seconds["fidelity"] = time.perf_counter() - start
        records += fidelity_records(fidelity)
        del fidelity["per_prompt"], fidelity["prompt_doc"]
    if model is not dense:
        del dense  # lm-eval and perplexity need the evaluated model only

    tasks, lm_meta = {}, {}
    if selection is not None:
        start = time.perf_counter()
        with quiet_lm_eval_git():
            tasks, lm_meta, raw = evaluate_tasks(model, tokenizer, selection, ev["batch_size"], log_samples=True,
                                                 max_batch_tokens=ev["max_batch_tokens"])
        seconds["lm_eval"] = time.perf_counter() - start
        records += task_records(selection, raw["samples"])
    start = time.perf_counter()
    perplexity = {s.label: source_perplexity(model, tokenizer, s, ppl_cfg["seq_len"], ppl_cfg["max_tokens"],
                                             ev["batch_size"], ppl_cfg["protocol"]) for s in ppl_sources}
    seconds["perplexity"] = time.perf_counter() - start
    for source, res in perplexity.items():
        records += perplexity_records(source, res)
        del res["window_nll"], res["window_doc"]

    values = [t["value"] for t in tasks.values() if t["value"] is not None]
    result = {
        "cell": {"model": model_name, "family": spec.family,
                 "criterion": plan.get("criterion", "unknown") if pruned else "dense",
                 "ratio": float(plan.get("ratio", 0.0)) if pruned else 0.0, "recovered": recovered_dir is not None,
                 "seed": plan.get("seed") if pruned else None},
        "tasks": tasks,
        "average": sum(values) / len(values) if values and len(values) == len(tasks) else None,
        "perplexity": perplexity,
        "fidelity": fidelity,
        "efficiency": eff,
        "meta": {**lm_meta, "suite": ev["suite"], "dtype": cfg["dtype"], "device": str(device),
                 "plan": str(plan_path) if pruned else None,
                 "achieved_ratio": plan.get("achieved_ratio") if pruned else 0.0,
                 "recovered_dir": str(recovered_dir) if recovered_dir is not None else None,
                 "recovered_adapter": None if recovered_dir is None else
                 "unmerged" if has_adapter(recovered_dir) else "merged",
                 "seconds": seconds, "config": cfg, "versions": package_versions()},
    }
    if out_path is not None:
        result["meta"]["timing"] = timing.job_timing(seconds)
        write_records(records_path(out_path), records)  # first: a metrics JSON never exists without them
        write_json(out_path, result)
    return result
