"""The one kind of model worker: a Ray actor per device of a plan's cluster (a GPU, or on
CPU a slot of the custom resource `relay_device` with its own torch thread count).

A worker hosts every replica the plan puts on its device, of any role: a role under one
sharding (mesh + layout), held as this device's slices (orchestrator.workers.replica). It
runs this device's part of each call the controller sends it:
- `reallocate`: the planner's comm plan from one replica of a role to another, on every
  device of both meshes (orchestrator.workers.realloc);
- `run`: one MFC call under its sharding, through the call's interface
  (orchestrator.interfaces): inference and generate calls on this device's data-parallel
  share of the rows, train calls on the whole batch (each dp rank trains on its share of
  every mini-batch, DeepSpeed ZeRO 0-3 over the dp group when tp = 1, torch's AdamW on
  DTensor shards when tp > 1);
- generation through transformers on the replica's own module, or through this device's
  shard of the vLLM engine (orchestrator.workers.engine_host), which takes the replica's
  slices whenever they changed;
- `evaluate`, and checkpoints: `write_model` (a Hugging Face folder from a one-device
  replica), `save_rank` / `load_rank` (each train rank's optimizer state).
The workers form one torch.distributed world, rank = device (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator.data.text import pad_id
from orchestrator.workers.engine_host import EngineGenerator
from orchestrator.workers.evaluating import Evaluating
from orchestrator.workers.failures import portable
from orchestrator.workers.groups import (
    DataParallelGroups,
    Sharding,
    backend,
    free_port,
    group_ranks,
    sharding_key,
)
from orchestrator.workers.memory import peak_rss_since_reset, reset_peak_rss
from orchestrator.workers.replica import Replica, RoleModel

REALLOC_KEY = "_realloc/"  # a rank's stats of the reallocation its call task ran first


class DeviceWorker(Evaluating):
    """One device of the plan's cluster (created as a Ray actor by DeviceCluster)."""

    def __init__(self, device: int, world_size: int, threads: int = 1, kind: str = "cpu") -> None:
        # the process before any model: the runtime's own memory, to tell model memory apart
        self.baseline_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        self.calls_peak_reset = False
        self.pushed_s = 0.0  # seconds of engine weight pushes during the call in flight
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        # DeepSpeed picks its accelerator once per process, from this variable if set.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if kind == "cuda" else "cpu")
        self.device, self.world_size, self.threads, self.kind = device, world_size, threads, kind
        self.torch_device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(0)  # Ray shows each worker its own GPU only
        self.replicas: dict[tuple[str, str], Replica] = {}
        self.models: dict[str, RoleModel] = {}  # every role's model, in or out of its meshes
        self.groups: dict[tuple[int, ...], Any] = {}
        self.specs: dict[str, Any] = {}  # role -> RoleSpec
        self.tokenizer: Any = None
        self.task: Any = None
        self.engine: Any = None  # this device's vLLM shard (EngineHost), if the plan has one
        self.offload_roles: set[str] = set()
        self.parked: dict[tuple[str, str], Any] = {}  # replica key -> its offload.Offloaded
        self.produced: dict[
            str, tuple[Any, dict[str, torch.Tensor]]
        ] = {}  # call -> (step, outputs)

    # -- the world ------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This worker's node address and a free port on it (for rank 0's store)."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def join(self, master: tuple[str, int], groups: list[list[int]]) -> dict[str, Any]:
        """Join the world (rank = device) and create every group the plan uses; all
        workers call this with the same `groups`, in the same order. Returns where this
        worker runs: its process id and host name."""
        import socket

        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() == self.world_size == 1:
            pass  # a world of one this process made already (tests run workers in-process)
        else:
            self._init_world(master)
        for ranks in groups:
            key = tuple(ranks)
            if key not in self.groups:
                self.groups[key] = dist.new_group(list(ranks))
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "cores": len(os.sched_getaffinity(0))}  # fmt: skip

    def _init_world(self, master: tuple[str, int]) -> None:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                          RANK=str(self.device), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0")  # fmt: skip
        dist.init_process_group(backend(self.kind), init_method=f"tcp://{master[0]}:{master[1]}",
                                rank=self.device, world_size=self.world_size)  # fmt: skip

    def _group(self, ranks: list[int]) -> Any:
        return self.groups[tuple(ranks)]

    def _my_group(self, sharding: Sharding, kind: str) -> list[int]:
        return next(g for g in group_ranks(sharding, kind) if self.device in g)

    def _ranks(self, sharding: Sharding) -> tuple[int, int, bool]:
        """(dp index, dp size, whether this device is the first of its tp group)."""
        mesh, lay = sharding
        dp_i = next(d for dev, d, _, _ in lay.ranks(mesh) if dev == self.device)
        return dp_i, lay.dp, self._my_group(sharding, "tp")[0] == self.device

    # -- roles, engines and replicas ------------------------------------------------

    @portable
    def host(self, specs: list[Any], offload: list[str] | tuple[str, ...] = ()) -> None:
        """The roles (RoleSpecs) whose calls this worker may run; the frozen roles of
        `offload` keep their weights in host memory between calls (models.offload)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from orchestrator.data.prompts import RowTable
        from orchestrator.data.tasks import make_task

        hf_logging.set_verbosity_error()
        self.specs = {s.name: s for s in specs}
        trained = [r for r in offload if self.specs[r].optim is not None]
        if trained:
            raise ValueError(f"roles {trained} train: only frozen roles are offloaded")
        self.offload_roles = set(offload)
        first = specs[0]
        self.tokenizer = AutoTokenizer.from_pretrained(first.tokenizer_path)
        self.task = make_task(first.task_name, first.task_digits)
        self.rows = RowTable(first.rows_folder)
        torch.manual_seed(first.seed)

    @portable
    def build_engine(self, role: str, tp: int) -> None:
        """This device's shard of `role`'s vLLM engine, from the role's folder. Every
        worker of the world calls it at once (vLLM's groups span the world)."""
        from orchestrator.engines.vllm_engine import VLLMEngine
        from orchestrator.workers.engine_host import EngineHost

        spec, tok = self.specs[role], self.tokenizer
        engine = VLLMEngine(spec.init_path, tok.eos_token_id, pad_id(tok), spec.vllm,
                            self.threads, tensor_parallel_size=tp)  # fmt: skip
        self.engine = EngineHost(engine, tp, self.device)
        torch.manual_seed(spec.seed)  # vLLM reset the global seed when it started

    @portable
    def load(self, role: str, sharding: Sharding) -> int:
        """Read the role's Hugging Face folder and keep this device's slices under
        `sharding` (nothing outside its mesh, but the role's model metadata); returns the
        bytes kept."""
        from orchestrator.models.kinds import load_model, model_config, shape_of, to_plan_names
        from orchestrator.workers.realloc import shard_state

        spec = self.specs[role]
        kind = spec.kind()
        if not kind.has_model:
            return 0
        if role not in self.models:
            config = model_config(kind, spec.init_path)
            self.models[role] = RoleModel(kind, shape_of(kind, role, config), config,
                                          spec.init_path)  # fmt: skip
        model = self.models[role]
        if self.device not in sharding[0].devices:
            return 0
        full = to_plan_names(kind, load_model(kind, model.folder).state_dict())
        shards = shard_state(full, model.shape, sharding, self.device)
        del full
        rep = Replica(role, sharding, model)
        rep.overwrite(shards)
        self.replicas[rep.key] = rep
        return sum(t.numel() * t.element_size() for t in shards.values())

    def _replica(self, role: str, sharding: Sharding) -> Replica:
        key = (role, sharding_key(sharding))
        if key not in self.replicas:
            if self.specs[role].kind().has_model:
                raise KeyError(f"no replica of {role} under {key[1]} on device {self.device}")
            self.replicas[key] = Replica(role, sharding, RoleModel(self.specs[role].kind(),
                                         None, {}, ""))  # type: ignore[arg-type]  # fmt: skip
        return self.replicas[key]

    def _context(self, rep: Replica, train: bool, generates: bool) -> Any:
        """The replica's WorkerContext for the interfaces: its module, a trainer over its
        data-parallel group for train calls, a generator for generate calls."""
        from orchestrator.interfaces.registry import WorkerContext

        spec = self.specs[rep.role]
        if rep.ctx is None:
            module = None
            if rep.model.kind.has_model:
                module = rep.build(self._group(self._my_group(rep.sharding, "tp")),
                                   self.torch_device)  # fmt: skip
                module.requires_grad_(False)
                if spec.dtype != "float32" and spec.optim is None:
                    self._cast_frozen(rep, module, spec.dtype)
            rep.ctx = WorkerContext(rep.role, module, self.tokenizer, self.task, rows=self.rows,
                                    task_rows=spec.task_rows)  # fmt: skip
            if spec.reward is not None:
                rep.ctx.reward = self._reward(spec.reward)
        ctx = rep.ctx
        if train and ctx.train is None:
            self._trainer(rep, spec)
        if generates and ctx.generator is None:
            ctx.generator = self._generator(rep, spec)
            rep.generates = True
        return ctx

    def _cast_frozen(self, rep: Replica, module: torch.nn.Module, dtype: str) -> None:
        """Hold a frozen replica in `dtype`; what it changes on the run's first prompts is
        logged by every call of the role (models.precision)."""
        from orchestrator.data.text import encode_prompts
        from orchestrator.models.precision import cast_frozen

        rows = self.rows.rows("train")[:8] if self.rows.folder else []
        ids = mask = torch.zeros((0, 0), dtype=torch.long)
        if rows:
            ids, mask = encode_prompts(self.tokenizer, [r.text for r in rows],
                                       add_bos=not rows[0].templated)  # fmt: skip
        value = rep.model.kind.name == "value"
        diff = cast_frozen(module, getattr(torch, dtype), ids.to(self.torch_device),
                           mask.to(self.torch_device), value)  # fmt: skip
        what = "score" if value else "logprob"
        self.__dict__.setdefault("dtype_diffs", {})[rep.role] = {
            f"perf/{rep.role}_{dtype}_{what}_diff_{k}": v for k, v in diff.items()}  # fmt: skip

    def _reward(self, mix: Any) -> Any:
        """The LoadedReward of a RewardMix, its functions imported once per worker (the
        reward role's calls and the generating role's evaluation share them)."""
        from orchestrator.data.reward_fns import LoadedReward
        from orchestrator.data.user_data import load_reward_function

        loaded = self.__dict__.setdefault("_rewards", {})
        if mix not in loaded:
            loaded[mix] = LoadedReward(mix, load_reward_function)
        return loaded[mix]

    def _trainer(self, rep: Replica, spec: Any) -> None:
        from orchestrator.engines.train import TensorParallelTrainEngine, TrainEngine

        if spec.optim is None:
            raise ValueError(f"role '{rep.role}' has no optimizer: it cannot train")
        ctx, (_, lay) = rep.ctx, rep.sharding
        dp = self._group(self._my_group(rep.sharding, "dp"))
        ctx.module.requires_grad_(True)
        if lay.tp > 1:
            tp = self._group(self._my_group(rep.sharding, "tp"))
            ctx.train = TensorParallelTrainEngine(ctx.module, spec.optim, dp, tp, lay.dp)
        else:
            mpu = DataParallelGroups(dp, self._group([self.device]))
            ctx.train = TrainEngine(ctx.module, spec.optim, mpu=mpu, dp=lay.dp)
        ctx.module = rep.module = ctx.train.module

    def _generator(self, rep: Replica, spec: Any) -> Any:
        """vLLM (this device's engine shard, fed from the replica) or transformers'
        generate on the replica's module; responses end at stop strings either way."""
        from orchestrator.engines.generate import HFGenerateEngine, StopStrings

        tok = self.tokenizer
        if spec.generation_backend == "vllm":
            if self.engine is None:
                raise RuntimeError(f"role '{rep.role}' generates with vLLM, but this plan's "
                                   "workers built no engine")  # fmt: skip
            self.engine.check(rep.sharding)
            return StopStrings(EngineGenerator(self, rep), tok, pad_id(tok))

        # ZeRO-3 over several ranks gathers weights in every forward: all ranks must take
        # the same number of decoding steps, so none stops early (rows still end at eos)
        _, lay = rep.sharding
        fixed = bool(spec.optim and spec.optim.zero_stage == 3 and lay.dp > 1)
        hf = HFGenerateEngine(rep.ctx.module, tok.eos_token_id, pad_id(tok), fixed, tok)
        return StopStrings(hf, tok, pad_id(tok))

    def push_engine(self, rep: Replica) -> float | None:
        """Bring this device's engine shard up to the replica's weights (timed; None if it
        holds them). Every device of the replica's tp group calls it together."""
        with rep.readable():
            seconds = self.engine.push(
                "/".join(rep.key), rep.version, rep.current(), rep.model.shape, rep.sharding,
                self._group(self._my_group(rep.sharding, "tp")),
            )  # fmt: skip
        self.pushed_s += seconds or 0.0
        return seconds

    @portable
    def prepare(self, call: Any, sharding: Sharding) -> None:
        """Build what `call` needs under `sharding` (the module, a trainer, a generator)."""
        from algos.graph import CallKind

        rep = self._replica(call.role, sharding)
        self._context(rep, call.kind is CallKind.TRAIN, call.kind is CallKind.GENERATE)
        if rep.role in self.offload_roles and rep.key not in self.parked and rep.module:
            from orchestrator.models.offload import offload

            self.parked[rep.key] = offload(rep.module)

    # -- reallocation ---------------------------------------------------------------

    def reallocate(
        self, role: str, src: Sharding, dst: Sharding, devices_per_node: int, version: int
    ) -> dict[str, float]:
        """This device's part of the comm plan from replica `src` to replica `dst` of a
        role (which then holds weights `version`); returns byte counts and times."""
        from orchestrator.workers.realloc import ReallocStats, reallocate

        model = self.models[role]
        key = (role, sharding_key(dst))
        rep = self.replicas.get(key)
        if key in self.parked:
            raise ValueError(f"replica {role} under {key[1]} is offloaded (a frozen role): "
                             "nothing trains it, so nothing is reallocated into it")  # fmt: skip
        if rep is not None and rep.trains:
            raise ValueError(
                f"replica {role} under {key[1]} trains (it has optimizer state): "
                "reallocate from a trained replica, not into it"
            )
        dtype = getattr(torch, model.config.get("torch_dtype") or model.config.get("dtype")
                        or "float32")  # fmt: skip
        stats = ReallocStats()
        wall, start = time.time(), time.perf_counter()
        source = self.replicas.get((role, sharding_key(src)))
        if self.device in src[0].devices:
            assert source is not None, f"device {self.device} holds no {role} replica to send"
            with source.readable():
                got = reallocate(source.current(), model.shape, src, dst, self.device,
                                 devices_per_node=devices_per_node, dtype=dtype, stats=stats,
                                 target=self.torch_device)  # fmt: skip
        else:
            got = reallocate({}, model.shape, src, dst, self.device, devices_per_node=devices_per_node,
                             dtype=dtype, stats=stats, target=self.torch_device)  # fmt: skip
        if self.device in dst[0].devices:
            if rep is None:
                rep = self.replicas[key] = Replica(role, dst, model)
            rep.overwrite(got)
            rep.version = version
        end = time.perf_counter()
        return {"sent": stats.sent_bytes, "received": stats.received_bytes,
                "local": stats.local_bytes, "seconds": end - start,
                "start": wall, "end": wall + end - start}  # fmt: skip

    # -- calls ------------------------------------------------------------------------

    @portable
    def run(
        self, call: Any, sharding: Sharding, options: Mapping[str, Any], *inputs: Any
    ) -> tuple[tuple[int, dict[str, torch.Tensor]] | None, dict[str, float]]:
        """This device's part of one MFC call under `sharding`: inference and generate
        calls on its data-parallel share of the rows, train calls on the whole batch
        (each rank trains on its share of every mini-batch). Returns ((dp index, outputs)
        from the first rank of each tp group, else None; metrics)."""
        return self.run_fused([call], sharding, [options], *inputs)  # type: ignore[return-value]

    @portable
    def run_fused(
        self, calls: list[Any], sharding: Sharding, options: list[Mapping[str, Any]], *inputs: Any
    ) -> tuple[Any, ...]:
        """`run` of several inference or generate calls of one replica that are ready
        together, as one batch of their interface's engine (interfaces.registry.FUSED):
        (part, metrics) of each call in turn, flattened. Each call's time and CPU time
        are the batch's, shared by its rows."""
        from algos.graph import CallKind, check_outputs
        from orchestrator.interfaces.lookup import get_fused, get_interface

        call, opts = calls[0], [dict(o) for o in options]
        for c in calls:
            self.produced.pop(c.name, None)
        folded: dict[str, float] = {}
        if "reallocate" in opts[0]:  # this replica lags the trained one: refresh it first
            src, dpn = opts[0].pop("reallocate")
            stats = self.reallocate(call.role, src, sharding, dpn, opts[0]["version"])
            folded = {REALLOC_KEY + k: float(v) for k, v in stats.items()}
        rep = self._replica(call.role, sharding)
        train = call.kind is CallKind.TRAIN
        ctx = self._context(rep, train, call.kind is CallKind.GENERATE)
        batches = []
        for c, o in zip(calls, opts):
            batch, dp_i, first = self._batch(c, sharding, o, inputs)
            o.update(inputs=c.inputs, outputs=c.outputs)
            batches.append(batch)
        if train:
            opts[0].update(dp_rank=dp_i, dp_size=sharding[1].dp)
        else:
            rep.version = opts[0].get("version", rep.version)
        wall, t0 = time.time(), time.perf_counter()
        self.pushed_s = 0.0
        moved = self._reload(rep.key)
        threads = opts[0].pop("threads", self.threads)
        # vLLM's CPU worker makes torch.set_num_threads a no-op in its process: the call
        # sets torch's own setter (OpenMP's count for torch's and vLLM's kernels alike)
        torch._C.set_num_threads(threads)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            if len(calls) == 1:
                results = [get_interface(call.interface)(ctx, batches[0], opts[0])]
            else:
                results = get_fused(call.interface)(ctx, batches, opts)
            seconds = time.perf_counter() - start
        finally:  # reload before, offload after (a failed call too); the span covers both
            if rep.key in self.parked:
                from orchestrator.models.offload import offload

                self.parked[rep.key] = offload(rep.module)
        cpu_s = time.process_time() - cpu
        if train:
            rep.version = opts[0].get("version", rep.version)
            if opts[0].get("push_weights") and rep.generates and self.engine is not None:
                self.push_engine(rep)  # the next step samples from these weights: now
        end = wall + time.perf_counter() - t0
        rows = [next(iter(b.values())).shape[0] if b else 1 for b in batches]
        out: list[Any] = []
        for c, o, (outputs, metrics), n in zip(calls, opts, results, rows):
            share = n / max(sum(rows), 1)
            metrics[f"time/{c.name}_s"] = seconds * share
            metrics[f"perf/cpu_{c.name}_s"] = cpu_s * share
            metrics[f"perf/threads_{c.name}"] = float(threads)
            if len(calls) > 1:
                metrics[f"time/fused_{c.name}_s"] = seconds  # the whole engine batch's
            if self.pushed_s and c is call:
                metrics["time/weight_sync"] = self.pushed_s
            if rep.key in self.parked and c is call:
                metrics[f"time/offload_{c.name}_s"] = time.perf_counter() - t0 - seconds
                metrics[f"offload/{c.name}_bytes"] = float(moved)
            metrics[f"span/{c.name}/start"], metrics[f"span/{c.name}/end"] = wall, end
            metrics.update(self._memory())
            outputs = {k: v.cpu() for k, v in outputs.items()}  # the object store: CPU tensors
            check_outputs(c, outputs)
            if not train:  # consumers under this sharding read it here
                self.produced[c.name] = (o.get("step"), outputs)
            if c is call:
                metrics.update(folded)
                metrics.update(self.__dict__.get("dtype_diffs", {}).get(c.role, {}))
            out += [(dp_i, outputs) if first else None, metrics]
        return tuple(out)

    def _batch(
        self, call: Any, sharding: Sharding, options: dict[str, Any], inputs: tuple[Any, ...]
    ) -> tuple[dict[str, torch.Tensor], int, bool]:
        """The call's input batch on this device: the whole batch for a train call, this
        dp rank's share of the rows otherwise (parts of producers that ran under this
        sharding read from this device's memory: `local_inputs`)."""
        from algos.graph import CallKind
        from orchestrator.models.batch import gather_inputs

        local = options.pop("local_inputs", None)
        merged = gather_inputs(inputs)
        dp_i, dp, first = self._ranks(sharding)
        if call.kind is CallKind.TRAIN:
            batch = {k: merged[k] for k in call.inputs}
        else:
            own: dict[str, torch.Tensor] = {}
            for name in local or []:  # producers under this sharding: their part is ours
                step, part = self.produced.get(name, (None, None))
                if part is None or step != options.get("step"):
                    raise RuntimeError(f"call '{call.name}': no output of '{name}' of this step "
                                       f"on device {self.device} (did '{name}' fail?)")  # fmt: skip
                own.update(part)
            batch = {k: merged[k] for k in call.inputs if k not in own}
            rows = next(iter(batch.values())).shape[0] if batch else dp
            if rows % dp:
                raise ValueError(f"call '{call.name}': {rows} rows do not split over dp = {dp}")
            batch = {k: v.chunk(dp)[dp_i] for k, v in batch.items()}
            batch.update({k: own[k] for k in call.inputs if k in own})
        return {k: v.to(self.torch_device) for k, v in batch.items()}, dp_i, first

    def _memory(self) -> dict[str, float]:
        """This device's peak resident memory (whole process; since its models were
        built; each less the process's own before any model)."""
        d = self.device
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        out = {f"perf/peak_rss_bytes_d{d}": peak,
               f"perf/model_rss_bytes_d{d}": peak - self.baseline_rss_bytes}  # fmt: skip
        if self.calls_peak_reset:
            calls = peak_rss_since_reset()
            out[f"perf/calls_peak_rss_bytes_d{d}"] = calls
            out[f"perf/calls_model_rss_bytes_d{d}"] = calls - self.baseline_rss_bytes
        return out

    def built(self) -> None:
        """Every replica and engine is built: from here on the peak counts what running
        calls hold, not the load's transients (a state dict read beside a built model,
        an engine's start-up)."""
        self.calls_peak_reset = reset_peak_rss()

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(this worker, *args) in the worker's process: for tests and diagnostics
        (vLLM's collective_rpc plays the same part)."""
        return fn(self, *args)

    def engine_logprobs(
        self, role: str, sharding: Sharding, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The vLLM engine's log-probs (temperature 1) of the batch's fixed responses
        [B, T], after any pending weight push: compare with the trainer's to check that
        the engine samples from the replica's weights."""
        rep = self._replica(role, sharding)
        ctx = self._context(rep, train=False, generates=True)
        keys = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
        return ctx.generator.sequence_logprobs(*(batch[k] for k in keys)).cpu()

    def _reload(self, key: tuple[str, str]) -> int:
        """Bring an offloaded replica's weights back from host memory (its bytes; 0 if
        it was not offloaded)."""
        from orchestrator.models.offload import reload

        return reload(self.parked[key]) if key in self.parked else 0

    # -- checkpoints ------------------------------------------------------------------

    def shards(self, role: str, sharding: Sharding) -> dict[str, torch.Tensor]:
        """Copies of this device's current slices of a replica (plan names, on CPU)."""
        rep = self._replica(role, sharding)
        with rep.readable():
            return {k: v.detach().cpu().clone() for k, v in rep.current().items()}

    def write_model(self, role: str, sharding: Sharding, folder: str) -> list[str]:
        """Save a replica whose one device holds whole tensors (dp = tp = pp = 1) as a
        Hugging Face folder folder/<role>, with the tokenizer."""
        from orchestrator.models.kinds import build_model, save_model, to_module_names

        rep = self._replica(role, sharding)
        if sharding[0].size != 1:
            raise ValueError(f"write_model needs a one-device replica, got {rep.key[1]}")
        model = build_model(rep.model.kind, rep.model.config)
        model.load_state_dict(to_module_names(rep.model.kind, self.shards(role, sharding), model))
        out = Path(folder) / role
        out.mkdir(parents=True, exist_ok=True)
        save_model(rep.model.kind, model, out)
        self.tokenizer.save_pretrained(out)
        return [str(p) for p in out.rglob("*") if p.is_file()]

    def save_rank(self, role: str, sharding: Sharding, folder: str) -> str:
        """This rank's optimizer and scheduler state of a trained replica, as
        folder/<role>/optim/rank<device>.pt."""
        rep = self._replica(role, sharding)
        if not rep.trains:
            raise ValueError(f"replica {role} under {rep.key[1]} has not trained")
        out = Path(folder) / role / "optim"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.device}.pt"
        torch.save(rep.ctx.train.rank_state(), path)
        return str(path)

    @portable
    def load_rank(self, role: str, sharding: Sharding, folder: str, version: int) -> None:
        """Restore a trained replica from a checkpoint folder: the weights (folder/<role>,
        this device's slices of them) and this rank's optimizer state."""
        from orchestrator.models.kinds import load_model, to_plan_names
        from orchestrator.workers.realloc import shard_state

        rep = self._replica(role, sharding)
        self._context(rep, train=True, generates=False)
        full = to_plan_names(rep.model.kind, load_model(rep.model.kind, str(Path(folder) / role))
                             .state_dict())  # fmt: skip
        if sharding[1].tp == 1:
            rep.overwrite(full)
        else:
            rep.overwrite(shard_state(full, rep.model.shape, sharding, self.device))
        state = torch.load(Path(folder) / role / "optim" / f"rank{self.device}.pt",
                           weights_only=False)  # fmt: skip
        rep.ctx.train.load_rank_state(state)
        rep.version = version

    def close(self) -> None:
        """Release this device's engine shard (its shared-memory segments), then exit."""
        import ray

        if self.engine is not None:
            self.engine.engine.close()
        ray.actor.exit_actor()
