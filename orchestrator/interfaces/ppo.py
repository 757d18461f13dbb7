"""The RL train interfaces: the actor's update (PPO, GRPO, RLOO, ReMax; KL loss, entropy,
PMOE head, reweighting) and the critic's, from the rollout's shared advantages.

Shape legend: B = sequences, T = response tokens, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from algos.losses import (
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    policy_loss_tokens,
    reinforce_loss_tokens,
)
from algos.losses import value_loss as ppo_value_loss
from algos.ppo import ppo_rollout_advantages
from algos.rewards import kl_estimate
from algos.reweight import (
    per_sample_token_mean,
)
from orchestrator.interfaces.common import (
    SliceWeights,
    mean_metrics,
    reweighting_of,
    train_loop,
)
from orchestrator.interfaces.registry import Metrics, WorkerContext, interface
from orchestrator.models.batch import (
    Batch,
    full_sequence,
    response_logits,
    response_values,
)


def _rollout_targets(
    batch: Batch, options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    a = options["algo"]
    values = batch.get("values")  # critic-free graphs have none
    n = int(options.get("samples_per_prompt", 1))
    b = batch["response_ids"].shape[0]
    group_ids = torch.arange(b // n, device=batch["response_ids"].device).repeat_interleave(n)
    baseline = batch.get("baseline_scores")  # ReMax: one greedy reward per distinct prompt
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
        baseline_scores=baseline.repeat_interleave(n) if baseline is not None else None,
    )


def _policy_difficulty(batch: Batch, advantages: torch.Tensor, proxy: str) -> torch.Tensor:
    """A per-sample difficulty [B], fixed once per rollout: the response's mean negative
    log-likelihood under the behaviour policy (nll) or its mean |advantage|."""
    mask = batch["response_mask"].float()
    if proxy == "nll":
        return per_sample_token_mean(-batch["logprobs"], mask)[0]
    return per_sample_token_mean(advantages.abs(), mask)[0]


@dataclass
class PolicyForward:
    """The actor's view of a micro-batch: log-probs of the taken tokens and the
    distribution they come from, plus any auxiliary loss of the policy head."""

    logprobs: torch.Tensor  # [B, T]
    logits: torch.Tensor  # [B, T, V] (normalised log-probs for a mixture)
    aux_loss: torch.Tensor | float = 0.0
    metrics: Metrics = field(default_factory=dict)


def policy_forward(
    module: torch.nn.Module, mb: Batch, options: Mapping[str, Any], q_targets: torch.Tensor
) -> PolicyForward:
    """A plain policy's forward, or a PMOE policy's: mixture log-probs (router detached;
    with best_expert_only the gradient reaches only each token's best expert, picked by
    the expected Q under each expert), plus the router's regression on the best expert
    and the Q head's regression on `q_targets` [B, T] (the returns)."""
    pol = options.get("policy")
    if pol is None or pol.kind == "plain" or pol.num_experts == 1:
        logits = response_logits(module, mb, options.get("temperature", 1.0))
        return PolicyForward(logprobs_from_logits(logits, mb["response_ids"]), logits)
    from algos.pmoe import (
        best_expert_from_q,
        best_only_mixture_log_probs,
        mixture_log_probs,
        q_loss,
        router_loss,
    )

    ids, attn, pos = full_sequence(mb)
    p, t = mb["prompt_ids"].shape[1], mb["response_ids"].shape[1]
    out = module.pmoe_outputs(ids, attn, pos)
    cut = slice(p - 1, p + t - 1)
    elp, log_router = out.expert_log_probs[:, cut], out.log_router[:, cut]
    router_probs, q = out.router_probs[:, cut], out.q_values[:, cut]
    mask = mb["response_mask"].float()
    best = best_expert_from_q(elp.detach(), q.detach())
    if pol.best_expert_only:
        mix = best_only_mixture_log_probs(elp, log_router, best)
    else:
        mix = mixture_log_probs(elp, log_router.detach())
    r_loss = router_loss(router_probs, best, mask)
    qv_loss = q_loss(q, mb["response_ids"], q_targets, mask)
    usage = torch.bincount(best[mask.bool()].flatten(), minlength=module.num_experts).float()
    return PolicyForward(
        logprobs_from_logits(mix, mb["response_ids"]),
        mix,
        pol.router_coef * r_loss + pol.q_coef * qv_loss,
        {
            "train/router_loss": float(r_loss.detach()),
            "train/q_loss": float(qv_loss.detach()),
            "train/best_expert_share_max": float(usage.max() / usage.sum().clamp(min=1)),
        },
    )


@interface("ppo_actor_train")
def ppo_actor_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """The actor's update: clipped PPO ratio loss (PPO, GRPO, RLOO) or REINFORCE (ReMax),
    with optional KL loss, entropy bonus, PMOE head and difficulty-based reweighting."""
    a = options["algo"]
    advantages, returns, rollout_metrics = _rollout_targets(batch, options)
    batch = {**batch, "advantages": advantages, "returns": returns}
    reweighting = None
    proxy = options["reweight"].policy_proxy if options.get("reweight") else "none"
    if proxy != "none":
        batch["difficulty"] = _policy_difficulty(batch, advantages, proxy)
        reweighting = reweighting_of(options, lambda module, mini: mini["difficulty"])

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        fwd = policy_forward(module, mb, options, mb["returns"])
        lp = fwd.logprobs
        if a.policy_loss == "reinforce":
            loss_mat = reinforce_loss_tokens(lp, mb["advantages"])
            m = {
                "approx_kl": float(masked_mean((mb["logprobs"] - lp).detach(), mask)),
                "return_mean": float(masked_mean(mb["advantages"], mask)),
            }
        else:
            loss_mat, m = policy_loss_tokens(
                lp,
                mb["logprobs"],
                mb["advantages"],
                mask,
                clip_eps_low=a.clip_eps_low,
                clip_eps_high=a.clip_eps_high,
                dual_clip_c=a.dual_clip_c,
            )
        if w is None:
            loss = aggregate_loss(loss_mat, mask, a.loss_agg)
        else:
            loss = w.loss(*per_sample_token_mean(loss_mat, mask))
        ent = aggregate_loss(entropy_from_logits(fwd.logits), mask, a.loss_agg)
        total = loss - a.entropy_coef * ent + fwd.aux_loss
        if a.kl_in_loss:  # coef * mean of k3(pi || ref) over the valid tokens
            kl_loss = aggregate_loss(kl_estimate(lp, mb["ref_logprobs"], "k3"), mask, a.loss_agg)
            total = total + options["kl_coef"] * kl_loss
            m["kl_loss"] = float(kl_loss.detach())
        return total, {
            "loss/policy": float(loss.detach()),
            "train/entropy": float(ent.detach()),
            **{f"train/{k}": float(v) for k, v in m.items()},
            **fwd.metrics,
        }

    token_mean = a.loss_agg == "token-mean"
    rows = train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, token_mean, reweighting)
    metrics = mean_metrics(rows)
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

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
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
    metrics = mean_metrics(train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, token_mean))
    metrics["train/explained_variance"] = float(ev)
    return {}, metrics
