"""Where tensors live on a model that may span several devices (an accelerate device map), as small pure rules.

Under a device map the input embedding sits on the first device, the decoder's last layers, its final norm and
`lm_head` on the last one, and accelerate's hooks move activations between them. Code that builds index, mask
or position tensors therefore puts each one on the device of the tensor it meets (`on`), never on
`model.device` (the first device): hidden states come out on the final norm's device, logits on `lm_head`'s
(its execution device, which an offloaded weight does not show), so the rules read the tensor, not the model.
Synchronisation and peak memory cover every device the model uses, not the current one.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embedding's device (the first device of a device map)."""
    return model.get_input_embeddings().weight.device


def model_devices(model) -> list[torch.device]:
    """The distinct devices of a model's parameters and buffers, in module order."""
    seen: dict = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen.setdefault(tensor.device, None)
    return list(seen)


def on(index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`index` (an index, mask or position tensor) on the device of the tensor it is applied to; no copy when it
    is already there. Host tensors are copied asynchronously (the copy is ordered before any use on the device)."""
    if index.device == target.device:
        return index
    return index.to(target.device, non_blocking=index.device.type == "cpu" and index.is_pinned())


def cuda_devices(devices) -> list[torch.device]:
    return [d for d in devices if d.type == "cuda"]


def synchronize(devices) -> None:
    """Wait for the queued work of every CUDA device in `devices` (timing a split model waits for all of them)."""
    import torch

    for d in cuda_devices(devices):
        torch.cuda.synchronize(d)


def reset_peak_memory(devices) -> None:
    import torch

    for d in cuda_devices(devices):
        torch.cuda.reset_peak_memory_stats(d)


def peak_memory_mb(devices) -> dict[str, float]:
    """Peak memory per device in MiB: allocated tensors of each CUDA device in `devices`; without one, the
    process's peak resident set ("cpu"). "total" sums the devices."""
    import torch

    cuda = cuda_devices(devices)
    if cuda:
        per = {str(d): torch.cuda.max_memory_allocated(d) / 2**20 for d in cuda}
    else:
        per = {"cpu": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    return {**per, "total": sum(per.values())}


class PerDevice:
    """Host tensors copied to each device that asks for them, once: built once per batch, a hook of every layer
    of a split model gets the copy on its own device without a host-to-device copy per layer."""

    def __init__(self, *tensors: torch.Tensor):
        self._host = tensors
        self._copies: dict = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in self._host)
        return self._copies[device]
