"""Loss-based sample reweighting (Sow et al., ICLR 2025, arXiv 2502.06733), as pure functions.

Shape legend: N = samples in the global batch (the mini-batch the weights are computed
over), B = samples in a slice of it (a micro-batch; B = N for the whole batch),
T = tokens per sample (right padded). `mask` is [B, T], float or bool, 1 (True) on valid
tokens; padded tokens never contribute to a result or a gradient, even when they hold
NaN or inf.

Per global batch: x = normalise_losses(l) in [-delta, delta], f = strategy_scores(x),
w = softmax((f - max f) / r) (the maximiser of sum_i w_i f_i - r KL(w || uniform)), and the
loss N sum_i w_i (n_i / sum_j n_j) l_i, which is the token-mean loss for uniform w = 1/N.
Weights are always detached: gradient flows through the per-sample losses only.
"""

from __future__ import annotations

import torch

REWEIGHT_STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def normalise_losses(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Map per-sample losses [N] (detached first) onto [-delta, delta]; returns x [N].

    x_i = delta (2 l_i - l_max - l_min) / max(l_max - l_min, 1e-6): the lowest loss maps to
    -delta, the highest to +delta; equal losses all map to 0."""
    lo = losses.detach()
    lmax, lmin = lo.max(), lo.min()
    return delta * (2 * lo - lmax - lmin) / torch.clamp(lmax - lmin, min=1e-6)


def strategy_scores(x: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """Scores f [N] of normalised losses x [N]; a higher score means a larger weight.

    linupper: min(x + delta, delta) (down-weights easy, low-loss samples);
    quadratic: 1 - x^2 / delta^2 (favours the middle); extremes: |x|;
    uniform: zeros (a constant, so the softmax gives 1/N each).
    An unknown strategy raises ValueError listing the valid ones."""
    if strategy == "linupper":
        return torch.clamp(x + delta, max=delta)
    if strategy == "quadratic":
        return 1 - x * x / (delta * delta)
    if strategy == "extremes":
        return x.abs()
    if strategy == "uniform":
        return torch.zeros_like(x)
    raise ValueError(
        f"unknown reweighting strategy '{strategy}'; valid strategies: {list(REWEIGHT_STRATEGIES)}"
    )


def sample_weights(
    losses: torch.Tensor, strategy: str, temperature: float, delta: float = 1.0
) -> torch.Tensor:
    """Detached weights w [N], summing to 1, of per-sample losses [N] over the global batch.

    w = softmax((f - max f) / r) with f = strategy_scores(normalise_losses(losses)) and
    r = temperature; r -> infinity gives uniform weights. "uniform" returns exactly
    torch.full((N,), 1/N) in the losses' dtype and device.
    Raises ValueError when temperature <= 0 (or NaN), losses is not 1-D, N == 0, a loss is
    NaN or inf, or the strategy is unknown."""
    if not temperature > 0:
        raise ValueError(
            f"reweighting temperature = {temperature}: must be > 0 "
            "(larger is closer to uniform; the paper uses 0.4 to 1.0)"
        )
    if losses.dim() != 1:
        raise ValueError(f"sample_weights: losses has shape {tuple(losses.shape)}; it must be [N]")
    n = losses.shape[0]
    if n == 0:
        raise ValueError("sample_weights: no samples (losses is empty); N must be >= 1")
    if strategy not in REWEIGHT_STRATEGIES:
        strategy_scores(losses, strategy)  # raises the ValueError listing the valid ones
    lo = losses.detach()
    nan = int(torch.isnan(lo).sum())
    inf = int(torch.isinf(lo).sum())
    if nan or inf:
        raise ValueError(
            f"sample_weights: {nan} per-sample loss(es) are NaN and {inf} are inf out of {n}; "
            "every loss must be finite (check the loss or the mask of those samples)"
        )
    if strategy == "uniform":
        return torch.full((n,), 1.0 / n, dtype=lo.dtype, device=lo.device)
    f = strategy_scores(normalise_losses(lo, delta), strategy, delta)
    return torch.softmax((f - f.max()) / temperature, dim=0)


def weighted_token_loss(
    per_sample_loss: torch.Tensor,
    token_counts: torch.Tensor,
    weights: torch.Tensor,
    total_tokens: float | torch.Tensor,
    num_samples: int,
) -> torch.Tensor:
    """A slice's share (0-d) of the global batch's weighted loss.

    num_samples * sum_i w_i (n_i / total_tokens) l_i over the slice's B samples, where
    per_sample_loss l [B] is each sample's mean token loss (with gradient), token_counts
    n [B] its valid tokens and weights w [B] its slice of the global weights (detached
    here). total_tokens (sum of n over the global batch; clamped to >= 1) and num_samples
    (N) describe the whole global batch, so the slices' results add up to the global loss;
    uniform w = 1/N over the whole batch gives the token-mean loss sum(l m) / sum(m).
    Raises ValueError when the three [B] tensors differ in shape."""
    shapes = {tuple(t.shape) for t in (per_sample_loss, token_counts, weights)}
    if len(shapes) != 1 or per_sample_loss.dim() != 1:
        raise ValueError(
            "weighted_token_loss: per_sample_loss, token_counts and weights have shapes "
            f"{tuple(per_sample_loss.shape)}, {tuple(token_counts.shape)}, "
            f"{tuple(weights.shape)}; they must all be [B]"
        )
    like = per_sample_loss
    w = weights.detach().to(dtype=like.dtype, device=like.device)
    n = token_counts.detach().to(dtype=like.dtype, device=like.device)
    total = torch.as_tensor(total_tokens, dtype=like.dtype, device=like.device).clamp(min=1)
    return num_samples * (w * (n / total) * per_sample_loss).sum()


def per_sample_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token loss per sample [B] with gradient, valid token counts [B]).

    loss_mat, mask: [B, T]. Padding never contributes to a value or a gradient, even when
    it holds NaN or inf; a row with no valid tokens gives loss 0 and count 0. Counts are in
    loss_mat's dtype. Raises ValueError when the shapes differ."""
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(
            f"per_sample_token_mean: loss_mat {tuple(loss_mat.shape)} and mask "
            f"{tuple(mask.shape)} must both be [B, T]"
        )
    valid = mask.bool()
    kept = torch.where(valid, loss_mat, torch.zeros_like(loss_mat))
    counts = valid.sum(-1).to(loss_mat.dtype)
    return kept.sum(-1) / counts.clamp(min=1), counts


def in_warmup(step: int, warmup_steps: int) -> bool:
    """True while step (counted from 0) < warmup_steps; callers use uniform weights then."""
    return step < warmup_steps
