"""Offload of a frozen model's weights to host memory between its calls, and reload.

A frozen role whose devices other roles compute on keeps its weights in host memory
between its calls when the plan says so (planner.plan.offloaded_roles): reloaded before
each call, offloaded after it. The module and every reference to its tensors stay as they
are (a generator, a tensor-parallel DTensor's local shard): only the storage under them
is emptied and refilled, the way FSDP frees and restores flat parameters. On a GPU the
host copy sits in pinned memory; on CPU the device is the host, so offloading there
copies the bytes into a separate host buffer and empties the model's own storage (the
same code path, and a real round trip whose exactness a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns storage: a DTensor's local shard, else the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _storages(module: torch.nn.Module) -> list[torch.UntypedStorage]:
    """Each distinct storage under the module's parameters and buffers (tied weights
    share one), in a fixed order."""
    seen: dict[tuple[str, int], torch.UntypedStorage] = {}
    for t in [*module.parameters(), *module.buffers()]:
        s = _local(t.data).untyped_storage()
        key = (str(s.device), s.data_ptr())
        if s.nbytes() and key not in seen:
            seen[key] = s
    return list(seen.values())


@dataclass
class Offloaded:
    """A module whose weights live in host memory: its emptied storages, and their
    bytes on the host in the same order."""

    storages: list[torch.UntypedStorage]
    host: list[torch.UntypedStorage] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes() for h in self.host)


def offload(module: torch.nn.Module) -> Offloaded:
    """Copy the module's weights to host memory and free their device storage."""
    storages = _storages(module)
    out = Offloaded(storages)
    for s in storages:
        h = torch.UntypedStorage(s.nbytes(), device="cpu")
        if s.device.type == "cuda":
            h = h.pin_memory()
        h.copy_(s)
        out.host.append(h)
        s.resize_(0)
    return out


def reload(done: Offloaded) -> int:
    """Refill the storages `offload` emptied with their host bytes; returns the bytes
    (0 if they were refilled already)."""
    if not done.host:
        return 0
    for s, h in zip(done.storages, done.host, strict=True):
        s.resize_(h.nbytes())
        s.copy_(h, non_blocking=False)
    n = done.nbytes
    done.host.clear()
    return n


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers hold on their device now."""
    return sum(s.nbytes() for s in _storages(module))
