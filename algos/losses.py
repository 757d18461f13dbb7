"""Masked reductions and the PPO family's losses, as pure functions.

Shape legend: B = sequences in the batch, T = response tokens, V = vocabulary size.
`mask` is [B, T], float or bool, 1 (True) on valid response tokens. Padded tokens never
contribute to a result or a gradient, even when they hold NaN or inf.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over valid entries.

    x, mask: same shape (usually [B, T]). dim=None sums everything (0-d result);
    dim=-1 gives one sum per sequence ([B])."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))  # NaN/inf in padding stays out
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over valid entries; a reduction with no valid entry gives 0.

    x, mask: same shape (usually [B, T]); dim as in `masked_sum`."""
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance (0-d) of x over all valid entries: population variance unless `unbiased`.

    x, mask: same shape (usually [B, T])."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    ss = masked_sum((torch.where(mask.bool(), x, mean) - mean) ** 2, m)
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return ss / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and population var over valid entries.

    x, mask: [B, T]; returns [B, T] with zeros on padding. With shift_mean=False the mean
    is added back (the result is only rescaled)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss loss_mat [B, T] to a scalar (0-d).

    token-mean: sum(l*m) / sum(m).
    seq-mean-token-mean: mean over sequences of sum_t(l*m) / sum_t(m).
    seq-mean-token-sum: mean over sequences of sum_t(l*m).
    Both seq-mean modes average over the sequences with at least one valid token, so an
    all-padding row does not dilute the loss. An unknown mode raises ValueError."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, m)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation '{mode}'; valid modes: {list(LOSS_AGG_MODES)}")
    tokens = m.sum(-1)  # [B]
    per_seq = masked_sum(loss_mat, m, dim=-1)  # [B] token sums
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / tokens.clamp(min=1)
    return masked_mean(per_seq, tokens > 0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] (fp32) of softmax(logits [B, T, V]): logsumexp(z) - sum(softmax(z) * z)."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs [B, T] (fp32) of tokens [B, T] (long) under logits [B, T, V].

    Computed as z[token] - logsumexp(z) in fp32, which is log_softmax(z)[token] without
    keeping a second [B, T, V] tensor of log-probabilities."""
    z = logits.float()
    taken = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return taken - torch.logsumexp(z, dim=-1)


def policy_loss_tokens(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped (and dual-clipped) PPO policy loss L [B, T], before reduction.

    logp, old_logp, advantages, mask: [B, T]. Returns (L [B, T], metrics).
    rho = exp(clamp(logp - old_logp, -20, 20));
    L = -min(rho*A, clip(rho, 1 - eps_low, 1 + eps_high)*A); where A < 0 and dual_clip_c
    is set, L = min(L, -c*A). metrics (python floats, over valid tokens): clip_frac (share
    where the clipped objective was strictly smaller than the unclipped one), approx_kl
    (mean of old_logp - logp), dual_clip_frac (share where the dual clip bound was taken),
    ratio_mean (mean of rho: the importance weight of samples drawn from an older policy,
    which the clip bounds)."""
    m = mask.to(torch.float32)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    unclipped = rho * advantages
    clipped = torch.clamp(rho, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_frac = masked_mean((clipped < unclipped).float(), m)
    dual_frac = torch.zeros(())
    if dual_clip_c is not None:
        negative = advantages < 0
        dual = torch.minimum(loss, -dual_clip_c * advantages)
        dual_frac = masked_mean((negative & (dual < loss)).float(), m)
        loss = torch.where(negative, dual, loss)
    metrics = {
        "clip_frac": float(clip_frac),
        "approx_kl": float(masked_mean((old_logp - logp).detach(), m)),
        "dual_clip_frac": float(dual_frac),
        "ratio_mean": float(masked_mean(rho.detach(), m)),
    }
    return loss, metrics


def reinforce_loss_tokens(logp: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """Per-token REINFORCE loss -G * logp [B, T] (G = returns [B, T], detached)."""
    return -returns.detach() * logp


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).

    values, old_values, returns, mask: [B, T]. Returns (loss 0-d, metrics). clip_eps=None
    gives the plain 0.5 * (V - R)^2. metrics: value_clip_frac (python float, share of
    valid tokens where the clipped term was strictly the larger one)."""
    m = mask.to(torch.float32)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * unclipped
        frac = torch.zeros(())
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clip - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        frac = masked_mean((clipped > unclipped).float(), m)
    return aggregate_loss(loss, m, loss_agg), {"value_clip_frac": float(frac)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / (Var(R) + 1e-5) over valid tokens (population variances).

    values, returns, mask: [B, T]. 1 means the critic predicts the returns exactly; 0 or
    less means it explains nothing."""
    m = mask.to(torch.float32)
    return float(1.0 - masked_var(returns - values, m) / (masked_var(returns, m) + 1e-5))


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) [B] and the margin
    r_chosen - r_rejected [B], of the reward model's scores chosen_scores, rejected_scores
    [B] (logsigmoid is stable for large margins of either sign)."""
    margin = chosen_scores - rejected_scores
    return -torch.nn.functional.logsigmoid(margin), margin
