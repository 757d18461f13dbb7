"""Running one step of a dataflow graph: every call once, each as soon as its inputs
exist, calls on disjoint meshes at the same time; data moves between workers as Ray
object references, never through the controller."""

from __future__ import annotations

from typing import Any

import torch

from algos.graph import DataflowGraph
from orchestrator.runtime.plan_runtime import Dispatched, PlanRuntime
from orchestrator.workers.failures import WorkerLost

RUNNING_CALLS_WAIT_S = 60.0


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
    import ray

    data_ref = ray.put(dataset)
    outputs: dict[str, list[Any]] = {}
    running: dict[str, Dispatched] = {}
    waiting: dict[Any, str] = {}  # reference -> the call it belongs to
    left: dict[str, int] = {}  # call -> references not ready yet
    done: set[str] = set()
    metrics: dict[str, dict[str, float]] = {}
    runtime.begin_step(graph)  # the step's reallocations go first, in the planner's order
    for group in runtime.groups(graph):  # producers first; calls fused into one task
        inputs = [[data_ref] + [r for p in graph.parents(c) for r in outputs[p]] for c in group]
        ds = runtime.dispatch_fused(group, [options.get(c.name, {}) for c in group], inputs, graph)
        for call, d in zip(group, ds):
            outputs[call.name], running[call.name] = d.outputs, d
            waiting.update({ref: call.name for ref in d.waits})
            left[call.name] = len(d.waits)
    while len(done) < len(graph.calls):
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
                # the call's own error (a reward that raised): let the calls still in flight
                # end first, so the next step starts clean (bounded: ranks of a failed call
                # may wait on it in a collective forever)
                ray.wait(list(waiting), num_returns=len(waiting), timeout=RUNNING_CALLS_WAIT_S)
                raise
            left[name] -= 1
            if left[name]:
                continue
            d = running.pop(name)
            metrics[name] = d.finish(ray.get(d.waits))
            done.add(name)
    return metrics
