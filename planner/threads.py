"""How many CPU threads each call of a step computes with, and how many cores it gets.

A CPU device is a slot of a node's cores with `cluster.threads_per_device` torch threads.
Slots that compute at once share the node's cores, but a call that runs while nothing
else can (the generation that starts a step, the actor's train call that ends a ReMax or
GRPO step) would leave most cores idle on its one thread. With `cluster.call_threads=auto`
each call gets the node's cores divided among the devices that can be busy while it runs:
its own and those of every call that is neither its ancestor nor its descendant in the
graph (no schedule runs it beside anything else). Never fewer than threads_per_device.

The runtime sets these threads (orchestrator.runtime.plan_runtime); the planner uses the
same figures to scale measured call times from the layout they were measured under to
the plan at hand (planner.measured).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from planner.layout import Mesh


def concurrent(
    parents: Mapping[str, Iterable[str]], overlapped: frozenset[str] = frozenset()
) -> dict[str, set[str]]:
    """Call -> the calls that may run at the same time as it: neither its ancestors nor
    its descendants (`parents`: call -> the calls whose outputs it reads). `overlapped`:
    calls that also run beside every other call (the train calls, when the next step's
    rollout is launched while they run: train.overlap_generation)."""
    up: dict[str, set[str]] = {}

    def ancestors(name: str) -> set[str]:
        if name not in up:
            up[name] = set()
            for p in parents[name]:
                up[name] |= {p} | ancestors(p)
        return up[name]

    names = list(parents)
    return {n: {m for m in names if m != n and (m not in ancestors(n) and n not in ancestors(m)
                                                 or (m in overlapped) != (n in overlapped))}
            for n in names}  # fmt: skip


def fused_parents(
    parents: Mapping[str, Iterable[str]], groups: Iterable[Iterable[str]]
) -> dict[str, set[str]]:
    """`parents` with each group of calls fused into one task (algos.graph.fused_groups)
    as one call: a member waits for every member's producers, and a consumer of one
    member for all of them (ReMax's greedy reward call then never runs beside the
    sampled generation it is fused after)."""
    group_of = {m: tuple(g) for g in groups for m in g}
    out = {}
    for name in parents:
        producers = {p for m in group_of.get(name, (name,)) for p in parents[m]}
        out[name] = {q for p in producers for q in group_of.get(p, (p,))}
    return out


def busy_devices(
    parents: Mapping[str, Iterable[str]],
    meshes: Mapping[str, Mesh],
    devices_per_node: int,
    light: frozenset[str] = frozenset(),
    overlapped: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """Call -> the most devices of one of its nodes that can compute while it runs (its
    own included). `light`: calls that barely compute (a reward function or verifier:
    no model), which keep no device busy; `overlapped`: see `concurrent`."""
    out = {}
    for name, others in concurrent(parents, overlapped).items():
        devices = set(meshes[name].devices)
        busy = set(devices)
        for o in others - light:
            busy |= set(meshes[o].devices)
        out[name] = max(sum(1 for d in busy if d // devices_per_node == node)
                        for node in {d // devices_per_node for d in devices})  # fmt: skip
    return out


def call_threads(
    parents: Mapping[str, Iterable[str]],
    meshes: Mapping[str, Mesh],
    devices_per_node: int,
    cores_per_node: int,
    threads_per_device: int,
    light: frozenset[str] = frozenset(),
    overlapped: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """Call name -> torch threads for each of its devices (see the module docstring)."""
    busy = busy_devices(parents, meshes, devices_per_node, light, overlapped)
    return {n: max(threads_per_device, cores_per_node // b) for n, b in busy.items()}


def cores_per_device(threads: int, busy: int, cores_per_node: int) -> float:
    """The cores a device computes with: its threads, unless the node's busy devices ask
    for more than it has (then an equal share)."""
    return min(float(threads), cores_per_node / busy)
