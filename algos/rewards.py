"""KL estimators, the KL-shaped per-token reward and the KL coefficient controllers.

Shape legend: B = sequences, T = response tokens. `mask` [B, T] (float or bool) is 1 on
valid response tokens; responses are right padded.
"""

from __future__ import annotations

from typing import Protocol

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate [B, T] (Schulman, "Approximating KL").

    logp, ref_logp: [B, T] log-probs of the taken tokens under the policy and the reference.
    d = clamp(logp - ref_logp, -20, 20); k1 = d; k2 = d^2 / 2; k3 = exp(-d) - 1 + d;
    the estimate is clamped to [-10, 10]. Padded tokens are not masked here: multiply by
    the mask (or let `shaped_token_rewards` drop them). An unknown kind raises ValueError."""
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
    """Index [B] (long) of the last valid token of each row of mask [B, T]; 0 for a row
    with no valid token."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(-1)


def shaped_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float = 10.0,
) -> torch.Tensor:
    """KL-shaped per-token reward rt [B, T] (InstructGPT style), in kl's dtype.

    scores: [B] sequence rewards; kl: [B, T] per-token KL estimate; mask: [B, T].
    rt = -kl_coef * kl on valid tokens (0 on padding), plus clip(score, -c, c) added on
    each row's last valid token; a row with no valid token gets no score."""
    valid = mask.bool()
    rt = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    has_tokens = valid.any(-1).to(rt.dtype)  # [B]
    bonus = torch.clamp(scores.to(rt.dtype), -reward_clip, reward_clip) * has_tokens
    return rt.scatter_add(-1, last_token_index(mask).unsqueeze(-1), bonus.unsqueeze(-1))


class KLController(Protocol):
    """What the training loop needs from a KL coefficient controller."""

    value: float

    def update(self, current_kl: float, n_samples: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A constant KL coefficient `value`; `update` changes nothing."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_samples: int) -> None:
        """current_kl: per-token mean KL to the reference (ignored)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019).

    update: e = clip(current_kl / target - 1, -0.2, 0.2);
    value <- value * (1 + e * n_samples / horizon).
    Unit: `current_kl` and `target` are per-token mean KL (masked mean over valid tokens),
    not per-sequence sums; `horizon` and `n_samples` count samples (sequences)."""

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        problems = []
        if not target > 0:
            problems.append(f"target={target!r} must be > 0 (a per-token mean KL)")
        if not horizon > 0:
            problems.append(f"horizon={horizon!r} must be > 0 (samples)")
        if problems:
            raise ValueError("AdaptiveKLController: " + "; ".join(problems))
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        """current_kl: per-token mean KL to the reference of the last rollout batch;
        n_samples: sequences in that batch."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient; target and horizon stay as configured."""
        self.value = float(state["value"])


def make_kl_controller(kind: str, init_value: float, target: float, horizon: int) -> KLController:
    """A KL controller by name: "fixed" (target and horizon unused) or "adaptive".

    target: per-token mean KL; horizon: samples. An unknown kind raises ValueError."""
    if kind == "fixed":
        return FixedKLController(init_value)
    if kind == "adaptive":
        return AdaptiveKLController(init_value, target, horizon)
    raise ValueError(f"unknown KL controller '{kind}'; valid: {list(KL_CONTROLLERS)}")
