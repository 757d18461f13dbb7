"""This device's shard of the generating role's vLLM engine.

vLLM's distributed state is global to a process and spans the whole torch.distributed
world, so every device worker of a plan builds its shard at the same time, with one
tensor-parallel degree for the whole plan: tp neighbouring devices form one engine, the
same blocks a generate call's layout groups into its tensor-parallel groups. A generate
call under (mesh, dp x tp) therefore runs on the mesh's dp engines, each on its share of
the rows. Devices outside every generate mesh hold a shard that never generates (vLLM
cannot leave them out of its groups).

Weights come from the generate call's replica on this device, which the reallocation
keeps current (its slices of the trained weights under the call's layout). A push hands
the engine each tensor at its full shape holding only this device's slice: every shard
reads only its own slice, so nothing is gathered. The one exception is the vocabulary:
vLLM splits the embedding and LM head rows its own way (padded to a multiple of 64), and
when a shard's rows are not inside the slice the plan's layout gives it, the engine's
tensor-parallel group exchanges those two tensors first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.workers.groups import Sharding, sharding_key
from planner.catalogue import ModelShape
from planner.realloc import held_range, model_tensors

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class EngineHost:
    engine: Any  # orchestrator.engines.vllm_engine.VLLMEngine
    tp: int  # the engine's tensor-parallel degree
    device: int
    holds: tuple[str, int] | None = None  # (replica key, role weights version) last pushed

    @property
    def tp_ranks(self) -> list[int]:
        """The devices of this device's engine: its block of tp neighbours."""
        first = self.device - self.device % self.tp
        return list(range(first, first + self.tp))

    def check(self, sharding: Sharding) -> None:
        """A generate call under `sharding` runs on this device's engine only if its
        tensor-parallel groups are the engine's."""
        mesh, lay = sharding
        if lay.tp != self.tp or mesh.start % self.tp:
            raise ValueError(
                f"a generate call under {sharding_key(sharding)} cannot run on this plan's "
                f"vLLM engines (tensor parallel {self.tp}, blocks of {self.tp} devices "
                "from d0): every generate call of a plan uses the same tp"
            )

    def push(
        self,
        key: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        shape: ModelShape,
        sharding: Sharding,
        tp_group: Any,
    ) -> float | None:
        """Load a replica's slices (plan names) into the engine unless it holds that
        version already; returns the seconds it took (None: nothing to do). Every device
        of the engine calls it together, with the same version (the controller's count
        of the role's weight changes), so all decide alike (the vocabulary exchange is a
        collective)."""
        if self.holds == (key, version):
            return None
        self.check(sharding)
        seconds = self.engine.sync_weights(self._full_shaped(tensors, shape, sharding, tp_group))
        self.holds = (key, version)
        return seconds

    def _full_shaped(
        self,
        tensors: Mapping[str, torch.Tensor],
        shape: ModelShape,
        sharding: Sharding,
        tp_group: Any,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor at its full shape with this device's slice in place (the rest
        uninitialised: the shard never reads it); whole tensors as they are."""
        mesh, lay = sharding
        if lay.tp == 1:
            yield from tensors.items()
            return
        specs = {t.name: t for t in model_tensors(shape)}
        vocab = self._vocabulary(tensors, shape, sharding, tp_group)
        for name, local in tensors.items():
            if name in vocab:
                yield name, vocab[name]
                continue
            t = specs[name]
            if t.split_dim is None:
                yield name, local
                continue
            lo, hi = held_range(t, shape.layers, mesh, lay, self.device)  # type: ignore[misc]
            full = torch.empty(t.shape, dtype=local.dtype, device=local.device)
            full.narrow(t.split_dim, lo, hi - lo).copy_(local)
            yield name, full

    def _vocabulary(
        self,
        tensors: Mapping[str, torch.Tensor],
        shape: ModelShape,
        sharding: Sharding,
        tp_group: Any,
    ) -> dict[str, torch.Tensor]:
        """The vocabulary tensors at full shape where vLLM's row split differs from the
        layout's somewhere in the engine (gathered over its tp group), else {}."""
        import torch.distributed as dist

        mesh, lay = sharding
        want_lo, want_hi = self.engine.vocab_rows()
        specs = {t.name: t for t in model_tensors(shape)}
        names = [n for n in VOCAB_TENSORS if n in tensors]
        lo, hi = held_range(specs[names[0]], shape.layers, mesh, lay, self.device)  # type: ignore[misc]
        place = tensors[names[0]].device  # NCCL reduces tensors on the GPU
        outside = torch.tensor([float(want_lo < want_hi and (want_lo < lo or want_hi > hi))],
                               device=place)  # fmt: skip
        dist.all_reduce(outside, op=dist.ReduceOp.MAX, group=tp_group)
        if not outside.item():
            return {}
        out = {}
        rows = -(-shape.vocab // lay.tp)  # torch.chunk: ceil(V / tp) rows per rank
        for name in names:
            local = tensors[name]
            padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
            padded[: local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in range(lay.tp)]
            dist.all_gather(parts, padded, group=tp_group)
            out[name] = torch.cat(parts)[: shape.vocab]
        return out


class EngineGenerator:
    """The `GenerationEngine` a generate call of a replica sees: this device's vLLM shard,
    brought up to the replica's weights first."""

    def __init__(self, worker: Any, rep: Any) -> None:
        """worker: the DeviceWorker; rep: the replica whose calls generate."""
        self.worker, self.rep = worker, rep

    @property
    def engine(self) -> Any:
        return self.worker.engine.engine

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: Any) -> Any:
        self.worker.push_engine(self.rep)
        return self.engine.generate(prompt_ids, prompt_mask, params)

    def generate_many(self, parts: list[Any]) -> list[Any]:
        self.worker.push_engine(self.rep)
        return self.engine.generate_many(parts)

    def sequence_logprobs(self, *batch: torch.Tensor) -> torch.Tensor:
        self.worker.push_engine(self.rep)
        return self.engine.sequence_logprobs(*batch)
