"""KL estimators, the KL-shaped per-token reward and the KL coefficient controllers.

Shape legend: B = sequences, T = response tokens. `mask` [B, T] is 1 on valid tokens.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate [B, T] from d = clamp(logp - ref_logp, -20, 20):
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d; the estimate is clamped to [-10, 10]."""
    d = torch.clamp(logp - ref_logp, -20.0, 20.0)
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d * d
    elif kind == "k3":
        kl = torch.exp(-d) - 1.0 + d
    else:
        raise ValueError(f"unknown KL estimator '{kind}'; valid: {list(KL_ESTIMATORS)}")
    return torch.clamp(kl, -10.0, 10.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last valid token of each row (0 for a row with none)."""
    t = mask.shape[-1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(-1).values


def shaped_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float = 10.0,
) -> torch.Tensor:
    """rt [B, T] = -kl_coef * kl * mask, plus clip(score, -c, c) on each row's last valid
    token (rows with no valid token get no score). scores: [B]; kl, mask: [B, T]."""
    m = mask.to(kl.dtype)
    rt = torch.where(m.bool(), -kl_coef * kl, torch.zeros_like(kl))
    has = m.sum(-1) > 0
    idx = last_token_index(m)
    bonus = torch.clamp(scores.to(rt.dtype), -reward_clip, reward_clip) * has.to(rt.dtype)
    return rt.scatter_add(-1, idx.unsqueeze(-1), bonus.unsqueeze(-1))


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_samples: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): e = clip(kl / target - 1, -0.2, 0.2);
    value <- value * (1 + e * n_samples / horizon). `current_kl` is the per-token mean KL."""

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(
    kind: str, init_value: float, target: float, horizon: int
) -> FixedKLController | AdaptiveKLController:
    if kind == "fixed":
        return FixedKLController(init_value)
    if kind == "adaptive":
        return AdaptiveKLController(init_value, target, horizon)
    raise ValueError(f"unknown KL controller '{kind}'; valid: ['fixed', 'adaptive']")
