"""Masked reductions and the PPO family's losses, as pure functions.

Shape legend: B = sequences in the batch, T = response tokens, V = vocabulary size.
`mask` is [B, T], 1 (or True) on valid response tokens; padded tokens never contribute.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over valid entries (all entries if dim is None)."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))  # NaN/inf in padding stays out
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over valid entries; an all-padding reduction gives 0."""
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of x over all valid entries (population variance unless unbiased)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    ss = masked_sum((torch.where(mask.bool(), x, mean) - mean) ** 2, m)
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return ss / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over valid entries; zeros on padding.

    With shift_mean=False the mean is added back (scale only)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean: sum(l*m) / sum(m); seq-mean-token-mean: mean over sequences (with at least
    one valid token) of each sequence's token mean; seq-mean-token-sum: mean over
    sequences (with at least one valid token) of each sequence's token sum."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, m)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(loss_mat, m, dim=-1) / m.sum(-1).clamp(min=1)
        has = (m.sum(-1) > 0).to(loss_mat.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        has = (m.sum(-1) > 0).to(loss_mat.dtype)
        return (masked_sum(loss_mat, m, dim=-1) * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation '{mode}'; valid modes: {list(LOSS_AGG_MODES)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] of softmax(logits [B, T, V]): logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs [B, T] of tokens [B, T] under logits [B, T, V] (computed in fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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
    """Clipped (and dual-clipped) PPO policy loss.

    logp, old_logp, advantages, mask: [B, T].
    rho = exp(clamp(logp - old_logp, -20, 20)); L = -min(rho*A, clip(rho, 1-el, 1+eh)*A);
    where A < 0, L = min(L, -c*A). Returns (scalar loss, metrics): clip_frac (share of
    valid tokens where the clipped objective was the smaller one), approx_kl (mean of
    old_logp - logp), dual_clip_frac."""
    m = mask.to(torch.float32)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    unclipped = rho * advantages
    clipped = torch.clamp(rho, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_frac = masked_mean((clipped < unclipped).float(), m)
    dual_frac = torch.zeros(())
    if dual_clip_c is not None:
        dual = torch.minimum(loss, -dual_clip_c * advantages)
        use_dual = (advantages < 0) & (dual < loss)
        loss = torch.where(advantages < 0, dual, loss)
        dual_frac = masked_mean(use_dual.float(), m)
    metrics = {
        "clip_frac": float(clip_frac),
        "approx_kl": float(masked_mean((old_logp - logp).detach(), m)),
        "dual_clip_frac": float(dual_frac),
    }
    return aggregate_loss(loss, m, loss_agg), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2).

    values, old_values, returns, mask: [B, T]. metrics: value_clip_frac (share of valid
    tokens where the clipped term was the larger one)."""
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
    """1 - Var(R - V) / (Var(R) + 1e-5) over valid tokens ([B, T] inputs)."""
    m = mask.to(torch.float32)
    return float(1.0 - masked_var(returns - values, m) / (masked_var(returns, m) + 1e-5))
