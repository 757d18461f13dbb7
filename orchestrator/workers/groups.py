"""Shardings and the process groups of a plan's device world.

A sharding is a (mesh, layout) pair. Every device worker is one rank of one
torch.distributed world (rank = device number); a sharding's tensor-parallel groups (same
dp and pp index) and data-parallel groups (same pp and tp index) are subgroups of it,
created up front by every worker in the same order.
"""

from __future__ import annotations

import socket
from typing import Any

from planner.layout import Layout, Mesh

Sharding = tuple[Mesh, Layout]


def sharding_key(sharding: Sharding) -> str:
    mesh, lay = sharding
    return f"{mesh} dp{lay.dp} tp{lay.tp} pp{lay.pp}"


def group_ranks(sharding: Sharding, kind: str) -> list[list[int]]:
    """The device groups of a sharding: 'tp' (same dp and pp index), 'dp' (same pp and
    tp index)."""
    mesh, lay = sharding
    groups: dict[tuple[int, int], list[int]] = {}
    for dev, dp_i, pp_i, tp_i in lay.ranks(mesh):
        key = (dp_i, pp_i) if kind == "tp" else (pp_i, tp_i)
        groups.setdefault(key, []).append(dev)
    return list(groups.values())


def plan_groups(num_devices: int, shardings: list[Sharding]) -> list[list[int]]:
    """Every group a plan's workers create, in one order: each device alone, then the tp
    and dp groups of every sharding."""
    groups = [[d] for d in range(num_devices)]
    for sh in shardings:
        for kind in ("tp", "dp"):
            groups += [g for g in group_ranks(sh, kind) if g not in groups]
    return groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(device: str) -> str:
    """The torch.distributed backend of a device kind: NCCL between GPUs, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


class DataParallelGroups:
    """What DeepSpeed asks of a model-parallel unit (`mpu`): data parallelism over a
    subset of the world and no model parallelism."""

    def __init__(self, dp_group: Any, self_group: Any) -> None:
        self.dp, self.mp = dp_group, self_group

    def get_data_parallel_group(self) -> Any:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.dp)

    def get_data_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.dp)

    def get_model_parallel_group(self) -> Any:
        return self.mp

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    # the names DeepSpeed also looks up
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
