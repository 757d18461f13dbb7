"""Test-only training and forward passes on a DeviceWorker's replicas (the runtime trains
through the MFC interfaces; these plain steps check sharded models against one process's
numbers): next-token cross-entropy, gradients averaged over the replica's data-parallel
group, plain SGD or AdamW on this rank's shards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _module(worker: Any, role: str, sharding: Any) -> tuple[Any, torch.nn.Module]:
    rep = worker._replica(role, sharding)
    model = rep.build(worker._group(worker._my_group(sharding, "tp")), worker.torch_device)
    return rep, model


def _share(worker: Any, batch: Mapping[str, torch.Tensor], sharding: Any) -> torch.Tensor:
    """This device's data-parallel share of the batch's rows (dp ranks in order)."""
    _, lay = sharding
    dp_i, _, _ = worker._ranks(sharding)
    return batch["input_ids"].chunk(lay.dp)[dp_i]


def forward(
    worker: Any, role: str, sharding: Any, batch: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """Logits of this device's share of `batch`; None from all but the first rank of each
    tp group."""
    _, model = _module(worker, role, sharding)
    with torch.no_grad():
        logits = model.eval()(input_ids=_share(worker, batch, sharding)).logits
    return logits if worker._ranks(sharding)[2] else None


def train_step(
    worker: Any,
    role: str,
    sharding: Any,
    batch: Mapping[str, torch.Tensor],
    lr: float,
    optimizer: str = "sgd",
) -> float:
    """One optimizer step of this rank's share of `batch`; returns the group's mean loss."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rep, model = _module(worker, role, sharding)
    dp = worker._group(worker._my_group(sharding, "dp"))
    n = len(worker._my_group(sharding, "dp"))
    opt = getattr(rep, "_test_optimizer", None)
    if opt is None:
        opt = rep._test_optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    ids = _share(worker, batch, sharding)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for p in model.parameters():
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(g, group=dp)
        g.div_(n)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=dp)
    return float(loss) / n
