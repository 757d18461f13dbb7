"""Call times measured on the cluster at hand (`relay profile --calls`), for the planner.

The roofline of planner.cost predicts a GPU's large calls well, but not a call whose time
is mostly fixed costs (a small model's Python, kernel launches, gloo's latency, DeepSpeed's
step), nor several device workers sharing a CPU's cores. So the profile runs the job's own
graph for a few steps under each candidate layout, every call on the same mesh (the
symmetric plan of that layout on the first m devices), and records each call's mean time
with the threads it computed with. The planner then costs a call by:

1. the measured time of the call at its mesh size, data- and tensor-parallel degrees,
   scaled by the roofline from one micro-batch to the plan's count;
2. else the roofline, scaled by the median ratio of measured to roofline time of the
   calls of the same kind (generate, inference, train) in the profile.

Either is then scaled from the cores the call had when measured to the cores it has under
the plan (planner.threads: its own threads, or a share of the node's cores when the plan
keeps more devices busy at once than the node has cores), and every step pays the
profile's measured orchestration overhead (dispatch, transfers, logging).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.threads import busy_devices, cores_per_device, fused_parents

Key = tuple[str, int, int, int]  # call, mesh size, dp, tp


@dataclass(frozen=True)
class Measured:
    seconds: float  # mean time of the call (one micro-batch)
    cores: float  # cores each of its devices computed with (planner.threads)


@dataclass
class CallProfile:
    """A `relay profile --calls` file: what it measured, for which job."""

    job: dict[str, Any]  # what the times are of: graph, shapes, batch, lengths, backend
    calls: dict[Key, Measured]
    kind_ratio: dict[str, float]  # call kind -> median measured / roofline time
    step_overhead_s: float
    cores_per_node: int
    # call -> {cores: seconds} on one device: how the call's time follows its cores
    curves: dict[str, dict[float, float]] = field(default_factory=dict)

    def lookup(self, call: str, size: int, dp: int, tp: int) -> Measured | None:
        return self.calls.get((call, size, dp, tp))

    def scale(self, call: str, cores_from: float, cores_to: float) -> float:
        """time(cores_to) / time(cores_from) of the call: by its one-device curve where
        the profile measured it at several core counts (linear between them, time-sliced
        below the fewest, no faster above the most), else in inverse proportion."""
        points = sorted(self.curves.get(call, {}).items())
        if len(points) < 2:
            return cores_from / cores_to
        return _time_at(points, cores_to) / _time_at(points, cores_from)


def _time_at(points: list[tuple[float, float]], cores: float) -> float:
    (c0, t0) = points[0]
    if cores <= c0:
        return t0 * c0 / cores
    for (a, ta), (b, tb) in zip(points, points[1:]):
        if cores <= b:
            return ta + (tb - ta) * (cores - a) / (b - a)
    return points[-1][1]


def read_call_profile(path: str | Path) -> CallProfile:
    data = json.loads(Path(path).read_text())
    calls: dict[Key, Measured] = {}
    curves: dict[str, dict[float, float]] = {}
    for c in data["calls"]:
        key = (c["call"], int(c["mesh_size"]), int(c["dp"]), int(c["tp"]))
        m = Measured(float(c["seconds"]), float(c["cores"]))
        if key not in calls or m.cores > calls[key].cores:  # the run with the most cores
            calls[key] = m
        if key[1] == 1:
            curves.setdefault(key[0], {})[m.cores] = m.seconds
    return CallProfile(
        data["job"], calls, {k: float(v) for k, v in data["kind_ratio"].items()},
        float(data["step_overhead_s"]), int(data["cores_per_node"]), curves,
    )  # fmt: skip


def median_ratios(pairs: list[tuple[str, float, float]]) -> dict[str, float]:
    """Call kind -> median of measured / roofline over (kind, measured, roofline)."""
    kinds = {k for k, _, _ in pairs}
    return {k: statistics.median(m / r for kk, m, r in pairs if kk == k and r > 0) for k in kinds}


# The planner's Context costs that use a profile (planner.plan.Context: `call_s`,
# `slowdowns`), kept here beside the profile they read.


def alone_s(ctx: Any, call: str, a: Any) -> float:
    """The call's time on its mesh with nothing else computing on the node: measured
    where the profile has it, else the roofline (times its kind's measured ratio)."""
    roof, prof = ctx.roofline_s(call, a), ctx.measured
    if prof is None:
        return roof
    m = prof.lookup(call, a.mesh.size, a.layout.dp, a.layout.tp)
    if m is None:
        return roof * prof.kind_ratio.get(ctx.workload.call(call).kind.value, 1.0)
    one = ctx.roofline_s(call, replace(a, layout=replace(a.layout, micro_batches=1)))
    alone = call_cores(ctx, a.mesh.size, a.mesh.size)
    return m.seconds * roof / one * prof.scale(call, m.cores, alone)


def call_cores(ctx: Any, size: int, busy: int) -> float:
    """Cores per device of a call on `size` devices of a node where `busy` devices compute
    at once (planner.threads, as the runtime gives threads)."""
    n = ctx.measured.cores_per_node if ctx.measured else 1
    threads = max(ctx.threads_per_device, n // busy) if ctx.auto_threads else (
        ctx.threads_per_device)  # fmt: skip
    return cores_per_device(threads, busy, n)


def plan_slowdowns(ctx: Any, assign: dict[str, Any]) -> dict[str, float]:
    """Call -> how much slower than alone it runs under the plan: the node's cores shared
    with the calls that may run beside it (1 without a profile)."""
    if ctx.measured is None:
        return {c.name: 1.0 for c in ctx.topo}
    parents = fused_parents({c.name: c.parents for c in ctx.topo},
                            [[c.name for c in g] for g in ctx.groups(assign)])  # fmt: skip
    meshes = {n: a.mesh for n, a in assign.items()}
    busy = busy_devices(parents, meshes, ctx.cluster.devices_per_node)
    out = {}
    for name, b in busy.items():
        size = assign[name].mesh.size
        out[name] = ctx.measured.scale(name, call_cores(ctx, size, size),
                                       call_cores(ctx, size, b))  # fmt: skip
    return out
