"""The interface registry: an MFC names its interface, a function (ctx, batch, options)
-> (outputs, metrics) that runs on the worker holding the call's replica, with what that
worker holds for the role (`WorkerContext`). Every name registers once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.engines.generate import GenerationEngine
from orchestrator.engines.train import TrainEngine
from orchestrator.models.batch import (
    Batch,
)

Metrics = dict[str, float]


@dataclass
class WorkerContext:
    """What a worker holds for its role: the module, engines, tokenizer and task."""

    role: str
    module: torch.nn.Module | None
    tokenizer: Any
    task: Any
    train: TrainEngine | Any = None  # TrainEngine, or TensorParallelTrainEngine (tp > 1)
    generator: GenerationEngine | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reward: Any = None  # orchestrator.data.reward_fns.LoadedReward: the user's functions
    rows: Any = None  # orchestrator.data.prompts.RowTable: the run's RL rows, per split
    task_rows: bool = True  # the rows are the task's own prompts (its verifier applies)


Interface = Callable[[WorkerContext, Batch, Mapping[str, Any]], tuple[Batch, Metrics]]


INTERFACES: dict[str, Interface] = {}


# name -> the same interface over several calls of one replica at once (one engine batch):
# fn(ctx, [batch, ...], [options, ...]) -> [(outputs, metrics), ...], one per call
FUSED: dict[str, Callable[..., list[tuple[Batch, Metrics]]]] = {}


def fused_interface(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        FUSED[name] = fn
        return fn

    return register


def interface(name: str) -> Callable[[Interface], Interface]:
    def register(fn: Interface) -> Interface:
        if name in INTERFACES:
            raise ValueError(f"interface '{name}' is registered twice")
        INTERFACES[name] = fn
        return fn

    return register
