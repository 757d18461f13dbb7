"""Execution plans: a mesh and a layout for every MFC, what follows from them, their
validation, their estimated cost and their file format.

From a plan follow:
- each role's home replica: the layout of its train call (trainable roles) or of its
  first call (frozen roles); its weights live there between calls;
- the other replicas: one per distinct mesh and parallel degrees the role's calls run
  under; like the runtime, every replica stays allocated for the whole run;
- reallocation hooks: a trainable role's other replica is refreshed from the home replica
  (the comm plan of planner.realloc) once per iteration, before the first call that uses
  it; the runtime runs the iteration's reallocations before its calls, in call order, so
  a replica's weights move while other calls' replicas are still being filled, not after
  those calls (ReMax's sampled and greedy generation can then run on disjoint meshes at
  once). A frozen role's replicas are all loaded at the start and never move;
- the call order: the graph's calls in waves (those whose producers are done, in graph
  order), as the runtime dispatches them; the simulator breaks ties in this order;
- offload hooks: a frozen role whose home mesh overlaps a mesh another role computes on
  may keep its weights in host memory between calls: reloaded before each call,
  offloaded after it. `Context.offload` says when: "auto" (the default) offloads the
  fewest of those roles that make the plan fit the devices' memory (none if it fits with
  all resident), "always" all of them, "never" none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from algos.graph import CallKind, group_ready_together
from planner.catalogue import Cluster
from planner.cost import (
    Placement,
    activation_bytes,
    call_time_s,
    train_state_bytes,
    weight_bytes,
)
from planner.layout import Layout, Mesh, is_valid_mesh
from planner.measured import CallProfile, alone_s, plan_slowdowns
from planner.realloc import comm_plan, realloc_s, traffic
from planner.simulate import Slot, Task, list_schedule, makespan
from planner.workload import CallWork, Workload

MEMORY_HEADROOM = 0.9  # share of a device's memory a plan may use (allocator, buffers)


@dataclass(frozen=True, order=True)
class Assignment:
    mesh: Mesh
    layout: Layout

    @property
    def replica(self) -> tuple[Mesh, int, int, int]:
        """What identifies a replica: micro-batches do not change where weights live."""
        return self.mesh, self.layout.dp, self.layout.tp, self.layout.pp

    @property
    def sharding(self) -> tuple[Mesh, Layout]:
        lay = self.layout
        return self.mesh, Layout(lay.dp, lay.tp, lay.pp, 1)


@dataclass(frozen=True)
class ReallocHook:
    role: str
    before: str  # the call that needs the weights
    src: Assignment
    dst: Assignment


@dataclass(frozen=True)
class PlanProblem:
    field: str
    value: Any
    rule: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.rule}; fix: {self.fix}"


class PlanError(ValueError):
    """A plan that cannot run; lists every problem."""

    def __init__(self, problems: list[PlanProblem]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the execution plan:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass
class Context:
    """What a plan is made for: the workload and the cluster, with cost caches."""

    workload: Workload
    cluster: Cluster
    iterations: int = 3
    max_pp: int | None = None  # layouts with a larger pipeline degree are not candidates
    offload: str = "auto"  # frozen roles sharing devices: auto | always | never (above)
    fuse: bool = True  # like calls ready together run as one task (the runtime's fusing)
    measured: CallProfile | None = None  # call times measured here (planner.measured)
    threads_per_device: int = 1  # with `measured`: the threads the runtime gives calls
    auto_threads: bool = True  # (cluster.call_threads=auto: planner.threads)
    _roof: dict[tuple, float] = field(default_factory=dict, repr=False)
    _call_s: dict[tuple, float] = field(default_factory=dict, repr=False)
    _act: dict[tuple, float] = field(default_factory=dict, repr=False)
    _realloc: dict[tuple, float] = field(default_factory=dict, repr=False)

    def placement(self, a: Assignment) -> Placement:
        return Placement(a.mesh, a.layout, self.cluster)

    def spans(self, a: Assignment) -> bool:
        return a.mesh.size > self.cluster.devices_per_node

    def roofline_s(self, call: str, a: Assignment) -> float:
        """The call's time by the roofline of planner.cost."""
        key = (call, a.mesh.size, a.layout)
        if key not in self._roof:
            w = self.workload.call(call)
            shape = self.workload.roles[w.role].shape
            self._roof[key] = call_time_s(w, shape, self.placement(a), self.workload.zero_stage)
        return self._roof[key]

    def call_s(self, call: str, a: Assignment) -> float:
        """The call's time on its mesh with nothing else computing on the node: measured
        where the profile has it, else the roofline (planner.measured)."""
        key = (call, a.mesh.size, a.layout)
        if key not in self._call_s:
            self._call_s[key] = alone_s(self, call, a)  # planner.measured
        return self._call_s[key]

    def slowdowns(self, assign: dict[str, Assignment]) -> dict[str, float]:
        return plan_slowdowns(self, assign)

    def group_s(self, calls: tuple[str, ...], a: Assignment) -> float:
        """One task running `calls` (of one role, kind and placement) as one batch: the
        cost of a call over all their sequences."""
        if len(calls) == 1:
            return self.call_s(calls[0], a)
        if self.measured is not None and all(
            self.measured.lookup(c, a.mesh.size, a.layout.dp, a.layout.tp) for c in calls
        ):  # measured fused: each call's time is its share of the task
            return sum(self.call_s(c, a) for c in calls)
        key = (calls, a.mesh.size, a.layout)
        if key not in self._call_s:
            works = [self.workload.call(c) for c in calls]
            w = replace(works[0], batch_seqs=sum(x.batch_seqs for x in works))
            shape = self.workload.roles[w.role].shape
            self._call_s[key] = call_time_s(w, shape, self.placement(a), self.workload.zero_stage)
        return self._call_s[key]

    def groups(self, assign: dict[str, Assignment]) -> list[tuple[CallWork, ...]]:
        """The calls in dispatch order, grouped into tasks as the runtime fuses them
        (algos.graph.group_ready_together)."""
        if not self.fuse:
            return [(c,) for c in self.topo]

        def key(c: CallWork) -> Any:
            return (c.role, assign[c.name].sharding, c.kind) if c.fusable else None

        return group_ready_together(self.topo, lambda c: c.name, lambda c: c.parents, key)

    def shared_call_s(self, assign: dict[str, Assignment]) -> dict[str, float]:
        """Each call's time under the plan; a fused call's is its group's, shared by
        sequences."""
        out, slow = {}, self.slowdowns(assign)
        for g in self.groups(assign):
            total = self.group_s(tuple(c.name for c in g), assign[g[0].name]) * slow[g[0].name]
            seqs = sum(c.batch_seqs for c in g)
            out.update({c.name: total * c.batch_seqs / seqs for c in g})
        return out

    def transient_bytes(self, call: str, a: Assignment) -> float:
        key = (call, a.mesh.size, a.layout)
        if key not in self._act:
            w = self.workload.call(call)
            shape = self.workload.roles[w.role].shape
            self._act[key] = activation_bytes(w, shape, self.placement(a))
        return self._act[key]

    def realloc_s(self, role: str, src: Assignment, dst: Assignment) -> float:
        key = (role, src.sharding, dst.sharding)
        if key not in self._realloc:
            shape = self.workload.roles[role].shape
            tr = traffic(shape, src.sharding, dst.sharding, self.cluster)
            self._realloc[key] = realloc_s(tr, self.cluster)
        return self._realloc[key]

    @cached_property
    def topo(self) -> tuple[CallWork, ...]:
        """The calls in waves, as the runtime dispatches them: every call whose producers
        are done, in the graph's order, then the next wave."""
        done: set[str] = set()
        order: list[CallWork] = []
        calls = list(self.workload.calls)
        while len(order) < len(calls):
            wave = [c for c in calls if c.name not in done and all(p in done for p in c.parents)]
            order += wave
            done.update(c.name for c in wave)
        return tuple(order)


def homes(ctx: Context, assign: dict[str, Assignment]) -> dict[str, Assignment]:
    out: dict[str, Assignment] = {}
    for c in ctx.topo:
        if c.kind is CallKind.TRAIN:
            out[c.role] = assign[c.name]
    for c in ctx.topo:
        out.setdefault(c.role, assign[c.name])
    return out


def replicas(ctx: Context, assign: dict[str, Assignment]) -> dict[str, list[str]]:
    """Each role's model replicas (home first): one per distinct mesh and parallel degrees
    its calls run under, with the calls that use it."""
    home = homes(ctx, assign)
    out: dict[str, list[str]] = {}
    for role in ctx.workload.roles:
        by_replica: dict[tuple, list[str]] = {home[role].replica: []}
        for c in ctx.topo:
            if c.role == role:
                by_replica.setdefault(assign[c.name].replica, []).append(c.name)
        out[role] = [f"{m} dp{dp} tp{tp} pp{pp}: {', '.join(calls)}"
                     for (m, dp, tp, pp), calls in by_replica.items()]  # fmt: skip
    return out


def realloc_hooks(ctx: Context, assign: dict[str, Assignment]) -> list[ReallocHook]:
    """One per other replica of a trainable role, before the first call that uses it."""
    home = homes(ctx, assign)
    out: dict[tuple, ReallocHook] = {}
    for c in ctx.topo:
        a = assign[c.name]
        if ctx.workload.roles[c.role].trainable and a.replica != home[c.role].replica:
            out.setdefault((c.role, a.replica), ReallocHook(c.role, c.name, home[c.role], a))
    return list(out.values())


def sharing_roles(ctx: Context, assign: dict[str, Assignment]) -> list[str]:
    """Frozen roles whose home mesh overlaps a mesh another role computes on."""
    home = homes(ctx, assign)
    out = []
    for role, r in ctx.workload.roles.items():
        if r.trainable:
            continue
        mesh = home[role].mesh
        if any(c.role != role and assign[c.name].mesh.overlaps(mesh) for c in ctx.topo):
            out.append(role)
    return out


def offloaded_roles(ctx: Context, assign: dict[str, Assignment]) -> list[str]:
    """The frozen roles the plan keeps in host memory between their calls (the module's
    docstring gives the rule of each `Context.offload` mode). auto: the fewest of the
    roles that share devices, the ones with the fewest weights first, that make the
    plan fit; all of them if none does."""
    return offload_and_memory(ctx, assign)[0]


def offload_and_memory(ctx: Context, assign: dict[str, Assignment]) -> tuple[list[str], np.ndarray]:
    """The plan's offloaded roles (`offloaded_roles`) and its peak bytes per device with
    them offloaded (`memory_per_device`), computed together: auto's rule already has the
    memory of the roles it picks."""
    share = sharing_roles(ctx, assign)
    if ctx.offload == "always" or not share:
        return share, _memory(ctx, assign, set(share))
    if ctx.offload == "never":
        return [], _memory(ctx, assign, set())
    if ctx.offload != "auto":
        raise ValueError(f"Context.offload = {ctx.offload!r}: use auto, always or never")
    cap = ctx.cluster.kind.memory_bytes * MEMORY_HEADROOM
    size = {r: ctx.workload.roles[r].shape.params for r in share}
    for k in range(len(share)):
        for subset in combinations(sorted(share, key=lambda r: (size[r], r)), k):
            mem = _memory(ctx, assign, set(subset))
            if mem.max() <= cap:
                return list(subset), mem
    return share, _memory(ctx, assign, set(share))


@dataclass
class Estimate:
    """A plan's simulated cost."""

    time_per_iteration_s: float
    call_s: dict[str, float]
    realloc_s: dict[str, float]  # keyed by the call the reallocation precedes
    memory_bytes: np.ndarray  # peak per device
    slots: list[Slot]

    def fits(self, cluster: Cluster) -> bool:
        return bool(self.memory_bytes.max() <= cluster.kind.memory_bytes * MEMORY_HEADROOM)


def memory_per_device(ctx: Context, assign: dict[str, Assignment]) -> np.ndarray:
    """Peak bytes per device: resident states plus the largest call's transient needs."""
    return offload_and_memory(ctx, assign)[1]


def _memory(ctx: Context, assign: dict[str, Assignment], off: set[str]) -> np.ndarray:
    wl, b = ctx.workload, ctx.cluster.kind.param_bytes
    home = homes(ctx, assign)
    resident = np.zeros(ctx.cluster.num_devices)
    transient = np.zeros(ctx.cluster.num_devices)
    for role, r in wl.roles.items():
        h = home[role]
        sl = slice(h.mesh.start, h.mesh.start + h.mesh.size)
        if r.trainable:
            resident[sl] += train_state_bytes(r.shape, h.layout, b, wl.zero_stage)
        elif role not in off:
            resident[sl] += weight_bytes(r.shape, h.layout, b)
    others: set[tuple] = set()  # (role, replica): the other replicas stay allocated
    for c in ctx.topo:
        a = assign[c.name]
        if c.role not in off and a.replica != home[c.role].replica:
            if (c.role, a.replica) not in others:
                others.add((c.role, a.replica))
                sl = slice(a.mesh.start, a.mesh.start + a.mesh.size)
                resident[sl] += weight_bytes(wl.roles[c.role].shape, a.layout, b)
    for c in ctx.topo:
        a = assign[c.name]
        shape = wl.roles[c.role].shape
        need = ctx.transient_bytes(c.name, a)
        if c.role in off:  # reloaded for the call, offloaded after it
            need += weight_bytes(shape, a.layout, b)
        sl = slice(a.mesh.start, a.mesh.start + a.mesh.size)
        np.maximum(transient[sl], need, out=transient[sl])
    return resident + transient


def tasks(
    ctx: Context, assign: dict[str, Assignment], offloaded: list[str] | None = None
) -> list[Task]:
    """The unrolled iterations as tasks: each iteration's reallocations (in the order of
    the calls that first use their replicas), then its calls; a role's calls of iteration
    i+1 wait for its train call of iteration i, and a call waits for the reallocation of
    its replica. A reallocation waits for the role's train call of the previous iteration
    and for the previous iteration's calls on the replica it overwrites. `offloaded`: the
    plan's offloaded roles, if the caller has them already."""
    wl, k = ctx.workload, ctx.cluster.kind
    home = homes(ctx, assign)
    off = set(offloaded_roles(ctx, assign) if offloaded is None else offloaded)
    hooks = realloc_hooks(ctx, assign)
    slow = ctx.slowdowns(assign)
    out: list[Task] = []
    index: dict[tuple[int, str], int] = {}
    refreshed: dict[tuple, int] = {}  # (role, replica) -> this iteration's reallocation
    # the calls on each hook's replica: the next iteration's reallocation overwrites it
    users = [[c.name for c in ctx.topo if c.role == h.role and assign[c.name].replica == h.dst.replica]
             for h in hooks]  # fmt: skip
    for it in range(ctx.iterations):
        train_before = {}
        for role in wl.roles:
            train = wl.train_call(role)
            if it > 0 and train is not None:
                train_before[role] = (index[(it - 1, train.name)],)
        for h, names in zip(hooks, users):
            prev = tuple(index[(it - 1, n)] for n in names) if it > 0 else ()
            out.append(
                Task(
                    f"realloc {h.role} -> {h.before}",
                    (h.src.mesh.devices, h.dst.mesh.devices),
                    ctx.realloc_s(h.role, h.src, h.dst),
                    train_before.get(h.role, ()) + prev,
                    "realloc",
                    it,
                )
            )
            refreshed[(h.role, h.dst.replica)] = len(out) - 1
        for group in ctx.groups(assign):
            c, a = group[0], assign[group[0].name]
            deps = tuple(dict.fromkeys(index[(it, p)] for m in group for p in m.parents))
            deps += train_before.get(c.role, ())
            if (c.role, a.replica) in refreshed:
                deps += (refreshed[(c.role, a.replica)],)
            names = tuple(m.name for m in group)
            duration = ctx.group_s(names, a) * slow[c.name]
            if c.role in off:  # reload before, offload after
                w = weight_bytes(wl.roles[c.role].shape, home[c.role].layout, k.param_bytes)
                duration += 2 * w / k.host_bytes_s
            out.append(Task("+".join(names), (a.mesh.devices,), duration, deps, "call", it))
            for name in names:
                index[(it, name)] = len(out) - 1
    return out


def evaluate(ctx: Context, assign: dict[str, Assignment]) -> Estimate:
    slots = list_schedule(tasks(ctx, assign), ctx.cluster.num_devices)
    re = {}
    for h in realloc_hooks(ctx, assign):
        re[h.before] = ctx.realloc_s(h.role, h.src, h.dst)
    overhead = ctx.measured.step_overhead_s if ctx.measured else 0.0
    return Estimate(
        time_per_iteration_s=makespan(slots) / ctx.iterations + overhead,
        call_s=ctx.shared_call_s(assign),
        realloc_s=re,
        memory_bytes=memory_per_device(ctx, assign),
        slots=slots,
    )


def divides_batch(work: CallWork, layout: Layout) -> str | None:
    """None if the layout's dp and micro-batches split the call's batch evenly."""
    seqs = work.batch_seqs
    if work.kind is CallKind.TRAIN:
        seqs = work.batch_seqs * work.passes // max(work.optimizer_steps, 1)
    if seqs % layout.dp:
        return f"dp={layout.dp} must divide the {seqs} sequences a pass of {work.name} takes"
    if (seqs // layout.dp) % layout.micro_batches:
        return (
            f"micro_batches={layout.micro_batches} must divide the {seqs // layout.dp} "
            f"sequences each data-parallel rank of {work.name} takes"
        )
    return None


def validate(ctx: Context, assign: dict[str, Assignment]) -> list[PlanProblem]:
    """Every reason the plan cannot run: a call without an assignment, a mesh off the
    cluster, degrees that do not multiply to the mesh or do not divide the batch, heads
    or layers, a tensor-parallel group across nodes, memory over a device's."""
    cl, wl = ctx.cluster, ctx.workload
    out: list[PlanProblem] = []
    names = {c.name for c in wl.calls}
    for c in wl.calls:
        if c.name not in assign:
            out.append(PlanProblem(f"calls.{c.name}", None, "every call needs a mesh and "
                                   "a layout", "add it to the plan file"))  # fmt: skip
    for name in assign:
        if name not in names:
            out.append(PlanProblem(f"calls.{name}", name, f"the graph '{wl.graph}' has no "
                                   f"such call (calls: {sorted(names)})", "remove it"))  # fmt: skip
    if out:
        return out
    for c in wl.calls:
        a, f = assign[c.name], f"calls.{c.name}"
        shape, lay = wl.roles[c.role].shape, a.layout
        why = is_valid_mesh(a.mesh, cl)
        if why:
            out.append(PlanProblem(f"{f}.mesh", str(a.mesh), why,
                                   f"choose a mesh of {cl.describe()}"))  # fmt: skip
        if min(lay.dp, lay.tp, lay.pp, lay.micro_batches) < 1 or lay.size != a.mesh.size:
            out.append(PlanProblem(f"{f}.layout", str(lay), f"dp x tp x pp must equal the "
                                   f"mesh's {a.mesh.size} devices", "change the degrees"))  # fmt: skip
            continue
        if shape.heads % lay.tp or shape.kv_heads % lay.tp:
            out.append(PlanProblem(f"{f}.tp", lay.tp, f"tp must divide the {shape.heads} "
                                   f"heads and {shape.kv_heads} key/value heads of "
                                   f"{shape.name}", "choose a divisor"))  # fmt: skip
        if lay.tp > cl.devices_per_node or (
            a.mesh.size > cl.devices_per_node and cl.devices_per_node % lay.tp
        ):
            out.append(PlanProblem(f"{f}.tp", lay.tp, f"a tensor-parallel group stays in "
                                   f"one node of {cl.devices_per_node} devices",
                                   "use pp or dp across nodes"))  # fmt: skip
        if shape.layers % lay.pp:
            out.append(PlanProblem(f"{f}.pp", lay.pp, f"pp must divide the {shape.layers} "
                                   f"layers of {shape.name}", "choose a divisor"))  # fmt: skip
        why = divides_batch(c, lay)
        if why:
            out.append(PlanProblem(f"{f}.layout", str(lay), why,
                                   "change dp or micro_batches"))  # fmt: skip
    if out:
        return out
    mem = memory_per_device(ctx, assign)
    cap = cl.kind.memory_bytes * MEMORY_HEADROOM
    over = np.nonzero(mem > cap)[0]
    if len(over):
        d = int(over[np.argmax(mem[over])])
        users = [c.name for c in wl.calls if d in assign[c.name].mesh.devices]
        out.append(PlanProblem("memory", f"d{d}: {mem[d] / 2**30:.1f} GiB",
                               f"{len(over)} device(s) over {cap / 2**30:.1f} GiB "
                               f"({MEMORY_HEADROOM:.0%} of {cl.kind.name}); on d{d}: {users}",
                               "more tp/pp/dp or micro-batches, a higher ZeRO stage, "
                               "or more devices"))  # fmt: skip
    return out


# ------------------------------------------------------------------ files


def to_dict(ctx: Context, assign: dict[str, Assignment], mode: str, est: Estimate | None) -> dict:
    """The plan file's content (JSON or YAML): the calls' meshes and layouts, and for the
    reader the hooks and the estimate. Only `calls` is read back."""
    wl, cl = ctx.workload, ctx.cluster
    calls = {}
    for c in ctx.topo:
        a = assign[c.name]
        calls[c.name] = {
            "role": c.role,
            "mesh": str(a.mesh),
            "dp": a.layout.dp,
            "tp": a.layout.tp,
            "pp": a.layout.pp,
            "micro_batches": a.layout.micro_batches,
        }
        if est is not None:
            calls[c.name]["estimated_s"] = round(est.call_s[c.name], 6)
    out: dict[str, Any] = {
        "graph": wl.graph,
        "mode": mode,
        "cluster": {
            "num_nodes": cl.num_nodes,
            "devices_per_node": cl.devices_per_node,
            "device_kind": cl.kind.name,
        },
        "calls": calls,
        "replicas": replicas(ctx, assign),
        "reallocations": [
            {
                "role": h.role,
                "before": h.before,
                "from": _desc(h.src),
                "to": _desc(h.dst),
                "after": "keep",
            }  # fmt: skip
            for h in realloc_hooks(ctx, assign)
        ],
        "offloaded_roles": offloaded_roles(ctx, assign),
    }
    if est is not None:
        out["estimate"] = {
            "time_per_iteration_s": round(est.time_per_iteration_s, 6),
            "peak_memory_gib": round(float(est.memory_bytes.max()) / 2**30, 3),
            "realloc_s": {k: round(v, 6) for k, v in est.realloc_s.items()},
        }
    return out


def _desc(a: Assignment) -> str:
    return f"{a.mesh} {a.layout.dp}x{a.layout.tp}x{a.layout.pp}"


def from_dict(data: dict) -> dict[str, Assignment]:
    """Assignments from a plan file's `calls` (what `to_dict` writes); raises PlanError."""
    problems: list[PlanProblem] = []
    out: dict[str, Assignment] = {}
    calls = data.get("calls") if isinstance(data, dict) else None
    if not isinstance(calls, dict):
        raise PlanError([PlanProblem("calls", calls, "a plan file has a `calls` mapping "
                                     "from call name to mesh and layout",
                                     "write one with `relay plan`")])  # fmt: skip
    for name, spec in calls.items():
        try:
            mesh = Mesh.parse(str(spec["mesh"]))
            lay = Layout(int(spec["dp"]), int(spec["tp"]), int(spec["pp"]),
                         int(spec.get("micro_batches", 1)))  # fmt: skip
            out[name] = Assignment(mesh, lay)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(PlanProblem(f"calls.{name}", spec, f"needs mesh ('d0-3'), dp, "
                                        f"tp, pp and micro_batches ({e})",
                                        "fix the entry"))  # fmt: skip
    if problems:
        raise PlanError(problems)
    return out


def load_plan_file(path: str | Path) -> dict[str, Assignment]:
    """The assignments of a JSON or YAML plan file; raises PlanError if it cannot be read."""
    p = Path(path)
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:  # missing file, bad JSON (ValueError), bad YAML
        raise PlanError([PlanProblem("path", str(p), f"cannot read the plan file ({e})",
                                     "write one with `relay plan` (plan.out)")]) from None  # fmt: skip
    except Exception as e:  # yaml.YAMLError does not derive from ValueError
        raise PlanError([PlanProblem("path", str(p), f"cannot parse the plan file ({e})",
                                     "fix its YAML or JSON")]) from None  # fmt: skip
    return from_dict(data)


def comm_plan_for(ctx: Context, hook: ReallocHook) -> list:
    """The full comm plan (every CommOp) of one reallocation hook."""
    shape = ctx.workload.roles[hook.role].shape
    return comm_plan(shape, hook.src.sharding, hook.dst.sharding, ctx.cluster)
