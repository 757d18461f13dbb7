"""How the controller runs an RL graph's calls: on one worker per role (`RoleWorkers`,
the per-role placement), or on the devices of an execution plan (`PlannedRoles`).

Both give the controller the same four things: `dispatch` a call (Ray references to its
outputs and metrics), `evaluate` the actor, `save` and `load` the trained roles.

`PlannedRoles` keeps one DeviceWorker per device of the plan's cluster
(orchestrator.workers.device_worker). Each call runs on its own mesh under its own layout; a
role holds one replica per layout its calls use. The replica of a role's train call is
the one that learns: before any other call of that role runs, its replica receives the
current weights by the planner's comm plan (parameter reallocation), unless it holds
them already. A frozen role the plan offloads (planner.plan.offloaded_roles) keeps its
weights in host memory between its calls: each of its calls reloads them first and
offloads them after (orchestrator.models.offload). Every call is sent as one block of tasks to
the workers of its mesh, in dispatch order, so the collective operations of two calls
never interleave in opposite orders on two workers. A call's consumers take the parts
its ranks return and join them themselves (orchestrator.models.batch.gather_inputs): no extra
hop between two calls (`PlannedRoles.dispatch` names two more shortcuts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from algos.graph import MFC, CallKind, DataflowGraph
from orchestrator.workers.device_worker import DeviceCluster, Sharding, sharding_key
from planner.layout import Layout, Mesh


@dataclass
class Dispatched:
    """A dispatched call: what its consumers take as inputs (Ray references to batches,
    or to each rank's part), what to wait for, and how those values become its metrics."""

    outputs: list[Any]
    waits: list[Any]
    finish: Callable[[list[Any]], dict[str, float]]


class RoleWorkers:
    """One ModelWorker (a Ray actor) per role: the per-role placement."""

    def __init__(self, workers: dict[str, Any]) -> None:
        self.workers = workers

    def dispatch(self, call: MFC, options: dict[str, Any], inputs: list[Any]) -> Dispatched:
        out, metrics = (
            self.workers[call.role].run.options(num_returns=2).remote(call, options, *inputs)
        )
        return Dispatched([out], [metrics], lambda values: values[0])

    def evaluate(self, prompts: list[str], params: Any) -> Any:
        """A reference to {'accuracy', 'reward'} of the actor's responses."""
        return self.workers["actor"].evaluate.remote(prompts, params)

    def save(self, folder: Path, roles: list[str]) -> None:
        ray.get([self.workers[r].save.remote(str(folder)) for r in roles])

    def load(self, folder: Path, roles: list[str]) -> None:
        ray.get([self.workers[r].load.remote(str(folder)) for r in roles])

    def stop(self) -> None:
        for w in self.workers.values():
            ray.kill(w)


REALLOC_KEY = "_realloc/"  # a rank's stats of the reallocation its call task ran first


def merge_metrics(
    call: str, ranks: list[dict[str, float]], reallocs: list[dict[str, float]]
) -> dict[str, float]:
    """One call's metrics from its ranks': averaged (times: the slowest rank; spans: the
    earliest start, the latest end), with the reallocation that preceded the call (its
    slowest device's seconds and span, the bytes it moved), from its own tasks or from
    the ranks' `_realloc/` keys when the call's task ran it."""
    reallocs = list(reallocs)
    ranks = [dict(r) for r in ranks]
    for r in ranks:  # a reallocation run inside the call's task
        folded = {k[len(REALLOC_KEY) :]: r.pop(k) for k in list(r) if k.startswith(REALLOC_KEY)}
        if folded:
            reallocs.append(folded)
    m: dict[str, float] = {}
    for key in {k for r in ranks for k in r}:
        vals = [r[key] for r in ranks if key in r]
        if key.endswith("/start"):
            m[key] = min(vals)
        elif key.startswith(("time/", "perf/", "span/")):
            m[key] = max(vals)
        else:
            m[key] = sum(vals) / len(vals)
    if reallocs:
        m[f"time/realloc_{call}_s"] = max(r["seconds"] for r in reallocs)
        m[f"span/realloc_{call}/start"] = min(r["start"] for r in reallocs)
        m[f"span/realloc_{call}/end"] = max(r["end"] for r in reallocs)
        m[f"realloc/{call}_bytes"] = float(sum(r["sent"] + r["local"] for r in reallocs))
    return m


def merge_evaluation(*parts: Any) -> dict[str, float]:
    """{'accuracy', 'reward'} over the ranks' (dp index, correct, rewards)."""
    rows = sorted((p for p in parts if p is not None), key=lambda p: p[0])
    correct = [c for _, cs, _ in rows for c in cs]
    rewards = [r for _, _, rs in rows for r in rs]
    return {"accuracy": sum(correct) / len(correct), "reward": sum(rewards) / len(rewards)}


def without_spans(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics to log: the `span/` timestamps (busy_seconds reads them) left out."""
    return {k: v for k, v in metrics.items() if not k.startswith("span/")}


def busy_seconds(metrics: dict[str, float], reallocations: bool = True) -> float:
    """The wall time during which some call (or reallocation) ran: the union of the
    `span/<name>/start` .. `span/<name>/end` intervals (calls on disjoint meshes overlap)."""
    spans = sorted((metrics[k], metrics[k[: -len("start")] + "end"])
                   for k in metrics if k.startswith("span/") and k.endswith("/start")
                   and (reallocations or not k.startswith("span/realloc_")))  # fmt: skip
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclass
class _Role:
    spec: Any  # RoleSpec
    folder: str  # the Hugging Face folder its weights start from
    kind: str  # causal | value
    train: Sharding | None = None  # the replica that learns (its train call's)
    version: int = 0  # train calls dispatched (and checkpoints loaded)
    held: dict[str, int] = field(default_factory=dict)  # replica key -> version it holds


class PlannedRoles:
    """The RL graph's calls on the plan's devices (see the module's docstring). Roles the
    plan does not place (a Python reward function) run on a ModelWorker of their own."""

    def __init__(
        self,
        graph: DataflowGraph,
        plan: dict[str, Any],  # call name -> planner Assignment
        specs: list[Any],  # RoleSpecs of the graph's roles
        num_nodes: int,
        devices_per_node: int,
        threads: int,
        start_side_workers: Any,  # (specs) -> {role: ModelWorker}, for unplaced roles
        offload: list[str] | tuple[str, ...] = (),  # frozen roles kept in host memory
    ) -> None:
        self.graph = graph
        self.sharding: dict[str, Sharding] = {
            c.name: (plan[c.name].mesh, plan[c.name].layout) for c in graph.calls if c.name in plan
        }
        placed = {c.role for c in graph.calls if c.name in self.sharding}
        by_name = {s.name: s for s in specs}
        self.cluster = DeviceCluster(num_nodes, devices_per_node, list(self.sharding.values()),
                                     threads=threads)  # fmt: skip
        self.workers = self.cluster.workers
        self.side = RoleWorkers({})
        self.ahead: dict[str, list[Any]] = {}  # call -> reallocations begin_step issued
        try:
            self.side = RoleWorkers(
                start_side_workers([by_name[r] for r in by_name if r not in placed])
            )
            parked = [r for r in offload if r in placed]
            ray.get([w.host.remote([by_name[r] for r in placed], parked) for w in self.workers])
            self.roles: dict[str, _Role] = {}
            for role in placed:
                spec = by_name[role]
                self.roles[role] = _Role(spec, spec.init_path, spec.model_kind)
            for c in graph.calls:
                if c.name in self.sharding and c.kind is CallKind.TRAIN:
                    self.roles[c.role].train = self.sharding[c.name]
            # every replica starts from the role's folder: the same weights everywhere
            loads = []
            for c in graph.calls:
                if c.name not in self.sharding:
                    continue
                r, sh = self.roles[c.role], self.sharding[c.name]
                if sharding_key(sh) not in r.held:
                    r.held[sharding_key(sh)] = 0
                    loads += [w.load.remote(c.role, r.folder, sh, r.kind) for w in self.workers]
            ray.get(loads)
            # models, trainers and generators built now, not inside the first step
            ray.get([w.prepare.remote(c, self.sharding[c.name]) for c in graph.calls
                     if c.name in self.sharding for w in self.cluster.on(self.sharding[c.name][0])])  # fmt: skip
        except BaseException:
            self.stop()
            raise

    # -- calls ----------------------------------------------------------------------

    def _lags(self, role: str, sh: Sharding) -> bool:
        """Whether the replica `sh` of a trained `role` holds older weights than its train
        replica's."""
        r = self.roles[role]
        return r.train is not None and r.held.get(sharding_key(sh)) != r.version

    def _stale(self, role: str, sh: Sharding) -> Sharding | None:
        """The trained replica the replica `sh` of `role` must be refreshed from (None if
        it holds the current weights); it counts as refreshed from here on."""
        if not self._lags(role, sh):
            return None
        r = self.roles[role]
        r.held[sharding_key(sh)] = r.version
        return r.train

    def begin_step(self) -> None:
        """Issue the step's reallocations before its calls, in the order of the calls that
        first use each stale replica (the planner's order, planner.plan.tasks): every
        device runs them ahead of the step's calls, so a replica fills while another
        call's replica is being filled, not after that call has run. A step whose only
        reallocation is for its first call, which reads only the dataset, leaves it to
        `dispatch` (folded into that call's task)."""
        self.ahead = {}
        placed = [c for c in self.graph.waves() if c.name in self.sharding]
        stale, seen = [], set()
        for c in placed:
            key = (c.role, sharding_key(self.sharding[c.name]))
            if key not in seen and self._lags(c.role, self.sharding[c.name]):
                stale.append(c)
            seen.add(key)
        if len(stale) == 1 and stale[0] is placed[0] and not self.graph.parents(stale[0]):
            return
        for c in stale:
            self.ahead[c.name] = self._refresh(c.role, self.sharding[c.name])

    def _reallocations(
        self, role: str, src: Sharding, sh: Sharding, skip: frozenset[int] = frozenset()
    ) -> list[Any]:
        """Reallocation tasks from replica `src` to replica `sh` of `role`, on every device
        of both meshes but `skip`."""
        devices = sorted((set(src[0].devices) | set(sh[0].devices)) - skip)
        dpn = self.cluster.devices_per_node
        return [self.workers[d].reallocate.remote(role, src, sh, dpn) for d in devices]

    def _refresh(self, role: str, sh: Sharding) -> list[Any]:
        """Reallocation tasks that bring the replica `sh` of `role` up to date (none if
        it holds the current weights), on every device of both meshes."""
        src = self._stale(role, sh)
        return [] if src is None else self._reallocations(role, src, sh)

    def dispatch(self, call: MFC, options: dict[str, Any], inputs: list[Any]) -> Dispatched:
        """The call's tasks on its mesh, after any reallocation its replica needs; the
        consumers get every rank's part (they concatenate them in dp order).

        Two shortcuts save a round trip through Ray per call: an inference or generate
        call whose producers all ran under its own mesh and layout reads each producer's
        part from its device's memory (each device's share of the rows is then the part
        it produced) instead of waiting for every rank's part; and a call that then
        waits for no other call (only the step's dataset) has its own devices run the
        reallocation its replica needs at the start of its task (devices of the source
        mesh alone get a task of their own, first)."""
        if call.name not in self.sharding:
            return self.side.dispatch(call, options, inputs)
        sh = self.sharding[call.name]
        parents = self.graph.parents(call)
        if (
            call.kind is not CallKind.TRAIN
            and parents
            and all(p in self.sharding and sharding_key(self.sharding[p]) == sharding_key(sh)
                    for p in parents)
        ):  # fmt: skip
            options = {**options, "local_inputs": list(parents)}
            inputs = inputs[:1]  # the step's dataset; the producers' parts stay local
        reallocs = self.ahead.pop(call.name, [])  # issued by begin_step
        src = self._stale(call.role, sh)
        if src is not None:
            # Folded into the call's task only if that task waits for no other call: a
            # task whose input failed never runs, and the source devices would then wait
            # for their peers' part of the reallocation forever.
            fold = len(inputs) == 1
            mine = frozenset(sh[0].devices) if fold else frozenset()
            reallocs += self._reallocations(call.role, src, sh, mine)
            if fold:
                options = {**options, "reallocate": (src, self.cluster.devices_per_node)}
        parts = [w.run.options(num_returns=2).remote(call, sh, options, *inputs)
                 for w in self.cluster.on(sh[0])]  # fmt: skip
        if call.kind is CallKind.TRAIN:
            r = self.roles[call.role]
            r.version += 1
            r.held[sharding_key(sh)] = r.version
        n = len(parts)
        return Dispatched(
            [p[0] for p in parts],
            [p[1] for p in parts] + reallocs,
            lambda values: merge_metrics(call.name, values[:n], values[n:]),
        )

    # -- evaluation and checkpoints ---------------------------------------------------

    def _generate_sharding(self) -> Sharding:
        gen = [c for c in self.graph.calls if c.role == "actor" and c.kind is CallKind.GENERATE]
        return self.sharding[gen[0].name]

    def evaluate(self, prompts: list[str], params: Any) -> Any:
        """A reference to {'accuracy', 'reward'} of the actor's responses, generated on
        the replica (and layout) of its rollout call."""
        sh = self._generate_sharding()
        reallocs = self._refresh("actor", sh)
        if reallocs:
            ray.get(reallocs)
        parts = [w.evaluate.remote("actor", sh, prompts, params) for w in self.cluster.on(sh[0])]
        return self.workers[sh[0].start].merge_evaluation.remote(*parts)

    def _checkpoint_sharding(self, role: str) -> Sharding:
        """One device of the train mesh holding whole tensors: it writes the weights."""
        train = self.roles[role].train
        assert train is not None
        return Mesh(train[0].start, 1), Layout(1, 1, 1, 1)

    def save(self, folder: Path, roles: list[str]) -> None:
        """Each trained role as folder/<role>: a Hugging Face folder of its full weights,
        and optim/rank<device>.pt with each train rank's optimizer and scheduler state."""
        tasks = []
        for role in roles:
            r = self.roles[role]
            assert r.train is not None
            one = self._checkpoint_sharding(role)
            if sharding_key(one) != sharding_key(r.train):
                ray.get(self._refresh(role, one))
            tasks.append(self.workers[one[0].start].write_model.remote(role, one, str(folder)))
            tasks += [w.save_rank.remote(role, r.train, str(folder))
                      for w in self.cluster.on(r.train[0])]  # fmt: skip
        ray.get(tasks)

    def load(self, folder: Path, roles: list[str]) -> None:
        """Restore the trained roles from `save`'s folder (under the same plan); every
        other replica of those roles is refreshed before its next call."""
        tasks = []
        for role in roles:
            r = self.roles[role]
            assert r.train is not None
            tasks += [w.load_rank.remote(role, r.train, str(folder))
                      for w in self.cluster.on(r.train[0])]  # fmt: skip
            r.version += 1
            r.held[sharding_key(r.train)] = r.version
        ray.get(tasks)

    def stop(self) -> None:
        self.side.stop()
        self.cluster.shutdown()
