"""How many CPU threads each call of a step computes with.

A CPU device is a slot of a node's cores with `cluster.threads_per_device` torch threads.
Slots that compute at once share the node's cores, but a call that runs while nothing
else can (the generation that starts a step, the actor's train call that ends a ReMax or
GRPO step) would leave most cores idle on its one thread. With `cluster.call_threads=auto`
each call gets the node's cores divided among the devices that can be busy while it runs:
its own and those of every call that is neither its ancestor nor its descendant in the
graph (no schedule runs it beside anything else). Never fewer than threads_per_device.
"""

from __future__ import annotations

from collections.abc import Mapping

from algos.graph import DataflowGraph
from orchestrator.workers.groups import Sharding


def call_threads(
    graph: DataflowGraph,
    sharding: Mapping[str, Sharding],
    devices_per_node: int,
    cores_per_node: Mapping[int, int],
    threads_per_device: int,
) -> dict[str, int]:
    """Call name -> torch threads for each of its devices (see the module docstring).
    `cores_per_node`: node index -> the cores its workers may use."""
    out: dict[str, int] = {}
    for call in graph.calls:
        devices = set(sharding[call.name][0].devices)
        busy = set(devices)
        for other in graph.concurrent(call):
            busy |= set(sharding[other][0].devices)
        share = []
        for node in {d // devices_per_node for d in devices}:
            on_node = [d for d in busy if d // devices_per_node == node]
            share.append(cores_per_node.get(node, threads_per_device) // len(on_node))
        out[call.name] = max(threads_per_device, min(share))
    return out
