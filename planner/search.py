"""Finding plans: the symmetric baseline, a hand-written heuristic, seeded Metropolis MCMC
over per-call candidates, and exhaustive enumeration (for small clusters and tests).

Candidates of a call: every mesh of the cluster with, per mesh size, the `keep` fastest
layouts (dp, tp, pp, micro-batches) that divide the call's batch and the model and
whose memory, alone on the devices, fits; plus the layout with the least memory.
A plan's cost is its simulated time per iteration; a plan over any device's memory
costs infinity.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from algos.graph import CallKind
from planner.cost import train_state_bytes, weight_bytes
from planner.layout import Layout, Mesh, layouts, meshes, powers_of_two, whole_cluster
from planner.plan import (
    MEMORY_HEADROOM,
    Assignment,
    Context,
    divides_batch,
    offload_and_memory,
    tasks,
)
from planner.simulate import list_schedule, makespan

Plan = dict[str, Assignment]
# the relative saving a plan must estimate to replace the best one found (mcmc)
TIE = 1e-3


def _micro_batch_options(ctx: Context, call: str, dp: int, pp: int) -> list[int]:
    w = ctx.workload.call(call)
    seqs = w.batch_seqs
    if w.kind is CallKind.TRAIN:
        seqs = w.batch_seqs * w.passes // max(w.optimizer_steps, 1)
    per_rank = seqs // dp if seqs % dp == 0 else 0
    opts = sorted(set(powers_of_two(16)) | {pp, 2 * pp})
    return [m for m in opts if per_rank and per_rank % m == 0]


def _alone_bytes(ctx: Context, call: str, a: Assignment) -> float:
    """A call's memory on its devices with its own role's states and nothing else."""
    w = ctx.workload.call(call)
    role = ctx.workload.roles[w.role]
    b = ctx.cluster.kind.param_bytes
    own = (
        train_state_bytes(role.shape, a.layout, b, ctx.workload.zero_stage)
        if w.kind is CallKind.TRAIN
        else weight_bytes(role.shape, a.layout, b)
    )
    return own + ctx.transient_bytes(call, a)


def layout_options(ctx: Context, call: str, size: int) -> list[Layout]:
    """Every valid layout of a call on a mesh of `size` devices whose memory fits alone."""
    w = ctx.workload.call(call)
    shape = ctx.workload.roles[w.role].shape
    cap = ctx.cluster.kind.memory_bytes * MEMORY_HEADROOM
    probe = Mesh(0, size)
    out = []
    for dp, tp, pp in layouts(size, ctx.cluster.devices_per_node, shape.heads,
                              shape.kv_heads, shape.layers):  # fmt: skip
        if size > ctx.cluster.devices_per_node and ctx.cluster.devices_per_node % tp:
            continue
        if ctx.max_pp is not None and pp > ctx.max_pp:
            continue
        for m in _micro_batch_options(ctx, call, dp, pp):
            lay = Layout(dp, tp, pp, m)
            if (
                divides_batch(w, lay) is None
                and _alone_bytes(ctx, call, Assignment(probe, lay)) <= cap
            ):
                out.append(lay)
    return out


def candidates(ctx: Context, keep: int = 4) -> dict[str, list[Assignment]]:
    """Per call: every mesh with its size's `keep` fastest layouts (and the leanest)."""
    all_meshes = meshes(ctx.cluster)
    sizes = sorted({m.size for m in all_meshes})
    out: dict[str, list[Assignment]] = {}
    for c in ctx.topo:
        cands: list[Assignment] = []
        for size in sizes:
            opts = layout_options(ctx, c.name, size)
            if not opts:
                continue
            probe = Mesh(0, size)
            by_time = sorted(
                opts, key=lambda lay: (ctx.call_s(c.name, Assignment(probe, lay)), lay)
            )
            lean = min(
                opts, key=lambda lay: (_alone_bytes(ctx, c.name, Assignment(probe, lay)), lay)
            )
            chosen = list(dict.fromkeys(by_time[:keep] + [lean]))
            cands += [Assignment(m, lay) for m in all_meshes if m.size == size for lay in chosen]
        out[c.name] = cands
    return out


def search_space(ctx: Context, keep: int = 4) -> tuple[dict[str, list[Assignment]], list[Plan]]:
    """The candidates of every call, with the symmetric, heuristic and per-role plans'
    assignments added, and those plans (the search's starting points)."""
    cands = candidates(ctx, keep)
    starts = [p for p in (symmetric(ctx), heuristic(ctx), per_role(ctx)) if p is not None]
    for plan in starts:
        for name, a in plan.items():
            if a not in cands[name]:
                cands[name].append(a)
    return cands, starts


def cost(ctx: Context, plan: Plan) -> float:
    """Simulated time per iteration, or infinity if some device's memory is exceeded."""
    cap = ctx.cluster.kind.memory_bytes * MEMORY_HEADROOM
    off, mem = offload_and_memory(ctx, plan)
    if mem.max() > cap:
        return math.inf
    return makespan(list_schedule(tasks(ctx, plan, off), ctx.cluster.num_devices)) / ctx.iterations


def symmetric(ctx: Context) -> Plan | None:
    """The Megatron-style baseline: one layout (dp, tp, pp, micro-batches) on the whole
    cluster for every call; the fastest such plan that fits."""
    mesh = whole_cluster(ctx.cluster)
    common: set[Layout] | None = None
    for c in ctx.topo:
        opts = set(layout_options(ctx, c.name, mesh.size))
        common = opts if common is None else common & opts
    best: tuple[float, Plan] | None = None
    for lay in sorted(common or ()):
        plan = {c.name: Assignment(mesh, lay) for c in ctx.topo}
        t = cost(ctx, plan)
        if t < math.inf and (best is None or t < best[0]):
            best = (t, plan)
    return best[1] if best else None


def per_role(ctx: Context) -> Plan | None:
    """Each role on one device of its own, unsharded (dp = tp = pp = 1), with the fewest
    micro-batches that fit: the placement the runtime executes today. None if the
    cluster has fewer devices than roles or a role does not fit on one device."""
    roles = list(ctx.workload.roles)
    if len(roles) > ctx.cluster.num_devices:
        return None
    plan: Plan = {}
    for i, role in enumerate(roles):
        for c in ctx.workload.role_calls(role):
            opts = [x for x in layout_options(ctx, c.name, 1)]
            if not opts:
                return None
            plan[c.name] = Assignment(Mesh(i, 1), min(opts, key=lambda x: x.micro_batches))
    return plan if cost(ctx, plan) < math.inf else None


def _least_parallel(ctx: Context, call: str, mesh: Mesh) -> Layout | None:
    """The hand rule for one call: the least tensor parallelism that fits, pipeline
    stages only if that is not enough, data parallel over the rest, then the fewest
    micro-batches."""
    opts = layout_options(ctx, call, mesh.size)
    return min(opts, key=lambda lay: (lay.pp, lay.tp, lay.micro_batches), default=None)


def heuristic(ctx: Context) -> Plan | None:
    """A hand-written rule set, as people place RLHF models by hand (OpenRLHF-style):
    each role gets a block of devices of its own, in proportion to its parameters (x4 for
    trainable roles: gradients and optimizer states), in mesh sizes; all calls of a role
    run on its block under the hand rule of `_least_parallel`. If that does not fit,
    every call runs on the whole cluster with the least parallel (tp, then pp) degrees
    that fit all of them."""
    cl, wl = ctx.cluster, ctx.workload
    roles = sorted(wl.roles.values(), key=lambda r: -(r.shape.params * (4 if r.trainable else 1)))
    if len(roles) <= cl.num_devices:
        plan = _blocks(ctx, roles)
        if plan is not None and cost(ctx, plan) < math.inf:
            return plan
    mesh = whole_cluster(cl)
    per_call = {c.name: layout_options(ctx, c.name, mesh.size) for c in ctx.topo}
    degrees = set.intersection(*({(x.dp, x.tp, x.pp) for x in o} for o in per_call.values()))
    for dp, tp, pp in sorted(degrees, key=lambda d: (d[2], d[1])):
        plan = {
            name: Assignment(
                mesh,
                min(
                    (x for x in o if (x.dp, x.tp, x.pp) == (dp, tp, pp)),
                    key=lambda x: x.micro_batches,
                ),
            )  # fmt: skip
            for name, o in per_call.items()
        }
        if cost(ctx, plan) < math.inf:
            return plan
    return None


def _blocks(ctx: Context, roles: list) -> Plan | None:
    cl = ctx.cluster
    weights = [r.shape.params * (4 if r.trainable else 1) for r in roles]
    valid = sorted({m.size for m in meshes(cl)})
    share = [cl.num_devices * w / sum(weights) for w in weights]
    sizes = [max([s for s in valid if s <= max(x, 1)]) for x in share]
    while sum(sizes) > cl.num_devices:  # shrink the largest block
        i = max(range(len(sizes)), key=lambda j: sizes[j])
        smaller = [s for s in valid if s < sizes[i]]
        if not smaller:
            return None
        sizes[i] = smaller[-1]
    while True:  # grow the block with the most work per device while devices are left
        left = cl.num_devices - sum(sizes)
        order = sorted(range(len(sizes)), key=lambda j: -weights[j] / sizes[j])
        grown = False
        for i in order:
            bigger = [s for s in valid if sizes[i] < s <= sizes[i] + left]
            if bigger:
                sizes[i] = bigger[0]
                grown = True
                break
        if not grown:
            break
    plan: Plan = {}
    taken: list[Mesh] = []
    for i in sorted(range(len(roles)), key=lambda j: -sizes[j]):
        mesh = next(
            (m for m in meshes(cl) if m.size == sizes[i] and not any(m.overlaps(t) for t in taken)),
            None,
        )
        if mesh is None:
            return None
        taken.append(mesh)
        for c in ctx.workload.role_calls(roles[i].name):
            lay = _least_parallel(ctx, c.name, mesh)
            if lay is None:
                return None
            plan[c.name] = Assignment(mesh, lay)
    return plan


@dataclass
class SearchResult:
    plan: Plan
    cost_s: float
    evaluated: int
    accepted: int
    elapsed_s: float
    history: list[tuple[int, float]]  # (evaluation, best cost) at each improvement


def mcmc(
    ctx: Context,
    *,
    seed: int = 0,
    time_budget_s: float = 20.0,
    max_steps: int | None = None,
    keep: int = 4,
    start: Plan | None = None,
    temperature: float = 0.05,
    patience: int = 2000,
    progress: Callable[[int, float], None] | None = None,
) -> SearchResult:
    """Metropolis MCMC over per-call candidates, seeded, bounded by time (and optionally
    by a number of proposals, `max_steps`).

    Start: the cheapest of the symmetric, heuristic and per-role plans (or `start`). A
    proposal changes one call, or two (a neighbouring or any candidate), gives one call
    another call's current mesh and layout, or moves all calls of one role to one
    candidate at once (so a role's train and generate calls can move together without
    paying a reallocation in between). It is accepted with probability
    min(1, exp(-(c' - c) / (T c))), T falling linearly to a tenth over the budget; after
    `patience` evaluations without a new best the chain restarts from the best plan. The
    best plan seen is returned, each call in the fewest micro-batches that keep its
    estimate (`fewest_micro_batches`). A plan is better only if it costs at least `TIE`
    less, so among plans the estimate cannot tell apart the search keeps the first, a
    hand-made one where that is as cheap (calibration, GRPO: a variant of the per-role
    plan with the reward model on the actor's device in 16 micro-batches, estimated the
    same, measured 14% slower)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    cands, baselines = search_space(ctx, keep)
    if start is not None:
        for name, a in start.items():
            if a not in cands[name]:
                cands[name].append(a)
    empty = [n for n, c in cands.items() if not c]
    if empty:
        raise ValueError(f"no layout of {empty} fits the cluster's memory")
    cand_sets = {n: set(c) for n, c in cands.items()}
    by_mesh = {n: _group(c, lambda a: a.mesh) for n, c in cands.items()}
    by_layout = {n: _group(c, lambda a: (a.mesh.size, a.layout)) for n, c in cands.items()}
    role_calls = {r: [c.name for c in ctx.workload.role_calls(r)] for r in ctx.workload.roles}
    starts = ([start] if start is not None else []) + baselines
    cur = min(starts, key=lambda p: cost(ctx, p)) if starts else None
    if cur is None:  # no baseline fits: start from each call's leanest candidate
        cur = {n: min(c, key=lambda a, n=n: _alone_bytes(ctx, n, a)) for n, c in cands.items()}
    cur_cost = cost(ctx, cur)
    best, best_cost = dict(cur), cur_cost
    seen: dict[tuple, float] = {}
    names = list(cands)
    evaluated = accepted = last_best = steps = 0
    history = [(0, best_cost)]
    while True:
        elapsed = time.perf_counter() - t0
        done = elapsed / max(time_budget_s, 1e-9)
        if max_steps:
            done = max(done, steps / max_steps)
        if done >= 1.0:
            break
        steps += 1
        prop = dict(cur)
        u = rng.random()
        if u < 0.6:
            for name in rng.sample(names, 2 if u < 0.15 and len(names) > 1 else 1):
                prop[name] = _propose(rng, cur[name], cands[name], by_mesh[name], by_layout[name])
        elif u < 0.8:
            name, other = rng.choice(names), rng.choice(names)
            if cur[other] in cand_sets[name]:
                prop[name] = cur[other]
        else:
            calls = role_calls[rng.choice(list(role_calls))]
            target = rng.choice(cands[calls[-1]])
            for n in calls:
                if target in cand_sets[n]:
                    prop[n] = target
        key = tuple(prop[n] for n in names)
        if key not in seen:
            seen[key] = cost(ctx, prop)
            evaluated += 1
        c = seen[key]
        temp = temperature * (1 - 0.9 * min(1.0, done))
        if c < math.inf and (
            c <= cur_cost or rng.random() < math.exp(-(c - cur_cost) / (temp * cur_cost))
        ):
            cur, cur_cost = prop, c
            accepted += 1
            if c < best_cost * (1 - TIE):
                best, best_cost, last_best = dict(prop), c, evaluated
                history.append((evaluated, c))
                if progress:
                    progress(evaluated, c)
        if evaluated - last_best > patience:
            cur, cur_cost, last_best = dict(best), best_cost, evaluated
    best, best_cost = fewest_micro_batches(ctx, best, best_cost)
    return SearchResult(best, best_cost, evaluated, accepted, time.perf_counter() - t0, history)


def fewest_micro_batches(ctx: Context, plan: Plan, plan_cost: float) -> tuple[Plan, float]:
    """`plan` with each call in the fewest micro-batches (at least its pp) that leave the
    plan's estimate no higher: the estimate prices a micro-batch by its FLOPs and bytes
    only, so a walk over plans of equal cost ends on micro-batch counts at random, while
    each pass has a fixed cost when run that the estimate leaves out."""
    out = dict(plan)
    for name, a in plan.items():
        fewer = [m for m in _micro_batch_options(ctx, name, a.layout.dp, a.layout.pp)
                 if a.layout.pp <= m < a.layout.micro_batches]  # fmt: skip
        for m in fewer:  # each divides the rank's rows (_micro_batch_options)
            trial = {**out, name: Assignment(a.mesh, replace(a.layout, micro_batches=m))}
            c = cost(ctx, trial)
            if c <= plan_cost:
                out, plan_cost = trial, c
                break
    return out, plan_cost


def _group(cands: list[Assignment], key: Callable) -> dict:
    out: dict = {}
    for a in cands:
        out.setdefault(key(a), []).append(a)
    return out


def _propose(
    rng: random.Random,
    cur: Assignment,
    cands: list[Assignment],
    by_mesh: dict,
    by_layout: dict,
) -> Assignment:
    """A neighbour of `cur` half of the time (another layout on the same mesh, or the same
    layout on another mesh of its size), otherwise any candidate."""
    u = rng.random()
    if u < 0.25 and cur.mesh in by_mesh:
        return rng.choice(by_mesh[cur.mesh])
    if u < 0.5 and (cur.mesh.size, cur.layout) in by_layout:
        return rng.choice(by_layout[(cur.mesh.size, cur.layout)])
    return rng.choice(cands)


def exhaustive(ctx: Context, keep: int = 4) -> tuple[Plan, float]:
    """The best plan over every combination of the search's candidates (small clusters
    only)."""
    import itertools

    cands, _ = search_space(ctx, keep)
    names = list(cands)
    size = math.prod(len(c) for c in cands.values())
    if size > 2_000_000:
        raise ValueError(f"{size} combinations: too many to enumerate")
    best: tuple[float, Plan] | None = None
    for combo in itertools.product(*(cands[n] for n in names)):
        plan = dict(zip(names, combo))
        c = cost(ctx, plan)
        if best is None or c < best[0]:
            best = (c, plan)
    assert best is not None
    return best[1], best[0]
