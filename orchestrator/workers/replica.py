"""A model replica on one device: a role under one sharding (mesh + layout), held as this
device's slices of the weights, as the planner's rules give them (planner.realloc).

Before its first call a replica is only its slices; the first call builds its module
(tensor parallel over its tp group when tp > 1) with those slices in place, and the
engines its calls need: a trainer for a train call, a generator for a generate call.
Slices are named as the plan names them (the LM's Hugging Face names; see
orchestrator.models.kinds for PMOE policies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.models.kinds import ModelKind, build_model, to_module_names, to_plan_names, trunk
from orchestrator.workers.groups import Sharding, sharding_key
from planner.catalogue import ModelShape


@dataclass
class RoleModel:
    """What every device knows of a role's model, in or out of the role's meshes."""

    kind: ModelKind
    shape: ModelShape
    config: dict[str, Any]  # the Hugging Face config its modules are built from
    folder: str  # the Hugging Face folder its weights start from


@dataclass
class Replica:
    role: str
    sharding: Sharding
    model: RoleModel
    shards: dict[str, torch.Tensor] = field(default_factory=dict)  # until the module exists
    module: torch.nn.Module | None = None
    ctx: Any = None  # the interfaces' WorkerContext, built with the module
    version: int = 0  # the role's weights version it holds (counted by the controller)
    generates: bool = False  # a generate call runs on it

    @property
    def key(self) -> tuple[str, str]:
        return self.role, sharding_key(self.sharding)

    @property
    def trains(self) -> bool:
        return self.ctx is not None and self.ctx.train is not None

    def build(self, tp_group: Any, device: torch.device) -> torch.nn.Module:
        """The replica's module with its slices in place (built once)."""
        if self.module is not None:
            return self.module
        mesh, lay = self.sharding
        if lay.pp > 1:
            raise NotImplementedError(
                f"replica {self.role} under {sharding_key(self.sharding)}: pipeline-parallel "
                "calls are not executed by this runtime (plans with pp > 1 are simulation-"
                "only); use a layout with pp = 1"
            )
        from orchestrator.models.tensor_parallel import load_shards, parallelize

        model = build_model(self.model.kind, self.model.config).to(device)
        if lay.tp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            ranks = torch.distributed.get_process_group_ranks(tp_group)
            parallelize(trunk(self.model.kind, model),
                        DeviceMesh.from_group(tp_group, device.type, mesh=ranks))  # fmt: skip
        load_shards(model, to_module_names(self.model.kind, self.shards, model))
        self.shards = {}  # the module holds them now
        self.module = model.eval()
        return model

    def current(self) -> dict[str, torch.Tensor]:
        """This device's slices of the weights now (plan names), without a copy. Under
        ZeRO-3 call it inside `readable()`."""
        if self.module is None:
            return dict(self.shards)
        from orchestrator.models.tensor_parallel import local_shards

        return to_plan_names(self.model.kind, local_shards(self.module))

    def readable(self) -> Any:
        """A context in which `current()` reads full values (ZeRO-3 gathers its
        partitions over the data-parallel group: every rank of it enters together)."""
        import contextlib

        return self.ctx.train.gathered() if self.trains else contextlib.nullcontext()

    def overwrite(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the weights with this device's slices `tensors` (plan names): a trained
        replica through its trainer (which also refreshes its optimizer's fp32 copies)."""
        if self.module is None:
            self.shards = dict(tensors)
            return
        named = to_module_names(self.model.kind, tensors, self.module)
        if self.trains and hasattr(self.ctx.train, "load_weights"):
            self.ctx.train.load_weights(named)
            return
        from orchestrator.models.tensor_parallel import load_shards

        load_shards(self.module, named)
