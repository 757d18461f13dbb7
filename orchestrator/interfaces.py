"""What each MFC interface does on the worker that hosts its role.

An interface is a function (ctx, batch, options) -> (outputs, metrics). The graph's MFC
names the interface; the worker looks it up here. Losses and advantages come from
algos/ (the math lives only there).

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from algos.losses import (
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
)
from algos.losses import policy_loss as ppo_policy_loss
from algos.losses import value_loss as ppo_value_loss
from algos.ppo import ppo_rollout_advantages
from algos.rewards import kl_estimate
from orchestrator.batch import (
    Batch,
    minibatches,
    response_logits,
    response_logprobs,
    response_values,
)
from orchestrator.engines import GenerationEngine, SamplingParams, TrainEngine

Metrics = dict[str, float]


@dataclass
class WorkerContext:
    """What a worker holds for its role: the module, engines, tokenizer and task."""

    role: str
    module: torch.nn.Module | None
    tokenizer: Any
    task: Any
    train: TrainEngine | None = None
    generator: GenerationEngine | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Interface = Callable[[WorkerContext, Batch, Mapping[str, Any]], tuple[Batch, Metrics]]
INTERFACES: dict[str, Interface] = {}


def interface(name: str) -> Callable[[Interface], Interface]:
    def register(fn: Interface) -> Interface:
        if name in INTERFACES:
            raise ValueError(f"interface '{name}' is registered twice")
        INTERFACES[name] = fn
        return fn

    return register


def get_interface(name: str) -> Interface:
    if name not in INTERFACES:
        raise KeyError(f"unknown interface '{name}'; registered: {sorted(INTERFACES)}")
    return INTERFACES[name]


def _module(ctx: WorkerContext) -> torch.nn.Module:
    if ctx.module is None:
        raise RuntimeError(f"role '{ctx.role}' holds no model")
    return ctx.module


@interface("generate")
def generate(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Sample responses, then score them with the same forward pass the trainer uses."""
    if ctx.generator is None:
        raise RuntimeError(f"role '{ctx.role}' has no generation engine")
    params: SamplingParams = options["sampling"]
    response_ids, response_mask = ctx.generator.generate(
        batch["prompt_ids"], batch["prompt_mask"], params
    )
    full = {**batch, "response_ids": response_ids, "response_mask": response_mask}
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        logprobs = response_logprobs(module, full, params.temperature)
    lengths = response_mask.sum(-1).float()
    has_eos = (response_ids == ctx.tokenizer.eos_token_id).any(-1).float()
    metrics = {
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/truncated_frac": float(1 - has_eos.mean()),
    }
    return {
        "response_ids": response_ids,
        "response_mask": response_mask,
        "logprobs": logprobs,
    }, metrics


@interface("logprobs")
def logprobs(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        lp = response_logprobs(module, batch, options.get("temperature", 1.0))
    return {options["output"]: lp}, {}


@interface("values")
def values(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        v = response_values(module, batch)
    return {"values": v}, {}


def decode_pairs(tokenizer: Any, batch: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    from orchestrator.modeling import decode_responses

    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    responses = decode_responses(tokenizer, batch["response_ids"])
    return [p.replace(" ", "") for p in prompts], responses


@interface("verifier_reward")
def verifier_reward(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """The task's verifier as the reward role: scores in [0, 1] and exact-match flags."""
    prompts, responses = decode_pairs(ctx.tokenizer, batch)
    device = batch["response_ids"].device
    pairs = list(zip(prompts, responses))
    scores = torch.tensor([ctx.task.reward(p, r) for p, r in pairs], device=device)
    correct = torch.tensor([float(ctx.task.correct(p, r)) for p, r in pairs], device=device)
    metrics = {
        "rollout/reward_mean": float(scores.mean()),
        "rollout/reward_min": float(scores.min()),
        "rollout/reward_max": float(scores.max()),
        "rollout/task_accuracy": float(correct.mean()),
    }
    return {"scores": scores.float(), "task_correct": correct.float()}, metrics


def _rollout_targets(
    batch: Batch, options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    a = options["algo"]
    values = batch.get("values")  # critic-free graphs have none
    n = int(options.get("samples_per_prompt", 1))
    b = batch["response_ids"].shape[0]
    group_ids = torch.arange(b // n, device=batch["response_ids"].device).repeat_interleave(n)
    return ppo_rollout_advantages(
        batch["logprobs"],
        batch["ref_logprobs"],
        values if values is not None else torch.zeros_like(batch["logprobs"]),
        batch["scores"],
        batch["response_mask"],
        kl_coef=0.0 if a.kl_in_loss else options["kl_coef"],  # KL as a loss term instead
        kl_estimator=a.kl_estimator,
        reward_clip=a.reward_clip,
        estimator=a.advantage_estimator,
        gamma=a.gamma,
        lam=a.lam,
        whiten=a.whiten_advantages,
        group_ids=group_ids,
    )


def _mean_metrics(rows: list[Metrics]) -> Metrics:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def _train_loop(
    ctx: WorkerContext,
    batch: Batch,
    options: Mapping[str, Any],
    epochs: int,
    loss_fn: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Metrics]],
    token_mean: bool,
) -> list[Metrics]:
    """Epochs over shuffled mini-batches, each accumulated over micro-batches.

    DeepSpeed averages the micro-batch losses of a mini-batch. A token-mean loss is
    rescaled by (micro tokens / mini tokens) x micro-batches, so the mini-batch's gradient
    is that of sum(l m) / sum(m) over the whole mini-batch, not a mean of micro means.
    """
    engine = ctx.train
    if engine is None:
        raise RuntimeError(f"role '{ctx.role}' is not trainable")
    engine.module.train()
    gen = torch.Generator().manual_seed(int(options["seed"]))
    rows: list[Metrics] = []
    for _ in range(epochs):
        for mini in minibatches(batch, engine.spec.mini_batch_samples, gen):
            mini_tokens = float(mini["response_mask"].sum().clamp(min=1))
            for micro in minibatches(mini, engine.spec.micro_batch_samples_per_device):
                loss, m = loss_fn(engine.module, micro)
                if token_mean and engine.gas > 1:
                    micro_tokens = float(micro["response_mask"].sum())
                    loss = loss * (micro_tokens / mini_tokens * engine.gas)
                engine.backward(loss)
                m.update({f"train/{k}_{ctx.role}": v for k, v in engine.step().items()})
                rows.append(m)
    return rows


@interface("ppo_actor_train")
def ppo_actor_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    a = options["algo"]
    advantages, _, rollout_metrics = _rollout_targets(batch, options)
    batch = {**batch, "advantages": advantages}

    def loss_fn(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        logits = response_logits(module, mb, options.get("temperature", 1.0))
        lp = logprobs_from_logits(logits, mb["response_ids"])
        loss, m = ppo_policy_loss(
            lp,
            mb["logprobs"],
            mb["advantages"],
            mask,
            clip_eps_low=a.clip_eps_low,
            clip_eps_high=a.clip_eps_high,
            dual_clip_c=a.dual_clip_c,
            loss_agg=a.loss_agg,
        )
        entropy = entropy_from_logits(logits)
        ent = aggregate_loss(entropy, mask, a.loss_agg)
        total = loss - a.entropy_coef * ent
        if a.kl_in_loss:  # coef * mean of k3(pi || ref) over the valid tokens
            kl_loss = aggregate_loss(kl_estimate(lp, mb["ref_logprobs"], "k3"), mask, a.loss_agg)
            total = total + options["kl_coef"] * kl_loss
            m["kl_loss"] = float(kl_loss.detach())
        return total, {
            "loss/policy": float(loss.detach()),
            "train/entropy": float(ent.detach()),
            **{f"train/{k}": float(v) for k, v in m.items()},
        }

    rows = _train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, a.loss_agg == "token-mean")
    metrics = _mean_metrics(rows)
    metrics.update(rollout_metrics)
    metrics["rollout/kl_coef"] = float(options["kl_coef"])
    return {}, metrics


@interface("ppo_critic_train")
def ppo_critic_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    a = options["algo"]
    _, returns, _ = _rollout_targets(batch, options)
    batch = {**batch, "returns": returns, "old_values": batch["values"]}
    ev = explained_variance(batch["values"], returns, batch["response_mask"].float())

    def loss_fn(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        v = response_values(module, mb)
        loss, m = ppo_value_loss(
            v,
            mb["old_values"],
            mb["returns"],
            mask,
            clip_eps=a.value_clip_eps,
            loss_agg=a.loss_agg,
        )
        return loss, {
            "loss/value": float(loss.detach()),
            **{f"train/{k}": float(x) for k, x in m.items()},
        }

    token_mean = a.loss_agg == "token-mean"
    metrics = _mean_metrics(_train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, token_mean))
    metrics["train/explained_variance"] = float(ev)
    return {}, metrics


@interface("sft_train")
def sft_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Negative log-likelihood of the demonstration's response tokens (token mean)."""

    def loss_fn(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        logits = response_logits(module, mb)
        lp = logprobs_from_logits(logits, mb["response_ids"])
        loss = -masked_mean(lp, mask)
        acc = masked_mean((logits.argmax(-1) == mb["response_ids"]).float(), mask)
        return loss, {"loss/sft": float(loss.detach()), "train/sft_token_accuracy": float(acc)}

    return {}, _mean_metrics(_train_loop(ctx, batch, options, 1, loss_fn, token_mean=True))
