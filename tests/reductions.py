"""Whole-batch losses for the tests: the runtime's token losses (algos.losses) reduced over
the valid tokens, as the train interfaces reduce them per micro-batch."""

from __future__ import annotations

import torch

from algos.losses import aggregate_loss, masked_mean, policy_loss_tokens, reinforce_loss_tokens


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped (and dual-clipped) PPO policy loss: `policy_loss_tokens` reduced with
    `aggregate_loss(L, mask, loss_agg)`. logp, old_logp, advantages, mask: [B, T].
    Returns (loss 0-d, metrics as in `policy_loss_tokens`)."""
    loss, metrics = policy_loss_tokens(
        logp, old_logp, advantages, mask, clip_eps_low, clip_eps_high, dual_clip_c
    )
    return aggregate_loss(loss, mask.to(torch.float32), loss_agg), metrics


def reinforce_loss(
    logp: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE loss -G * logp reduced over valid tokens (ReMax's loss: one epoch, no
    ratio, no clipping).

    logp, returns (G, no gradient), mask: [B, T]. Returns (loss 0-d, metrics):
    L = aggregate(-G * logp); metrics: return_mean (python float, token mean of G)."""
    m = mask.to(torch.float32)
    return aggregate_loss(reinforce_loss_tokens(logp, returns), m, loss_agg), {
        "return_mean": float(masked_mean(returns, m))
    }
