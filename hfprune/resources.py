"""What a job holds and how it uses it (config `resources:`, the accessor is hfprune.config.gpus_per_job): the device
map a model is loaded with, the offload check after loading, torch's thread pools and the memory of the GPUs the job
holds. Operational settings: none of this changes what a job computes (docs/GPU.md).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from hfprune.errors import ConfigError, HFPruneError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _max_memory(value: dict | None) -> dict | None:
    """accelerate's max_memory with GPU indices as ints (YAML or JSON may give "0")."""
    if value is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in value.items()}


def placement(cfg: dict, model: str, device: torch.device) -> dict:
    """The keyword arguments of hfprune.models.load_model for a job on `device` (resolved): the config's
    device_map, max_memory and allow_offload on CUDA; on CPU no device map at all (`device: cpu` means CPU, and
    accelerate would otherwise spread the model over every GPU it sees, with no slot held)."""
    from hfprune.config import model_resources

    if device.type != "cuda" or cfg["device_map"] is None:
        return {"device_map": None}
    res = model_resources(cfg, model)
    return {"device_map": cfg["device_map"], "max_memory": _max_memory(res["max_memory"]),
            "allow_offload": res["allow_offload"]}


def check_offload(model, name: str, allow_offload: bool = False) -> None:
    """A model loaded with a device map that accelerate placed (partly) on `cpu` or `disk` runs many times slower:
    stop, naming the knobs, unless resources.allow_offload. (transformers sets `hf_device_map` only for a model
    spread over several devices; one on a single device is where its weights are.)"""
    device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device.type}
    offloaded = [m for m, d in device_map.items() if str(d) in ("cpu", "disk")]
    if offloaded and not allow_offload:
        raise HFPruneError(f"model {name!r}: accelerate offloaded {len(offloaded)} of {len(device_map)} modules to "
                           f"cpu/disk (e.g. {offloaded[0] or 'the whole model'!r}), which is many times slower; raise "
                           "resources.gpus_per_job or resources.max_memory, or set resources.allow_offload: true")


def configure_threads(threads: int | None) -> tuple[int, int]:
    """Set torch's intra- and inter-op pools to `threads` (None: the cores this process may use, its CPU affinity:
    a SLURM or taskset allocation, not the machine's count), before any parallel work; returns what torch reports
    and logs it (the job's log shows it)."""
    import torch

    n = len(os.sched_getaffinity(0)) if threads is None else threads
    if n < 1:
        raise ConfigError(f"--threads {n} must be >= 1")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # parallel work already ran in this process: the log below says what it is
        pass
    counts = torch.get_num_threads(), torch.get_num_interop_threads()
    log.info("torch threads: intra-op %d, inter-op %d", *counts)
    return counts


def held_gpu_memory(all_devices: bool) -> int | None:
    """Free bytes of the GPUs this job holds (CUDA_VISIBLE_DEVICES as the slot wrapper set it; the first only
    without a device map): NVML where nvidia-ml-py is installed, else torch inside the job. None without a GPU."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None and listed:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(int(d)) if d.isdigit()
                       else pynvml.nvmlDeviceGetHandleByUUID(d) for d in listed]
            return sum(pynvml.nvmlDeviceGetMemoryInfo(h).free for h in (handles if all_devices else handles[:1]))
        finally:
            pynvml.nvmlShutdown()
    import torch

    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count() if all_devices else 1
    return sum(torch.cuda.mem_get_info(i)[0] for i in range(n))


GPU_MEMORY_USABLE = 0.9  # of a GPU's memory: the CUDA context and allocator fragmentation take the rest


def suggest_gpus(peak_bytes: float, gpu_memory_gb: float) -> int:
    """GPUs whose memory (at GPU_MEMORY_USABLE) holds a job's estimated peak when split over them."""
    return max(1, math.ceil(peak_bytes / (gpu_memory_gb * 2**30 * GPU_MEMORY_USABLE)))


def gpu_suggestions(cfg: dict, table) -> list[str]:
    """One line per model: the gpus_per_job its stages' estimated peaks (hfprune.estimates, column `memory`)
    suggest on GPUs of resources.gpu_memory_gb, beside what the config asks for."""
    from hfprune.config import GPU_STAGES, gpus_per_job, model_resources

    out = []
    for model, rows in table.groupby("model", sort=False):
        per_gpu = model_resources(cfg, model)["gpu_memory_gb"]
        if per_gpu is None:
            out.append(f"model {model!r}: set resources.gpu_memory_gb (one GPU's memory) for a gpus_per_job "
                       "suggestion")
            continue
        peaks = rows.groupby("stage")["memory"].max()
        stages = [s for s in GPU_STAGES if s in peaks]
        suggested = {s: suggest_gpus(peaks[s], per_gpu) for s in stages}
        asked = {s: gpus_per_job(cfg, model, s) for s in stages}
        out.append(f"model {model!r} on {per_gpu:g} GB GPUs: suggested resources.gpus_per_job "
                   + "{" + ", ".join(f"{s}: {n}" for s, n in suggested.items()) + "} (peaks "
                   + ", ".join(f"{s} {peaks[s] / 2**30:.1f} GiB" for s in stages) + "; the config asks "
                   + ", ".join(f"{s} {n}" for s, n in asked.items()) + ")"
                   + ("; recover splits over GPUs with FSDP only (DDP keeps a copy per GPU)"
                      if suggested.get("recover", 1) > 1 else ""))
    return out
