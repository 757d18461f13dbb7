"""Loss-based sample reweighting (Sow et al., ICLR 2025, arXiv 2502.06733), as pure
functions. Shape legend: N = samples in the global (mini-)batch, B = samples of a slice,
T = tokens per sample.
"""

from __future__ import annotations

import torch

REWEIGHT_STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def normalise_losses(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """x [N] = delta (2 l - l_max - l_min) / max(l_max - l_min, 1e-6) of losses [N]
    (detached), in [-delta, delta]."""
    lo = losses.detach()
    lmax, lmin = lo.max(), lo.min()
    return delta * (2 * lo - lmax - lmin) / torch.clamp(lmax - lmin, min=1e-6)


def strategy_scores(x: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """f [N] of normalised losses x [N]: linupper min(x + delta, delta), quadratic
    1 - x^2 / delta^2, extremes |x|, uniform 0 (a constant)."""
    if strategy == "linupper":
        return torch.clamp(x + delta, max=delta)
    if strategy == "quadratic":
        return 1 - x * x / (delta * delta)
    if strategy == "extremes":
        return x.abs()
    if strategy == "uniform":
        return torch.zeros_like(x)
    raise ValueError(
        f"unknown reweighting strategy '{strategy}'; valid: {list(REWEIGHT_STRATEGIES)}"
    )


def sample_weights(
    losses: torch.Tensor, strategy: str, temperature: float, delta: float = 1.0
) -> torch.Tensor:
    """Weights w [N] (detached, summing to 1) = softmax((f - max f) / r) of losses [N];
    uniform gives exactly 1/N each."""
    if temperature <= 0:
        raise ValueError(f"reweighting temperature = {temperature}: must be > 0")
    if losses.numel() == 0:
        raise ValueError("sample_weights: no samples")
    if torch.isnan(losses).any():
        raise ValueError("sample_weights: a per-sample loss is NaN")
    n = losses.shape[0]
    if strategy == "uniform":
        return torch.full((n,), 1.0 / n, dtype=losses.dtype, device=losses.device)
    f = strategy_scores(normalise_losses(losses, delta), strategy, delta)
    return torch.softmax((f - f.max()) / temperature, dim=0).detach()


def weighted_token_loss(
    per_sample_loss: torch.Tensor,
    token_counts: torch.Tensor,
    weights: torch.Tensor,
    total_tokens: float | torch.Tensor,
    num_samples: int,
) -> torch.Tensor:
    """num_samples x sum_i w_i (n_i / total_tokens) l_i (0-d) over a slice B of the batch;
    the slices' results add up to the batch's loss, and uniform weights 1/N give the
    token-mean loss. per_sample_loss l [B] (with gradient), token_counts n [B], weights [B]."""
    w = weights.detach().to(per_sample_loss.dtype)
    n = token_counts.to(per_sample_loss.dtype)
    return num_samples * (w * n / total_tokens * per_sample_loss).sum()


def per_sample_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token loss per sample [B] with gradient, token counts [B]) of loss_mat and
    mask [B, T]; padding never contributes, a sample with no tokens gives 0 and 0."""
    valid = mask.bool()
    kept = torch.where(valid, loss_mat, torch.zeros_like(loss_mat))
    counts = valid.sum(-1).to(loss_mat.dtype)
    return kept.sum(-1) / counts.clamp(min=1), counts


def in_warmup(step: int, warmup_steps: int) -> bool:
    """True while step (from 0) < warmup_steps: callers use uniform weights then."""
    return step < warmup_steps
