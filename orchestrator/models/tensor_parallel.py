"""Tensor parallelism for the Llama-architecture models, with torch's tensor-parallel API
(DTensor over a DeviceMesh; tested on CPU with gloo), sharded exactly as the planner's
reallocation rules say (planner.realloc), so the slices a reallocation delivers load
straight into the parallel model:

- q/k/v, gate and up projections: column-parallel (weight rows, dim 0, split);
- o and down projections: row-parallel (weight columns, dim 1, split; outputs summed);
- the embedding: split along its vocabulary rows (dim 0), each rank looking up its own
  rows and the partial embeddings summed;
- the LM head: column-parallel over the vocabulary, logits gathered to every rank;
- norms and a scalar value head (critic, reward model): replicated.

Splits follow torch.chunk: ceil(n / tp) rows per rank, the last ones shorter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)


def tp_plan(model: torch.nn.Module) -> dict[str, ParallelStyle]:
    """The parallel style of every sharded submodule of a (causal or value) Llama model,
    by its module path."""
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
    }
    for i, _ in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    if hasattr(model, "lm_head"):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def parallelize(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """Shard `model` in place over the one-dimensional tensor-parallel `mesh`; every rank
    of the mesh must call it with the same weights."""
    if mesh.ndim != 1:
        raise ValueError(f"a tensor-parallel mesh has one dimension, got {mesh.ndim}")
    return parallelize_module(model, mesh, tp_plan(model))


def local_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's pieces of the model's weights, by Hugging Face name (what
    orchestrator.workers.realloc.shard_state gives the rank under the same layout)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        out[name] = value.to_local() if isinstance(value, DTensor) else value
    return out


def load_shards(model: torch.nn.Module, shards: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's pieces into the parallel model's weights, in place (the slices a
    reallocation delivered). Every weight must be given, at its local shape."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(shards))
    if missing:
        raise KeyError(f"no shard for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, param in params.items():
            local: Any = param.to_local() if isinstance(param, DTensor) else param
            piece = shards[name]
            if tuple(local.shape) != tuple(piece.shape):
                raise ValueError(
                    f"{name}: the shard has shape {tuple(piece.shape)}, this rank holds "
                    f"{tuple(local.shape)}"
                )
            local.copy_(piece)


def placements(model: torch.nn.Module) -> dict[str, str]:
    """Each weight's placement ('shard 0', 'shard 1', 'replicate'), for tests and docs."""
    out = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            (pl,) = param.placements
            out[name] = f"shard {pl.dim}" if isinstance(pl, Shard) else "replicate"
        else:
            out[name] = "replicate"
    return out
