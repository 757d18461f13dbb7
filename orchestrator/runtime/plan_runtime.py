"""How the controller runs a graph's calls on the devices of an execution plan: the one
runtime, for every plan (the per-role placement is the plan where each role has a device
of its own; one device with every role on it is another).

`PlanRuntime` keeps one DeviceWorker per device of the plan's cluster
(orchestrator.workers). Each call runs on its own mesh under its own layout; a role holds
one replica per layout its calls use. The replica of a role's train call is the one that
learns: before any other call of that role runs, its replica receives the current weights
by the planner's comm plan (parameter reallocation), unless it holds them already. A call
of a role with no model (the task's verifier, a user's reward function) runs under the
sharding of the call that produced its inputs, beside them. A frozen role the plan
offloads keeps its weights in host memory between its calls. When the generating role
samples with vLLM, every worker builds its shard of the engine before the first step
(orchestrator.workers.engine_host).

Every call is sent as one block of tasks to the workers of its mesh, in dispatch order, so
the collective operations of two calls never interleave in opposite orders on two
workers. A call's consumers take the parts its ranks return and join them themselves
(orchestrator.models.batch.gather_inputs): no extra hop between two calls
(`PlanRuntime.dispatch` names two more shortcuts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from algos.graph import MFC, CallKind, DataflowGraph, fused_groups
from orchestrator.runtime.metrics import merge_metrics
from orchestrator.workers.cluster import DeviceCluster
from orchestrator.workers.evaluating import merge_evaluation
from orchestrator.workers.failures import classify, gather
from orchestrator.workers.groups import Sharding, sharding_key
from orchestrator.workers.spec import RoleSpec
from planner.layout import Layout, Mesh
from planner.threads import call_threads as call_threads_of
from planner.threads import fused_parents


@dataclass
class Dispatched:
    """A dispatched call: what its consumers take as inputs (Ray references to each rank's
    part), what to wait for, and how those values become its metrics."""

    outputs: list[Any]
    waits: list[Any]
    finish: Callable[[list[Any]], dict[str, float]]


@dataclass
class _Role:
    spec: RoleSpec
    train: Sharding | None = None  # the replica that learns (its train call's)
    version: int = 0  # train calls dispatched (and checkpoints loaded)
    held: dict[str, int] = field(default_factory=dict)  # replica key -> version it holds


def one_device_plan(graph: DataflowGraph) -> dict[str, Sharding]:
    """Every call of `graph` on device 0, unsharded (the pipeline's one-call stages)."""
    return {c.name: (Mesh(0, 1), Layout(1, 1, 1)) for c in graph.calls}


def engine_tp(
    graph: DataflowGraph, sharding: dict[str, Sharding], specs: list[RoleSpec]
) -> tuple[str, int] | None:
    """The role the plan's vLLM engines serve and their tensor-parallel degree: that of
    the role's generate calls, or of its train call when it has none (a stage that only
    evaluates), one for all (ValueError if they differ); None: no role uses vLLM."""
    roles = [s.name for s in specs if s.generation_backend == "vllm" and s.name in graph.roles]
    if not roles:
        return None
    (role,) = roles  # one generating role (the actor)
    calls = [c for c in graph.calls if c.role == role]
    gen = [c for c in calls if c.kind is CallKind.GENERATE]
    tps = {sharding[c.name][1].tp for c in gen or [c for c in calls if c.kind is CallKind.TRAIN]}
    if len(tps) > 1:
        raise ValueError(
            f"the plan's generate calls use tensor parallel degrees {sorted(tps)}: a plan's "
            "vLLM engines share one (their process groups span every device). Fix: give "
            "the generate calls one tp, or generate.backend=hf"
        )
    return role, tps.pop()


class PlanRuntime:
    """A graph's calls on the plan's devices (see the module's docstring)."""

    def __init__(
        self,
        graph: DataflowGraph,
        plan: dict[str, Sharding],  # call name -> (mesh, layout), every call with a model
        specs: list[RoleSpec],  # the graph's roles
        num_nodes: int,
        devices_per_node: int,
        threads: int = 1,
        device: str = "cpu",
        offload: list[str] | tuple[str, ...] = (),  # frozen roles kept in host memory
        call_threads: bool = False,  # CPU: threads per call from the graph (planner.threads)
        fuse: bool = False,  # calls of one replica ready together run as one task
        overlap: bool = False,  # the next step's rollout runs beside the train calls
    ) -> None:
        self.fuse = fuse
        self.graph = graph
        by_name = {s.name: s for s in specs}
        self.roles = {r: _Role(by_name[r]) for r in graph.roles}
        self.sharding = {c.name: plan[c.name] for c in graph.calls if c.name in plan}
        for c in graph.waves():  # a call with no model runs beside its inputs' producer
            if c.name not in self.sharding:
                placed = [self.sharding[p] for p in graph.parents(c) if p in self.sharding]
                self.sharding[c.name] = placed[0] if placed else (Mesh(0, 1), Layout(1, 1, 1))
        for c in graph.calls:
            if c.kind is CallKind.TRAIN:
                self.roles[c.role].train = self.sharding[c.name]
        engine = engine_tp(graph, self.sharding, specs)
        if num_nodes == 1:  # no worker (and no engine shard) for devices no call uses
            devices_per_node = max(m.start + m.size for m, _ in self.sharding.values())
        self.engines = engine is not None
        self.ahead: dict[str, list[Any]] = {}  # call -> reallocations begin_step issued
        self.device_of: dict[Any, int] = {}  # a reference of the step -> its device
        self.cluster = DeviceCluster(num_nodes, devices_per_node, list(self.sharding.values()),
                                     device=device, threads=threads, roles_on=self.roles_on)  # fmt: skip
        self.workers = self.cluster.workers
        self.threads: dict[str, int] = {}  # call -> its torch threads (empty: the device's)
        if call_threads and device == "cpu":
            cores = min(p["cores"] for p in self.cluster.processes)
            parents = fused_parents({c.name: graph.parents(c) for c in graph.calls},
                                    [[c.name for c in g] for g in self.groups(graph)])  # fmt: skip
            meshes = {n: sh[0] for n, sh in self.sharding.items()}
            light = frozenset(c.name for c in graph.calls  # no model: a function's work
                              if not by_name[c.role].kind().has_model)  # fmt: skip
            trains = frozenset(c.name for c in graph.calls if c.kind is CallKind.TRAIN)
            self.threads = call_threads_of(parents, meshes, devices_per_node, cores, threads,
                                           light, trains if overlap else frozenset())  # fmt: skip
        try:
            self._build(graph, specs, offload, engine)
        except BaseException:
            self.stop()
            raise

    def roles_on(self, device: int) -> list[str]:
        """The roles whose calls run on `device` under the plan."""
        return sorted({c.role for c in self.graph.calls
                       if device in self.sharding[c.name][0].devices})  # fmt: skip

    def processes(self) -> list[dict[str, Any]]:
        """Each device's worker: its device, the roles it hosts, its process id and host."""
        return [{"device": d, "roles": self.roles_on(d), **where}
                for d, where in enumerate(self.cluster.processes)]  # fmt: skip

    def _all(self, method: str, what: str, *args: Any) -> list[Any]:
        """`method(*args)` on every worker; a failure names its device (failures.gather)."""
        refs = [(getattr(w, method).remote(*args), d) for d, w in enumerate(self.workers)]
        return gather(refs, self.roles_on, what)

    def _build(
        self,
        graph: DataflowGraph,
        specs: list[RoleSpec],
        offload: list[str] | tuple[str, ...],
        engine: tuple[str, int] | None,
    ) -> None:
        """Every worker's roles, engine shard, replicas, models, trainers and generators,
        built before the first step."""
        self._all("host", "reading the roles' tokenizer and task", specs,
                  [r for r in offload if r in self.roles])  # fmt: skip
        if engine is not None:  # every worker builds its shard at once (vLLM's groups)
            self._all("build_engine", f"building {engine[0]}'s vLLM engine", *engine)
        # every replica starts from the role's folder: the same weights everywhere
        for c in graph.calls:
            r, sh = self.roles[c.role], self.sharding[c.name]
            if sharding_key(sh) not in r.held:
                r.held[sharding_key(sh)] = 0
                self._all("load", f"loading {c.role}'s weights from {r.spec.init_path}", c.role, sh)
        for c in graph.calls:
            sh = self.sharding[c.name]
            refs = [(self.workers[d].prepare.remote(c, sh), d) for d in sh[0].devices]
            gather(refs, self.roles_on, f"building the model and engines of {c.name}")
        self._all("built", "its start")

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

    def _sharding(self, call: MFC) -> Sharding:
        """The call's sharding: the plan's, or for a call outside the plan's graph (an
        evaluation) its role's train replica."""
        sh = self.sharding.get(call.name) or self.roles[call.role].train
        if sh is None:
            raise KeyError(f"call '{call.name}' has no sharding in this plan")
        return sh

    def begin_step(self, graph: DataflowGraph | None = None) -> None:
        """Issue the step's reallocations before its calls, in the order of the calls that
        first use each stale replica (the planner's order, planner.plan.tasks): every
        device runs them ahead of the step's calls, so a replica fills while another
        call's replica is being filled, not after that call has run. A step whose only
        reallocation is for its first call, which reads only the dataset, leaves it to
        `dispatch` (folded into that call's task)."""
        graph = graph or self.graph
        self.ahead = {}
        placed = list(graph.waves())
        stale, seen = [], set()
        for c in placed:
            key = (c.role, sharding_key(self._sharding(c)))
            if key not in seen and self._lags(c.role, self._sharding(c)):
                stale.append(c)
            seen.add(key)
        if len(stale) == 1 and stale[0] is placed[0] and not graph.parents(stale[0]):
            return
        for c in stale:
            self.ahead[c.name] = self._refresh(c.role, self._sharding(c))

    def _reallocations(
        self, role: str, src: Sharding, sh: Sharding, skip: frozenset[int] = frozenset()
    ) -> list[Any]:
        """Reallocation tasks from replica `src` to replica `sh` of `role`, on every device
        of both meshes but `skip`."""
        devices = sorted((set(src[0].devices) | set(sh[0].devices)) - skip)
        dpn, version = self.cluster.devices_per_node, self.roles[role].version
        refs = [self.workers[d].reallocate.remote(role, src, sh, dpn, version) for d in devices]
        self.device_of.update(zip(refs, devices))
        return refs

    def _refresh(self, role: str, sh: Sharding) -> list[Any]:
        """Reallocation tasks that bring the replica `sh` of `role` up to date (none if
        it holds the current weights), on every device of both meshes."""
        src = self._stale(role, sh)
        return [] if src is None else self._reallocations(role, src, sh)

    def dispatch(
        self,
        call: MFC,
        options: dict[str, Any],
        inputs: list[Any],
        graph: DataflowGraph | None = None,
    ) -> Dispatched:
        """The call's tasks on its mesh, after any reallocation its replica needs; the
        consumers get every rank's part (they concatenate them in dp order).

        Two shortcuts save a round trip through Ray per call: an inference or generate
        call whose producers all ran under its own mesh and layout reads each producer's
        part from its device's memory (each device's share of the rows is then the part
        it produced) instead of waiting for every rank's part; and a call that then
        waits for no other call (only the step's dataset) has its own devices run the
        reallocation its replica needs at the start of its task (devices of the source
        mesh alone get a task of their own, first)."""
        return self.dispatch_fused([call], [options], [inputs], graph)[0]

    def groups(self, graph: DataflowGraph) -> list[tuple[MFC, ...]]:
        """The graph's calls in dispatch order, grouped into the tasks that run them
        (algos.graph.fused_groups; one call each unless the runtime fuses)."""
        if not self.fuse:
            return [(c,) for c in graph.waves()]
        return fused_groups(graph, {c.name: sharding_key(self._sharding(c)) for c in graph.calls})

    def dispatch_fused(
        self,
        calls: tuple[MFC, ...] | list[MFC],
        options: list[dict[str, Any]],
        inputs: list[list[Any]],
        graph: DataflowGraph | None = None,
    ) -> list[Dispatched]:
        """`dispatch` of calls of one replica that are ready together (`groups`): one
        task per device runs them as one batch of their engine (DeviceWorker.run_fused);
        each call still has its own outputs and metrics."""
        graph = graph or self.graph
        call = calls[0]
        sh = self._sharding(call)
        opts: list[dict[str, Any]] = []
        refs: list[Any] = []  # the task's inputs: every call's, once each
        for c, o, ins in zip(calls, options, inputs):
            o, parents = dict(o), graph.parents(c)  # the caller's options stay as they were
            if (
                c.kind is not CallKind.TRAIN
                and parents
                and all(
                    sharding_key(self._sharding(graph.call(p))) == sharding_key(sh) for p in parents
                )  # fmt: skip
            ):
                o = {**o, "local_inputs": list(parents)}
                ins = ins[:1]  # the step's dataset; the producers' parts stay local
            opts.append(o)
            refs += [r for r in ins if not any(r is x for x in refs)]
        reallocs = [r for c in calls for r in self.ahead.pop(c.name, [])]  # from begin_step
        r = self.roles[call.role]
        src = self._stale(call.role, sh)
        if src is not None:
            # Folded into the call's task only if that task waits for no other call: a
            # task whose input failed never runs, and the source devices would then wait
            # for their peers' part of the reallocation forever.
            fold = len(refs) == 1
            mine = frozenset(sh[0].devices) if fold else frozenset()
            reallocs += self._reallocations(call.role, src, sh, mine)
            if fold:
                opts[0]["reallocate"] = (src, self.cluster.devices_per_node)
        if call.kind is CallKind.TRAIN:
            r.version += 1
            r.held[sharding_key(sh)] = r.version
        for c, o in zip(calls, opts):
            o["version"] = r.version
            if c.name in self.threads:
                o["threads"] = self.threads[c.name]
        workers, k = self.cluster.on(sh[0]), len(calls)
        if k == 1:
            parts = [w.run.options(num_returns=2).remote(call, sh, opts[0], *refs) for w in workers]
        else:
            parts = [w.run_fused.options(num_returns=2 * k).remote(list(calls), sh, opts, *refs)
                     for w in workers]  # fmt: skip
        n, out = len(parts), []
        for j, c in enumerate(calls):
            self.device_of.update({p[2 * j + 1]: d for p, d in zip(parts, sh[0].devices)})
            mine = reallocs if j == 0 else []

            def finish(values: list[Any], name: str = c.name) -> dict[str, float]:
                return merge_metrics(name, values[:n], values[n:])

            out.append(Dispatched([p[2 * j] for p in parts],
                                  [p[2 * j + 1] for p in parts] + mine, finish))  # fmt: skip
        return out

    def forget(self, dispatched: Iterable[Dispatched]) -> None:
        """Drop the devices of finished calls' references (`failure` names them)."""
        for d in dispatched:
            for ref in d.waits:  # what dispatch labelled: metrics and reallocations
                self.device_of.pop(ref, None)

    def failure(self, ref: Any, error: BaseException, call: str) -> Exception:
        """The runtime's exception for a step's reference that raised (failures.classify)."""
        device = self.device_of.get(ref)
        roles = self.roles_on(device) if device is not None else []
        return classify(error, device, roles, f"the call {call}")

    # -- evaluation and checkpoints ---------------------------------------------------

    def evaluate(
        self, count: int, params: list[Any], role: str = "actor"
    ) -> list[dict[str, float]]:
        """{'accuracy', 'reward', ...} of `role`'s responses to the first `count` evaluation
        rows (the run folder's data/rl_eval.jsonl) under each sampling of `params` (all
        at once), generated on the replica (and layout) of its first generate call, or of
        its train call if it has none (the one-call SFT stage). A worker that fails is
        named by its device (failures.gather)."""
        gen = [c for c in self.graph.calls if c.role == role and c.kind is CallKind.GENERATE]
        r = self.roles[role]
        sh = self.sharding[gen[0].name] if gen else r.train
        assert sh is not None, f"role {role} neither generates nor trains"
        self._refresh_now(role, sh, f"the reallocation of {role} for its evaluation")
        workers = self.cluster.on(sh[0])
        labelled = [(w.evaluate.remote(role, sh, count, p, r.version), d)
                    for p in params for w, d in zip(workers, sh[0].devices)]  # fmt: skip
        parts = self._wait(labelled, f"the evaluation of {role}")
        n = len(workers)
        return [merge_evaluation(parts[i * n : (i + 1) * n]) for i in range(len(params))]

    def _wait(self, labelled: list[tuple[Any, int]], what: str) -> list[Any]:
        """The values of (reference, device) pairs: a worker that died is named by its
        device (WorkerLost), any other error is raised as it is (failures.gather)."""
        return gather(labelled, self.roles_on, what, lost_only=True)

    def _refresh_now(self, role: str, sh: Sharding, what: str) -> None:
        """Bring the replica `sh` of `role` up to date before going on (`_refresh`)."""
        refs = self._refresh(role, sh)
        self._wait([(r, self.device_of.pop(r)) for r in refs], what)

    def _checkpoint_sharding(self, role: str) -> Sharding:
        """One device of the train mesh holding whole tensors: it writes the weights."""
        train = self.roles[role].train
        assert train is not None
        return Mesh(train[0].start, 1), Layout(1, 1, 1)

    def save(self, folder: Path, roles: list[str]) -> None:
        """Each trained role as folder/<role>: a Hugging Face folder of its full weights,
        and optim/rank<device>.pt with each train rank's optimizer and scheduler state."""
        tasks = []
        for role in roles:
            r = self.roles[role]
            assert r.train is not None
            one = self._checkpoint_sharding(role)
            if sharding_key(one) != sharding_key(r.train):
                self._refresh_now(role, one, f"the reallocation of {role} to save it")
            tasks.append((self.workers[one[0].start].write_model.remote(role, one, str(folder)),
                          one[0].start))  # fmt: skip
            tasks += [(w.save_rank.remote(role, r.train, str(folder)), d)
                      for w, d in zip(self.cluster.on(r.train[0]), r.train[0].devices)]  # fmt: skip
        self._wait(tasks, "saving a checkpoint")

    def write_model(self, role: str, folder: Path) -> None:
        """The role's current weights as the Hugging Face folder folder/<role>."""
        one = self._checkpoint_sharding(role)
        if sharding_key(one) != sharding_key(self.roles[role].train):
            self._refresh_now(role, one, f"the reallocation of {role} to write it")
        task = self.workers[one[0].start].write_model.remote(role, one, str(folder))
        self._wait([(task, one[0].start)], f"writing the model of {role}")

    def load(self, folder: Path, roles: list[str]) -> None:
        """Restore the trained roles from `save`'s folder (under the same plan); every
        other replica of those roles is refreshed before its next call."""
        tasks = []
        for role in roles:
            r = self.roles[role]
            assert r.train is not None
            r.version += 1
            r.held[sharding_key(r.train)] = r.version
            tasks += [(w.load_rank.remote(role, r.train, str(folder), r.version), d)
                      for w, d in zip(self.cluster.on(r.train[0]), r.train[0].devices)]  # fmt: skip
        self._wait(tasks, "loading a checkpoint")

    def stop(self) -> None:
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.shutdown(grace_s=10.0 if self.engines else 0.0)
