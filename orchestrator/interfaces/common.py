"""What the interfaces share: canonical input names, output naming, and the training loop
(epochs of shuffled mini-batches, micro-batch accumulation over data-parallel ranks,
loss-based sample reweighting). Losses and advantages come from algos/.

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from algos.reweight import (
    in_warmup,
    sample_weights,
    weighted_token_loss,
)
from orchestrator.engines.train import (
    micro_per_rank,
)
from orchestrator.interfaces.registry import Metrics, WorkerContext
from orchestrator.models.batch import (
    Batch,
    minibatches,
    token_micro_batches,
    trim_padding,
)


def canonical(batch: Batch, options: Mapping[str, Any], names: tuple[str, ...]) -> Batch:
    """The call's inputs under canonical names, by position: a call may read, say,
    (unique_prompt_ids, unique_prompt_mask, greedy_response_ids, greedy_response_mask)
    where the interface reads (prompt_ids, prompt_mask, response_ids, response_mask)."""
    inputs = tuple(options.get("inputs", names))
    return {name: batch[key] for name, key in zip(names, inputs)}


def outputs_as(options: Mapping[str, Any], values: list[torch.Tensor]) -> Batch:
    """Name an interface's outputs after the call's declared output keys, in order."""
    return dict(zip(options["outputs"], values))


def module_of(ctx: WorkerContext) -> torch.nn.Module:
    if ctx.module is None:
        raise RuntimeError(f"role '{ctx.role}' holds no model")
    return ctx.module


def mean_metrics(rows: list[Metrics]) -> Metrics:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


@dataclass(frozen=True)
class Reweighting:
    """Loss-based sample reweighting of one train call (Sow et al. 2025): per mini-batch,
    weights from each sample's detached difficulty (`difficulty(module, mini)` -> [N])."""

    strategy: str
    temperature: float
    warmup_steps: int
    difficulty: Callable[[torch.nn.Module, Batch], torch.Tensor]

    def weights(self, module: torch.nn.Module, mini: Batch, step: int) -> torch.Tensor | None:
        """Weights [N] summing to 1, or None where the plain loss applies (uniform)."""
        if self.strategy == "uniform" or in_warmup(step, self.warmup_steps):
            return None
        with torch.no_grad():
            losses = self.difficulty(module, mini).float()
        return sample_weights(losses, self.strategy, self.temperature)


def reweighting_of(
    options: Mapping[str, Any], difficulty: Callable[[torch.nn.Module, Batch], torch.Tensor]
) -> Reweighting | None:
    rw = options.get("reweight")
    if rw is None:
        return None
    return Reweighting(rw.strategy, rw.temperature, rw.warmup_steps, difficulty)


@dataclass(frozen=True)
class SliceWeights:
    """A micro-batch's slice of its mini-batch's sample weights, with the mini-batch's
    totals, so that the micro-batches' weighted losses add up to the mini-batch's."""

    weights: torch.Tensor  # [n] this slice's weights (the mini-batch's sum to 1)
    total_tokens: float  # valid tokens (or samples, for a per-sample loss) of the mini-batch
    num_samples: int  # N, samples in the mini-batch

    def loss(self, per_sample: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """N sum_i w_i (n_i / total) l_i over this slice (per_sample l_i, counts n_i: [n])."""
        return weighted_token_loss(
            per_sample, counts, self.weights, self.total_tokens, self.num_samples
        )


LossFn = Callable[[torch.nn.Module, Batch, "SliceWeights | None"], tuple[torch.Tensor, Metrics]]


def train_loop(
    ctx: WorkerContext,
    batch: Batch,
    options: Mapping[str, Any],
    epochs: int,
    loss_fn: LossFn,
    token_mean: bool,
    reweighting: Reweighting | None = None,
) -> list[Metrics]:
    """Epochs over shuffled mini-batches, each accumulated over micro-batches.

    DeepSpeed averages the micro-batch losses of a mini-batch (and the gradients of its
    data-parallel ranks). A token-mean loss is rescaled by (micro tokens / mini tokens) x
    micro-batches x dp ranks, so the mini-batch's gradient is that of sum(l m) / sum(m)
    over the whole mini-batch, not a mean of micro means. With reweighting, loss_fn gets
    each micro-batch's slice of the mini-batch's weights and returns its share of the
    mini-batch's weighted loss (scaled by micro-batches x dp ranks).

    With a token budget (OptimSpec.micro_batch_tokens), a rank's share of a mini-batch is
    packed into micro-batches of similar lengths (token_micro_batches), their all-padding
    columns cut, the last one marked as the accumulation boundary; every loss is then
    rescaled by its share of the mini-batch's tokens (or samples), so the gradient is
    the one fixed micro-batches give.
    """
    engine = ctx.train
    if engine is None:
        raise RuntimeError(f"role '{ctx.role}' is not trainable")
    engine.module.train()
    gen = torch.Generator().manual_seed(int(options["seed"]))
    step = int(options.get("step", 0))
    # a planned call's data-parallel rank: every rank sees the whole batch (so advantages,
    # mini-batches and sample weights are those of the whole batch) and trains on its
    # share of each mini-batch; DeepSpeed averages the ranks' gradients
    dp_rank, dp = int(options.get("dp_rank", 0)), int(options.get("dp_size", 1))
    micro_size = micro_per_rank(engine.spec, dp)
    budget = engine.spec.micro_batch_tokens
    rows: list[Metrics] = []
    for _ in range(epochs):
        for mini in minibatches(batch, engine.spec.mini_batch_samples, gen):
            weights = reweighting.weights(engine.module, mini, step) if reweighting else None
            n = next(iter(mini.values())).shape[0]
            by_tokens = budget > 0 and "prompt_mask" in mini and "response_mask" in mini
            if by_tokens:
                micros = token_micro_batches(mini, dp, dp_rank, budget)
            else:
                micros = list(torch.arange(n).chunk(dp)[dp_rank].split(micro_size))
            mini_tokens = float(mini["response_mask"].sum().clamp(min=1)) if token_mean else n
            for j, micro_index in enumerate(micros):
                micro = {k: v[micro_index.to(v.device)] for k, v in mini.items()}
                if by_tokens:
                    micro = trim_padding(micro)
                    engine.set_boundary(j == len(micros) - 1)
                w = None
                if weights is not None:
                    w = SliceWeights(weights[micro_index.to(weights.device)], mini_tokens, n)
                loss, m = loss_fn(engine.module, micro, w)
                if w is not None:
                    loss = loss * (engine.gas * dp)
                elif token_mean and (engine.gas > 1 or dp > 1 or by_tokens):
                    micro_tokens = float(micro["response_mask"].sum())
                    loss = loss * (micro_tokens / mini_tokens * engine.gas * dp)
                elif by_tokens:  # a mean over samples: this micro-batch's share of them
                    loss = loss * (len(micro_index) / n * engine.gas * dp)
                if weights is not None:
                    m["train/sample_weight_max"] = float(weights.max()) * n
                engine.backward(loss)
                m.update({f"train/{k}_{ctx.role}": v for k, v in engine.step().items()})
                rows.append(m)
    return rows
