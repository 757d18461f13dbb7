"""Model workers that execute plans: one Ray actor per device of the plan's cluster.

`DeviceCluster` (on the controller) places the workers with one placement group per node
of the plan, each a STRICT_PACK group of that node's device slots, so device d of a plan
lands on the plan's node d // devices_per_node and meshes map to Ray nodes as the plan
says. (A placement group per mesh would not do: the meshes of a plan overlap.) The
workers form one torch.distributed world (gloo; CPU only so far), rank = device.

Each worker holds, per model replica (a role under a sharding = mesh + layout), only its
own slices of the weights, as the planner's rules give them (planner.realloc):
- `reallocate` runs the planner's comm plan between two shardings of a role
  (orchestrator.workers.realloc), on every device of both meshes;
- `forward` runs a replica's forward pass, tensor parallel over its tp group
  (orchestrator.models.tensor_parallel), each data-parallel rank on its share of the batch;
- `train_step` runs one optimizer step of a replica: with DeepSpeed (ZeRO-1) over its
  data-parallel group when tp = 1; with tp > 1, on the tensor-parallel model with its
  gradient shards averaged over the data-parallel group and torch's optimizer.
Pipeline parallelism is not executed: replicas with pp > 1 are held and reallocated, but
forward and train calls refuse them (the planner marks such plans simulation-only).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from planner.catalogue import ModelShape, shape_from_hf_config
from planner.layout import Layout, Mesh

Sharding = tuple[Mesh, Layout]
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def sharding_key(sharding: Sharding) -> str:
    mesh, lay = sharding
    return f"{mesh} dp{lay.dp} tp{lay.tp} pp{lay.pp}"


def group_ranks(sharding: Sharding, kind: str) -> list[list[int]]:
    """The device groups of a sharding: 'tp' (same dp and pp index), 'dp' (same pp and
    tp index)."""
    mesh, lay = sharding
    groups: dict[tuple[int, int], list[int]] = {}
    for dev, dp_i, pp_i, tp_i in lay.ranks(mesh):
        key = (dp_i, pp_i) if kind == "tp" else (pp_i, tp_i)
        groups.setdefault(key, []).append(dev)
    return list(groups.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DataParallelGroups:
    """What DeepSpeed asks of a model-parallel unit (`mpu`): here data parallelism over a
    subset of the world and no model parallelism."""

    def __init__(self, dp_group: Any, self_group: Any) -> None:
        self.dp, self.mp = dp_group, self_group

    def get_data_parallel_group(self) -> Any:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.dp)

    def get_data_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.dp)

    def get_model_parallel_group(self) -> Any:
        return self.mp

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    # the names DeepSpeed also looks up
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


@dataclass
class Replica:
    role: str
    sharding: Sharding
    shape: ModelShape
    config: dict[str, Any]  # the Hugging Face config the model is built from
    shards: dict[str, torch.Tensor]
    kind: str = "causal"  # causal (a language model) | value (a per-token scalar head)
    module: torch.nn.Module | None = None  # built on first forward / train call
    engine: Any = None  # the optimizer of `train_step`
    ctx: Any = None  # the interfaces' WorkerContext, built on the first call (`run`)

    @property
    def trains(self) -> bool:
        return self.engine is not None or (self.ctx is not None and self.ctx.train is not None)


def model_config(folder: str, kind: str) -> dict[str, Any]:
    """The Hugging Face config (as a dict) a replica of `kind` is built from; a value
    replica of a causal folder gets a one-label head (orchestrator.models.hf)."""
    from transformers import AutoConfig

    from orchestrator.models.hf import _is_value_model

    config = AutoConfig.from_pretrained(folder)
    if kind == "value" and not _is_value_model(config):
        config.num_labels = 1
        config.classifier_dropout = 0.0
    return config.to_dict()


def load_full(folder: str, kind: str) -> torch.nn.Module:
    """A role's whole model from a Hugging Face folder (orchestrator.models.hf's loaders)."""
    from orchestrator.models.hf import load_causal_lm, load_value_model

    return load_value_model(folder) if kind == "value" else load_causal_lm(folder)


def build_model(config: dict[str, Any], kind: str) -> torch.nn.Module:
    """An fp32 model of `kind` from its config (values to be overwritten by shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    d = dict(config)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    cls = AutoModelForTokenClassification if kind == "value" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        return cls.from_config(hf, dtype=torch.float32)


class DeviceWorker:
    """One device of the plan's cluster (created as a Ray actor by DeviceCluster)."""

    def __init__(self, device: int, world_size: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.device, self.world_size = device, world_size
        self.replicas: dict[tuple[str, str], Replica] = {}
        self.groups: dict[tuple[int, ...], Any] = {}
        self.specs: dict[str, Any] = {}  # role -> RoleSpec, for the MFC interfaces (`run`)
        self.tokenizer: Any = None
        self.task: Any = None
        self.offload_roles: set[str] = set()  # frozen roles kept in host memory between calls
        self.parked: dict[tuple[str, str], Any] = {}  # replica key -> its offload.Offloaded
        self.produced: dict[
            str, tuple[Any, dict[str, torch.Tensor]]
        ] = {}  # call -> (step, outputs)

    # -- the world ------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This worker's node address and a free port on it (for rank 0's store)."""
        import ray

        from orchestrator.workers.device_worker import free_port

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def join(self, master: tuple[str, int], groups: list[list[int]]) -> None:
        """Join the world (rank = device) and create every group the plan uses; all
        workers call this with the same `groups`, in the same order."""
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                          RANK=str(self.device), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0")  # fmt: skip
        dist.init_process_group(
            "gloo", init_method=f"tcp://{master[0]}:{master[1]}",
            rank=self.device, world_size=self.world_size,
        )  # fmt: skip
        for ranks in groups:
            key = tuple(ranks)
            if key not in self.groups:
                self.groups[key] = dist.new_group(list(ranks))

    def _group(self, ranks: list[int]) -> Any:
        return self.groups[tuple(ranks)]

    def _my_group(self, sharding: Sharding, kind: str) -> list[int]:
        return next(g for g in group_ranks(sharding, kind) if self.device in g)

    # -- replicas -------------------------------------------------------------------

    def load(self, role: str, folder: str, sharding: Sharding, kind: str = "causal") -> int:
        """Read a Hugging Face model folder and keep this device's slices under
        `sharding` (nothing if the device is outside its mesh); returns the bytes kept.
        A `kind` = value replica of a causal folder gets a zero one-label head, as
        orchestrator.models.hf.load_value_model makes it."""
        from orchestrator.workers.realloc import shard_state

        config = model_config(folder, kind)
        shape = replace(shape_from_hf_config(role, config), value_head=kind == "value")
        shards: dict[str, torch.Tensor] = {}
        if self.device in sharding[0].devices:
            model = load_full(folder, kind)
            shards = shard_state(model.state_dict(), shape, sharding, self.device)
            del model
        key = (role, sharding_key(sharding))
        old = self.replicas.get(key)
        if old is not None and old.module is not None:  # a built replica: new values in place
            from orchestrator.models.tensor_parallel import load_shards

            load_shards(old.module, shards)
            old.shards = {}
        else:
            self.replicas[key] = Replica(role, sharding, shape, config, shards, kind)
        return sum(t.numel() * t.element_size() for t in shards.values())

    def shards(self, role: str, sharding: Sharding, copy: bool = True) -> dict[str, torch.Tensor]:
        """This device's current slices of a replica (the trained values if it trained);
        copy=False: the replica's own tensors, to read before its next call."""
        rep = self.replicas[(role, sharding_key(sharding))]
        if rep.module is not None:
            from orchestrator.models.tensor_parallel import local_shards

            held = local_shards(rep.module)
            return {k: v.detach().clone() for k, v in held.items()} if copy else held
        return dict(rep.shards)

    def reallocate(self, role: str, src: Sharding, dst: Sharding, devices_per_node: int) -> dict:
        """This device's part of the comm plan from replica `src` to replica `dst` of a
        role; the destination replica's slices are replaced. Returns byte counts."""
        from orchestrator.workers.realloc import ReallocStats, reallocate

        # every worker registered the role when it was loaded, in or out of its mesh
        source = next(r for (name, _), r in self.replicas.items() if name == role)
        key = (role, sharding_key(dst))
        rep = self.replicas.get(key)
        if key in self.parked:
            raise ValueError(f"replica {role} under {sharding_key(dst)} is offloaded (a frozen "
                             "role): nothing trains it, so nothing is reallocated into it")  # fmt: skip
        if rep is not None and rep.trains:
            raise ValueError(
                f"replica {role} under {sharding_key(dst)} trains (it has optimizer state): "
                "reallocate from a trained replica, not into it"
            )
        mine = self.shards(role, src, copy=False) if self.device in src[0].devices else {}
        dtype = getattr(torch, source.config.get("torch_dtype") or source.config.get("dtype")
                        or "float32")  # fmt: skip
        stats = ReallocStats()
        wall, start = time.time(), time.perf_counter()
        got = reallocate(mine, source.shape, src, dst, self.device,
                         devices_per_node=devices_per_node, dtype=dtype, stats=stats)  # fmt: skip
        if rep is None:
            rep = Replica(role, dst, source.shape, source.config, {}, source.kind)
            self.replicas[key] = rep
        if rep.module is not None:  # a built replica takes the new weights in place
            from orchestrator.models.tensor_parallel import load_shards

            load_shards(rep.module, got)
            rep.shards = {}
        else:
            rep.shards = got
        return {"sent": stats.sent_bytes, "received": stats.received_bytes,
                "local": stats.local_bytes, "seconds": time.perf_counter() - start,
                "start": wall, "end": wall + time.perf_counter() - start}  # fmt: skip

    def _module(self, rep: Replica) -> torch.nn.Module:
        if rep.module is not None:
            return rep.module
        mesh, lay = rep.sharding
        if lay.pp > 1:
            raise NotImplementedError(
                f"replica {rep.role} under {sharding_key(rep.sharding)}: pipeline parallel "
                "calls are not executed by this runtime (plans with pp > 1 are simulation-"
                "only); use a layout with pp = 1"
            )
        from orchestrator.models.tensor_parallel import load_shards, parallelize

        model = build_model(rep.config, rep.kind)
        if lay.tp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            tp = self._my_group(rep.sharding, "tp")
            mesh_obj = DeviceMesh.from_group(self._group(tp), "cpu", mesh=tp)
            parallelize(model, mesh_obj)
        load_shards(model, rep.shards)
        rep.shards = {}  # the module holds them now
        rep.module = model.eval()
        return model

    def _share(self, batch: Mapping[str, torch.Tensor], sharding: Sharding) -> torch.Tensor:
        """This device's data-parallel share of the batch's rows (dp ranks in order)."""
        _, lay = sharding
        rows = batch["input_ids"].shape[0]
        if rows % lay.dp:
            raise ValueError(f"a batch of {rows} rows does not split over dp = {lay.dp} ranks")
        return batch["input_ids"].chunk(lay.dp)[self._ranks(sharding)[0]]

    def _group_mean(self, loss: torch.Tensor, dp: list[int]) -> float:
        """The mean of each dp rank's loss."""
        import torch.distributed as dist

        total = loss.detach().clone()
        dist.all_reduce(total, group=self._group(dp))
        return float(total) / len(dp)

    def forward(
        self, role: str, sharding: Sharding, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Logits of this device's data-parallel share of `batch` (the dp ranks split
        its rows in order); None from all but the first rank of each tp group."""
        rep = self.replicas[(role, sharding_key(sharding))]
        model = self._module(rep).eval()
        ids = self._share(batch, sharding)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        tp = self._my_group(sharding, "tp")
        return logits if tp[0] == self.device else None

    def train_step(
        self,
        role: str,
        sharding: Sharding,
        batch: Mapping[str, torch.Tensor],
        lr: float,
        optimizer: str = "adamw",
    ) -> float:
        """One optimizer step (`optimizer` adamw or sgd, DeepSpeed ZeRO-1 over the
        replica's data-parallel group) of next-token cross-entropy on this rank's share of
        `batch`; returns the mean loss over the group."""
        import deepspeed

        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer = {optimizer!r}: use one of {sorted(OPTIMIZERS)}")
        rep = self.replicas[(role, sharding_key(sharding))]
        _, lay = sharding
        model = self._module(rep)  # refuses pp > 1
        dp = self._my_group(sharding, "dp")
        ids = self._share(batch, sharding)
        if lay.tp > 1:
            return self._tp_train_step(rep, model, dp, ids, lr, optimizer)
        if rep.engine is None:
            me = self._group([self.device])
            rows = batch["input_ids"].shape[0]
            config = {
                "train_batch_size": rows,
                "train_micro_batch_size_per_gpu": rows // lay.dp,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
                "zero_optimization": {"stage": 1},
                "zero_allow_untested_optimizer": True,  # torch's SGD: elementwise, as AdamW
                "steps_per_print": 10**9,
            }
            opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
            rep.engine, *_ = deepspeed.initialize(
                model=model, optimizer=opt, config=config,
                mpu=_DataParallelGroups(self._group(dp), me),
            )  # fmt: skip
        model.train()
        out = rep.engine(input_ids=ids, labels=ids)
        rep.engine.backward(out.loss)
        rep.engine.step()
        return self._group_mean(out.loss, dp)

    def _tp_train_step(
        self,
        rep: Replica,
        model: torch.nn.Module,
        dp: list[int],
        ids: torch.Tensor,
        lr: float,
        optimizer: str,
    ) -> float:
        """A tensor-parallel replica's step: the sharded model's backward, each gradient
        shard averaged over the data-parallel group, then torch's optimizer on the
        shards (DeepSpeed's ZeRO flattens parameters, which DTensor shards do not allow)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        if rep.engine is None:
            rep.engine = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if len(dp) > 1:
            for p in model.parameters():
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                dist.all_reduce(g, group=self._group(dp))
                g.div_(len(dp))
        rep.engine.step()
        rep.engine.zero_grad(set_to_none=True)
        return self._group_mean(out.loss, dp)

    # -- MFC calls of a plan ----------------------------------------------------------

    def host(self, specs: list[Any], offload: list[str] | tuple[str, ...] = ()) -> None:
        """The roles (RoleSpecs) whose calls this worker may run (`run`); the frozen roles
        of `offload` keep their weights in host memory between calls (orchestrator.models.offload)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

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
        torch.manual_seed(first.seed)

    def _ranks(self, sharding: Sharding) -> tuple[int, int, bool]:
        """(dp index, dp size, whether this device is the first of its tp group)."""
        mesh, lay = sharding
        dp_i = next(d for dev, d, _, _ in lay.ranks(mesh) if dev == self.device)
        return dp_i, lay.dp, self._my_group(sharding, "tp")[0] == self.device

    def _context(self, rep: Replica, train: bool, generates: bool) -> Any:
        """The replica's WorkerContext for the MFC interfaces: its (tensor-parallel) model,
        a trainer over its data-parallel group for train calls, transformers' generate
        on the same model for generate calls."""
        from orchestrator.engines.generate import HFGenerateEngine
        from orchestrator.engines.train import TensorParallelTrainEngine, TrainEngine
        from orchestrator.interfaces.registry import WorkerContext

        spec = self.specs[rep.role]
        if rep.ctx is None:
            module = self._module(rep)
            module.requires_grad_(False)
            rep.ctx = WorkerContext(rep.role, module, self.tokenizer, self.task)
        ctx = rep.ctx
        if train and ctx.train is None:
            if spec.optim is None:
                raise ValueError(f"role '{rep.role}' has no optimizer: it cannot train")
            mesh, lay = rep.sharding
            dp = self._my_group(rep.sharding, "dp")
            ctx.module.requires_grad_(True)
            if lay.tp > 1:
                tp = self._my_group(rep.sharding, "tp")
                ctx.train = TensorParallelTrainEngine(ctx.module, spec.optim, self._group(dp),
                                                      self._group(tp), lay.dp)  # fmt: skip
            else:
                mpu = _DataParallelGroups(self._group(dp), self._group([self.device]))
                ctx.train = TrainEngine(ctx.module, spec.optim, mpu=mpu, dp=lay.dp)
            ctx.module = ctx.train.module
        if generates and ctx.generator is None:
            tok = self.tokenizer
            ctx.generator = HFGenerateEngine(ctx.module, tok.eos_token_id, tok.pad_token_id)
        return ctx

    def prepare(self, call: Any, sharding: Sharding) -> None:
        """Build what `call` needs under `sharding` (the model, a trainer, a generator)."""
        from algos.graph import CallKind

        key = (call.role, sharding_key(sharding))
        rep = self.replicas[key]
        self._context(rep, call.kind is CallKind.TRAIN, call.kind is CallKind.GENERATE)
        if rep.role in self.offload_roles and key not in self.parked:
            from orchestrator.models.offload import offload

            self.parked[key] = offload(self._module(rep))

    def merge_evaluation(self, *parts: Any) -> dict[str, float]:
        from orchestrator.runtime.roles import merge_evaluation

        return merge_evaluation(*parts)

    def run(
        self, call: Any, sharding: Sharding, options: Mapping[str, Any], *inputs: Any
    ) -> tuple[tuple[int, dict[str, torch.Tensor]] | None, dict[str, float]]:
        """This device's part of one MFC call under `sharding`: inference and generate
        calls on its data-parallel share of the rows, train calls on the whole batch
        (each rank trains on its share of every mini-batch). Returns ((dp index,
        outputs) from the first rank of each tp group, else None; metrics)."""
        from algos.graph import CallKind, check_outputs
        from orchestrator.interfaces.lookup import get_interface
        from orchestrator.models.batch import gather_inputs
        from orchestrator.runtime.roles import REALLOC_KEY

        self.produced.pop(call.name, None)
        options = dict(options)
        folded: dict[str, float] = {}
        if "reallocate" in options:  # this replica lags the trained one: refresh it first
            src, dpn = options.pop("reallocate")
            stats = self.reallocate(call.role, src, sharding, dpn)
            folded = {REALLOC_KEY + k: float(v) for k, v in stats.items()}
        local = options.pop("local_inputs", None)
        key = (call.role, sharding_key(sharding))
        rep = self.replicas[key]
        ctx = self._context(rep, call.kind is CallKind.TRAIN, call.kind is CallKind.GENERATE)
        merged = gather_inputs(inputs)
        dp_i, dp, first = self._ranks(sharding)
        options.update(inputs=call.inputs, outputs=call.outputs)
        if call.kind is CallKind.TRAIN:
            batch = {k: merged[k] for k in call.inputs}
            options.update(dp_rank=dp_i, dp_size=dp)
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
        wall, t0 = time.time(), time.perf_counter()
        moved = self._reload(key)
        start = time.perf_counter()
        try:
            outputs, metrics = get_interface(call.interface)(ctx, batch, options)
            metrics[f"time/{call.name}_s"] = time.perf_counter() - start
        finally:  # reload before, offload after (a failed call too); the span covers both
            if key in self.parked:
                from orchestrator.models.offload import offload

                self.parked[key] = offload(self._module(rep))
        if key in self.parked:
            metrics[f"time/offload_{call.name}_s"] = (
                time.perf_counter() - t0 - metrics[f"time/{call.name}_s"]
            )
            metrics[f"offload/{call.name}_bytes"] = float(moved)
        metrics[f"span/{call.name}/start"] = wall
        metrics[f"span/{call.name}/end"] = wall + time.perf_counter() - t0
        outputs = {k: v.cpu() for k, v in outputs.items()}
        check_outputs(call, outputs)
        if call.kind is not CallKind.TRAIN:  # consumers under this sharding read it here
            self.produced[call.name] = (options.get("step"), outputs)
        metrics.update(folded)
        return ((dp_i, outputs) if first else None), metrics

    def _reload(self, key: tuple[str, str]) -> int:
        """Bring an offloaded replica's weights back from host memory (its bytes; 0 if
        it was not offloaded)."""
        from orchestrator.models.offload import reload

        return reload(self.parked[key]) if key in self.parked else 0

    def evaluate(
        self, role: str, sharding: Sharding, prompts: list[str], params: Any
    ) -> tuple[int, list[float], list[float]] | None:
        """Correctness and reward of responses to this dp rank's share of `prompts`
        (np.array_split order); None from all but the first rank of each tp group."""
        import numpy as np

        from orchestrator.models.hf import decode_responses, encode_prompts

        rep = self.replicas[(role, sharding_key(sharding))]
        ctx = self._context(rep, train=False, generates=True)
        dp_i, dp, first = self._ranks(sharding)
        mine = [str(p) for p in np.array_split(np.array(prompts, dtype=object), dp)[dp_i]]
        if not mine:
            return (dp_i, [], []) if first else None
        ids, mask = encode_prompts(ctx.tokenizer, mine)
        gen = ctx.generator.generate(ids, mask, params)
        responses = decode_responses(ctx.tokenizer, gen.response_ids)
        correct = [float(self.task.correct(p, r)) for p, r in zip(mine, responses)]
        rewards = [float(self.task.reward(p, r)) for p, r in zip(mine, responses)]
        return (dp_i, correct, rewards) if first else None

    def write_model(self, role: str, sharding: Sharding, folder: str) -> list[str]:
        """Save a replica whose one device holds whole tensors (dp = tp = pp = 1) as a
        Hugging Face folder folder/<role>, with the tokenizer."""
        rep = self.replicas[(role, sharding_key(sharding))]
        if sharding[0].size != 1:
            raise ValueError(
                f"write_model needs a one-device replica, got {sharding_key(sharding)}"
            )
        model = build_model(rep.config, rep.kind)
        model.load_state_dict(self.shards(role, sharding))
        out = Path(folder) / role
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return [str(p) for p in out.rglob("*") if p.is_file()]

    def save_rank(self, role: str, sharding: Sharding, folder: str) -> str:
        """This rank's optimizer and scheduler state of a trained replica, as
        folder/<role>/optim/rank<device>.pt."""
        rep = self.replicas[(role, sharding_key(sharding))]
        if not rep.trains:
            raise ValueError(f"replica {role} under {sharding_key(sharding)} has not trained")
        out = Path(folder) / role / "optim"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.device}.pt"
        torch.save(rep.ctx.train.rank_state(), path)
        return str(path)

    def load_rank(self, role: str, sharding: Sharding, folder: str) -> None:
        """Restore a trained replica from a checkpoint folder: the weights (folder/<role>,
        this device's slices of them) and this rank's optimizer state."""
        from orchestrator.models.tensor_parallel import load_shards
        from orchestrator.workers.realloc import shard_state

        rep = self.replicas[(role, sharding_key(sharding))]
        ctx = self._context(rep, train=True, generates=False)
        model = load_full(str(Path(folder) / role), rep.kind)
        load_shards(ctx.module, shard_state(model.state_dict(), rep.shape, sharding, self.device))
        state = torch.load(Path(folder) / role / "optim" / f"rank{self.device}.pt",
                           weights_only=False)  # fmt: skip
        ctx.train.load_rank_state(state)


# ---------------------------------------------------------------------------- controller


class DeviceCluster:
    """The plan's devices as Ray actors: one STRICT_PACK placement group per node, one
    DeviceWorker per device slot, joined into one torch.distributed world with the
    groups of `shardings` (their tp and dp groups) created up front."""

    def __init__(
        self,
        num_nodes: int,
        devices_per_node: int,
        shardings: list[Sharding],
        resource: str = "relay_device",
        threads: int = 1,
        timeout_s: float = 120.0,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.devices_per_node = devices_per_node
        n = num_nodes * devices_per_node
        self.groups = [
            placement_group([{resource: 1}] * devices_per_node, strategy="STRICT_PACK")
            for _ in range(num_nodes)
        ]
        ready = [g.ready() for g in self.groups]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        if len(done) < len(ready):
            for g in self.groups:
                ray.util.remove_placement_group(g)
            raise RuntimeError(
                f"the Ray cluster could not place {num_nodes} node(s) of {devices_per_node} "
                f"'{resource}' slots each within {timeout_s:.0f} s; ray.cluster_resources() "
                f"= {ray.cluster_resources()}"
            )
        actor = ray.remote(DeviceWorker)
        self.workers = [
            actor.options(
                num_cpus=0,
                resources={resource: 1},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.groups[d // devices_per_node],
                    placement_group_bundle_index=d % devices_per_node,
                ),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
            ).remote(d, n, threads)
            for d in range(n)
        ]
        master = ray.get(self.workers[0].address.remote())
        groups = [[d] for d in range(n)]
        for sh in shardings:
            for kind in ("tp", "dp"):
                groups += [g for g in group_ranks(sh, kind) if g not in groups]
        ray.get([w.join.remote(master, groups) for w in self.workers])

    def node_ids(self) -> list[str]:
        import ray

        return ray.get([w.node_id.remote() for w in self.workers])

    def on(self, mesh: Mesh) -> list[Any]:
        return [self.workers[d] for d in mesh.devices]

    def load(self, role: str, folder: str, sharding: Sharding) -> None:
        import ray

        ray.get([w.load.remote(role, folder, sharding) for w in self.workers])

    def reallocate(self, role: str, src: Sharding, dst: Sharding) -> dict[str, int]:
        """Run a reallocation on every worker of both meshes; the byte counts summed."""
        import ray

        devices = sorted(set(src[0].devices) | set(dst[0].devices))
        stats = ray.get([self.workers[d].reallocate.remote(role, src, dst, self.devices_per_node)
                         for d in devices])  # fmt: skip
        return {k: sum(s[k] for s in stats) for k in ("sent", "received", "local")}

    def forward(
        self, role: str, sharding: Sharding, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The replica's logits for the whole batch, its dp ranks' shares in order."""
        import ray

        outs = ray.get([w.forward.remote(role, sharding, batch) for w in self.on(sharding[0])])
        return torch.cat([o for o in outs if o is not None])

    def train_step(self, role: str, sharding: Sharding, batch: dict[str, torch.Tensor],
                   lr: float, optimizer: str = "adamw") -> float:  # fmt: skip
        import ray

        losses = ray.get([w.train_step.remote(role, sharding, batch, lr, optimizer)
                          for w in self.on(sharding[0])])  # fmt: skip
        return losses[0]

    def shards(self, role: str, sharding: Sharding) -> list[dict[str, torch.Tensor]]:
        import ray

        return ray.get([w.shards.remote(role, sharding) for w in self.on(sharding[0])])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        for g in self.groups:
            ray.util.remove_placement_group(g)
