"""Train engines: DeepSpeed (ZeRO stage 0-3 from the config) over a call's data-parallel
group, and the trainer of tensor-parallel replicas (torch's AdamW on DTensor shards).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    zero_stage: int
    mini_batch_samples: int
    micro_batch_samples_per_device: int
    decay_steps: int = 0  # optimizer steps of cosine decay after warm-up (0: constant lr)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    micro_batch_tokens: int = 0  # > 0: micro-batches by a token budget, not a sample count


def lr_factor(step: int, spec: OptimSpec) -> float:
    """The learning rate's multiplier before optimizer step `step` (0-based): a linear
    warm-up whose first step already has lr / warmup_steps (DeepSpeed's WarmupLR spends
    its first steps at lr 0), then constant, or a cosine from 1 to min_lr_ratio over
    decay_steps steps (and min_lr_ratio after them)."""
    warmup = max(spec.warmup_steps, 1)
    if step < warmup:
        return (step + 1) / warmup
    if spec.decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step + 1 - warmup) / spec.decay_steps)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_per_rank(spec: OptimSpec, dp: int) -> int:
    """Samples per micro-batch on each of `dp` data-parallel ranks: the configured
    micro-batch, capped by the rank's share of a mini-batch."""
    if spec.mini_batch_samples % dp:
        raise ValueError(
            f"train.mini_batch_samples = {spec.mini_batch_samples} does not split over "
            f"dp = {dp} data-parallel ranks; use a multiple of {dp}"
        )
    share = spec.mini_batch_samples // dp
    micro = min(spec.micro_batch_samples_per_device, share)
    while share % micro:
        micro -= 1
    return micro


class TrainEngine:
    """A DeepSpeed engine around one trainable module: micro-batched steps, checkpoints."""

    def __init__(self, module: torch.nn.Module, spec: OptimSpec, mpu: Any, dp: int = 1) -> None:
        """`mpu` (with `dp` ranks): the data-parallel group of the call's layout
        (orchestrator.workers.groups.DataParallelGroups), in an initialised world."""
        import deepspeed

        self.spec = spec
        self.dp = dp
        micro = micro_per_rank(spec, dp)
        gas = spec.mini_batch_samples // (micro * dp)
        config = {
            "train_batch_size": spec.mini_batch_samples,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas,
            "gradient_clipping": spec.grad_clip,
            "zero_optimization": {"stage": spec.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.999)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, spec=spec)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=mpu
        )
        self.gas = gas
        self.version = 0  # optimizer steps taken or checkpoints loaded: the weights changed

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def set_boundary(self, last: bool) -> None:
        """Micro-batches of a token budget vary in number: the caller says which is the
        mini-batch's last (its gradients are reduced and the optimizer steps)."""
        self.engine.set_gradient_accumulation_boundary(last)

    def step(self) -> dict[str, float]:
        """Call after every micro-batch; the optimizer steps at the accumulation boundary."""
        metrics: dict[str, float] = {}
        if self.engine.is_gradient_accumulation_boundary():
            if self.spec.zero_stage == 0:
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
                metrics["grad_norm"] = float(norm)
            self.engine.step()
            if self.spec.zero_stage > 0:
                gn = self.engine.get_global_grad_norm()
                if gn is not None:
                    metrics["grad_norm"] = float(gn)
            metrics["lr"] = float(self.engine.get_lr()[0])
            self.version += 1
        else:
            self.engine.step()
        return metrics

    def gathered(self) -> Any:
        """A context in which the module's parameters hold their full values (gathered
        over the data-parallel group under ZeRO-3, a collective every rank enters; a no-op
        otherwise)."""
        if self.spec.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()),
                                                 modifier_rank=None)  # fmt: skip

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's full weights (gathered under ZeRO-3), copied to CPU."""
        with self.gathered():
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """The module's weights by state-dict name, without a copy where they are whole
        (ZeRO 0-2); gathered copies under ZeRO-3."""
        if self.spec.zero_stage == 3:
            return list(self.full_state_dict().items())
        return [(k, v.detach()) for k, v in self.module.state_dict().items()]

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the module's weights with full tensors (every rank of the group the
        same values; under ZeRO-3 a collective), and the optimizer's fp32 copies with them."""
        params = dict(self.module.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise KeyError(f"load_weights: no value for {missing[:3]}")
        if self.spec.zero_stage == 3:
            import deepspeed

            context: Any = deepspeed.zero.GatheredParameters(list(params.values()),
                                                             modifier_rank=0)  # fmt: skip
        else:
            context = contextlib.nullcontext()
        with context, torch.no_grad():
            for name, p in params.items():
                p.data.copy_(state[name].to(p.device, p.dtype))
        if self.spec.zero_stage > 0:
            self.optimizer.refresh_fp32_params()
        self.version += 1

    @contextlib.contextmanager
    def _base_optimizer(self) -> Any:
        """The torch optimizer over this rank's fp32 partition (ZeRO) or the module's
        parameters; under ZeRO-3 with its parameter groups filled, which DeepSpeed empties
        between steps."""
        if self.spec.zero_stage == 0:
            yield self.optimizer
        elif self.spec.zero_stage < 3:
            yield self.optimizer.optimizer
        else:
            self.optimizer._set_fp32_optimizer_param_groups()
            try:
                yield self.optimizer.optimizer
            finally:
                self.optimizer._clear_fp32_optimizer_param_groups()

    def rank_state(self) -> dict[str, Any]:
        """This rank's optimizer state (its ZeRO partition's moments) and scheduler state,
        written by each rank of a call's group on its own (DeepSpeed's save_checkpoint waits
        on a barrier of the whole world, which a plan's meshes do not span). The fp32
        master weights are not in it: in float32 training they equal the weights, which
        `load_weights` restores."""
        with self._base_optimizer() as base:
            # copies: state_dict() holds the live tensors, which later steps change in place
            return copy.deepcopy({"optimizer": base.state_dict(),
                                  "scheduler": self.scheduler.state_dict(),
                                  "version": self.version})  # fmt: skip

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore `rank_state()` of the same rank under the same layout, after
        `load_weights` has put the weights in place."""
        with self._base_optimizer() as base:
            base.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"] + 1


class TensorParallelTrainEngine:
    """The trainer of a tensor-parallel replica (tp > 1), with TrainEngine's interface:
    torch's AdamW on this rank's shards (DTensor parameters, which DeepSpeed's ZeRO cannot
    flatten), gradients accumulated over micro-batches and averaged over the data-parallel
    group, clipped by the norm of the whole model's gradient."""

    def __init__(
        self, module: torch.nn.Module, spec: OptimSpec, dp_group: Any, tp_group: Any, dp: int
    ) -> None:
        self.module, self.spec, self.dp = module, spec, dp
        self.dp_group, self.tp_group = dp_group, tp_group
        self.gas = spec.mini_batch_samples // (micro_per_rank(spec, dp) * dp)
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, spec=spec)
        )
        self.micro_steps = 0
        self.boundary: bool | None = None  # set_boundary: token-budget micro-batches
        self.version = 0

    def gathered(self) -> Any:
        """The shards are this rank's whole share already: nothing to gather."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()  # as DeepSpeed: the mini-batch's mean of micro losses

    def set_boundary(self, last: bool) -> None:
        self.boundary = last

    def is_gradient_accumulation_boundary(self) -> bool:
        if self.boundary is not None:
            return self.boundary
        return (self.micro_steps + 1) % self.gas == 0

    def _grad_norm(self) -> torch.Tensor:
        """The norm of the whole model's gradient: sharded pieces summed over the tp group,
        replicated ones (norms, a value head, and the embedding's gradient, which DTensor
        hands back whole) counted once."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        device = next(self.module.parameters()).device  # NCCL reduces tensors on the GPU
        sharded = torch.zeros((), device=device)
        replicated = torch.zeros((), device=device)
        for p in self.module.parameters():
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor) and any(isinstance(pl, Shard) for pl in g.placements):
                sharded += g.to_local().float().pow(2).sum()
            else:
                local = g.to_local() if isinstance(g, DTensor) else g
                replicated += local.float().pow(2).sum()
        dist.all_reduce(sharded, group=self.tp_group)
        return (sharded + replicated).sqrt()

    def step(self) -> dict[str, float]:
        """Call after every micro-batch; the optimizer steps at the accumulation boundary."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return {}
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if self.dp > 1:
            for g in local:
                dist.all_reduce(g, group=self.dp_group)
                g.div_(self.dp)
        norm = self._grad_norm()
        if self.spec.grad_clip > 0:
            coef = self.spec.grad_clip / (float(norm) + 1e-6)
            if coef < 1:
                for g in local:
                    g.mul_(coef)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {"grad_norm": float(norm), "lr": float(self.scheduler.get_last_lr()[0])}

    def rank_state(self) -> dict[str, Any]:
        """This rank's optimizer state (its shards' moments, as plain tensors) and the
        scheduler's."""
        from torch.distributed.tensor import DTensor

        opt = self.optimizer.state_dict()
        opt["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v
                            for k, v in st.items()} for i, st in opt["state"].items()}  # fmt: skip
        # copies: state_dict() holds the live tensors, which later steps change in place
        return copy.deepcopy({"optimizer": opt, "scheduler": self.scheduler.state_dict(),
                              "version": self.version})  # fmt: skip

    def load_rank_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor

        self.optimizer.load_state_dict(state["optimizer"])
        for p in self.module.parameters():  # the moments of sharded weights are sharded
            st = self.optimizer.state.get(p, {})
            if isinstance(p, DTensor):
                for k, v in st.items():
                    if not isinstance(v, DTensor) and v.dim() > 0:
                        st[k] = DTensor.from_local(v, p.device_mesh, p.placements,
                                                   run_check=False)  # fmt: skip
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"] + 1
