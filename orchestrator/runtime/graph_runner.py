"""Running one step of a dataflow graph: every call once, each as soon as its inputs
exist, calls on disjoint meshes at the same time; data moves between workers as Ray
object references, never through the controller.

A step can also be launched in two parts, its rollout (every call but the train calls)
and then its train calls (`launch`, `finish`): the RL loop launches the next step's
rollout before this step's train calls when it overlaps them (train.overlap_generation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from algos.graph import CallKind, DataflowGraph
from orchestrator.runtime.plan_runtime import Dispatched, PlanRuntime
from orchestrator.workers.failures import WorkerLost

RUNNING_CALLS_WAIT_S = 60.0


@dataclass
class Launched:
    """The dispatched calls of one step: each call's outputs (Ray references to its
    ranks' parts) and what is left to wait for."""

    data_ref: Any
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    running: dict[str, Dispatched] = field(default_factory=dict)


def rollout_calls(graph: DataflowGraph) -> set[str]:
    """The calls that make a step's samples: every call but the train calls."""
    return {c.name for c in graph.calls if c.kind is not CallKind.TRAIN}


def launch(
    graph: DataflowGraph,
    runtime: PlanRuntime,
    options: dict[str, dict[str, Any]],
    names: Iterable[str],
    step: Launched | dict[str, torch.Tensor],
) -> Launched:
    """Dispatch the calls `names` of a step (producers first; calls fused into one task),
    after the reallocations their replicas need. `step`: the step's dataset, or the step
    launched so far, whose calls' outputs feed these. Nothing is waited for here."""
    import ray

    if not isinstance(step, Launched):
        runtime.begin_step(graph)  # the step's reallocations go first, in the planner's order
        step = Launched(ray.put(step))
    names = set(names)
    for group in runtime.groups(graph):
        if not names & {c.name for c in group}:
            continue
        assert {c.name for c in group} <= names, f"fused calls {group} split between parts"
        inputs = [[step.data_ref] + [r for p in graph.parents(c) for r in step.outputs[p]]
                  for c in group]  # fmt: skip
        ds = runtime.dispatch_fused(group, [options.get(c.name, {}) for c in group], inputs, graph)
        for call, d in zip(group, ds):
            step.outputs[call.name], step.running[call.name] = d.outputs, d
    return step


def finish(runtime: PlanRuntime, running: dict[str, Dispatched]) -> dict[str, dict[str, float]]:
    """Wait for the calls `running`; returns each call's metrics. The first call that
    fails raises: a dead worker at once (WorkerLost), a call's own error once the other
    calls in flight have ended (so the next step starts clean)."""
    import ray

    waiting = {ref: name for name, d in running.items() for ref in d.waits}
    left = {name: len(d.waits) for name, d in running.items()}
    metrics: dict[str, dict[str, float]] = {}
    try:
        while waiting:
            finished, _ = ray.wait(list(waiting), num_returns=1)
            for ref in finished:
                name = waiting.pop(ref)
                try:
                    ray.get(ref)  # raises the call's error at once
                except Exception as e:
                    failure = runtime.failure(ref, e, name)
                    if isinstance(failure, WorkerLost):
                        # the runtime is replaced: nothing to wait for (a dead worker's peers
                        # may wait on it in a collective forever)
                        raise failure from None
                    # the call's own error (a reward that raised): let the calls still in
                    # flight end first (bounded: ranks of a failed call may wait on it in a
                    # collective forever)
                    ray.wait(list(waiting), num_returns=len(waiting), timeout=RUNNING_CALLS_WAIT_S)
                    raise
                left[name] -= 1
                if not left[name]:
                    d = running[name]
                    metrics[name] = d.finish(ray.get(d.waits))
    finally:
        runtime.forget(d for d in running.values())
    return metrics


def run_graph(
    graph: DataflowGraph,
    runtime: PlanRuntime,
    dataset: dict[str, torch.Tensor],
    options: dict[str, dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Run every call of the graph once on the plan's workers; returns each call's
    metrics. The whole step is dispatched at once, producers first: each call starts on
    its workers as soon as its inputs exist, without a round trip through this loop.
    Outputs stay in Ray's object store and reach their consumers as references."""
    step = launch(graph, runtime, options, [c.name for c in graph.calls], dataset)
    return finish(runtime, step.running)
