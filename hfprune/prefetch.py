"""Fetch, ahead of the grid, everything its jobs would read from the hub (`hfprune prefetch --config C`).

Many clusters' GPU nodes reach no hub, and jobs that fetch on first use race each other for the same files. On a
machine with network (a login node), this downloads into the cache the jobs use (HF_HOME) every hub model
(huggingface_hub.snapshot_download), every hub text (calibration, perplexity, fidelity, LaMini for recovery) and
the data of every lm-eval task not read from local files, through the same `load_dataset` and lm-eval calls the
jobs make, for every grid variant. Then run the grid with HF_HUB_OFFLINE=1: a job that would still need the
network stops at once, naming what is missing and this command (hfprune.models.check_cached).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

# what from_pretrained reads of a hub model (not the .bin / .pth / GGUF copies many repositories also hold)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


class Need(NamedTuple):
    kind: str  # "model" | "dataset" | "task"
    name: str  # what the user calls it: a hub id, a text source's label, a task
    fetch: object  # what fetches it: a hub id, a TextSource, or (lm-eval task, variant config)


def _tasks(cfg: dict) -> list[Need]:
    """lm-eval tasks whose data is not local: not ours (hfprune/tasks, packaged data) and not given local files
    in evaluation.task_data."""
    from hfprune.tasks import TASK_DIR, resolve_suite, task_manager_for

    ev = cfg["evaluation"]
    if ev["suite"] == "none":
        return []
    names = [s.task for s in resolve_suite(ev["suite"], ev["tasks"], ev["include_path"])]
    ours = {p.stem for p in Path(TASK_DIR).glob("*.yaml")}
    names = [n for n in names if n not in ours and n not in ev["task_data"]]
    if not names:
        return []
    tm = task_manager_for(names, ev["include_path"])
    out = []
    for name in names:  # a task of the user's own folder may read local files: ask its YAML
        entry = tm.task_index.get(name)
        path = getattr(entry, "yaml_path", None)
        if path is not None and ev["include_path"] and Path(path).is_relative_to(Path(ev["include_path"]).resolve()):
            import yaml

            dataset = (yaml.safe_load(Path(path).read_text()) or {}).get("dataset_path", "")
            if dataset in ("json", "csv", "parquet", "text", "arrow") or Path(str(dataset)).exists():
                continue
        out.append(Need("task", name, (name, cfg)))
    return out


def hub_needs(cfg: dict) -> list[Need]:
    """Every hub model, hub text and hub task of every grid variant of `cfg` (each once)."""
    from hfprune.data import hub_datasets_dir, hub_path, is_local, text_source
    from hfprune.grid import variants
    from hfprune.models import ModelSpec
    from hfprune.recovery_data import LAMINI
    from hfprune.validation import text_fields

    needs: dict[tuple[str, str], Need] = {}
    for variant in variants(cfg).values():
        hub_dir = hub_datasets_dir(variant)
        for entry in variant["models"]:
            spec = ModelSpec.from_config(entry)
            if spec.kind == "hub":
                needs.setdefault(("model", spec.source), Need("model", spec.source, spec.source))
        for _field, value, role in text_fields(variant):
            source = text_source(value, role, hub_dir)
            if not is_local(source):  # c4 for calibration and for evaluation are two shards
                needs.setdefault(("dataset", source), Need("dataset", f"{source.label} ({role})", source))
        rec = variant["recovery"]
        if rec["enabled"] and rec["data"] == "lamini" and not Path(hub_path(LAMINI, hub_dir)).is_dir():
            needs.setdefault(("dataset", LAMINI), Need("dataset", LAMINI, text_source(
                {"hf": LAMINI, "split": "train", "field": "instruction"}, "eval", hub_dir)))
        for need in _tasks(variant):
            needs.setdefault(("task", need.name), need)
    return list(needs.values())


def fetch(need: Need) -> None:
    """Download one need into the cache the jobs read (HF_HOME), with the calls the jobs make."""
    if need.kind == "model":
        from huggingface_hub import snapshot_download

        snapshot_download(need.fetch, allow_patterns=MODEL_FILES)
    elif need.kind == "dataset":
        from hfprune.data import load_texts

        load_texts(need.fetch)
    else:
        from hfprune.tasks import load_tasks, task_manager_for

        name, cfg = need.fetch
        ev = cfg["evaluation"]
        load_tasks(task_manager_for([name], ev["include_path"]), [name], ev["task_data"])


def go_online() -> None:
    """Let this process reach the hub: hfprune's default (and a user's) HF_HUB_OFFLINE off, also where
    huggingface_hub or datasets already read it at import."""
    import os
    import sys

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "0"
    os.environ.pop("HFPRUNE_OFFLINE_DEFAULT", None)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = False
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = False
