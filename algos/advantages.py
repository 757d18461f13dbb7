"""Advantage estimators: one registry, one signature.

Every estimator takes an `AdvantageInput` and returns (advantages [B, T], returns [B, T]).
Shape legend: B = sequences, T = response tokens (right padded); `mask` is 1 on valid
tokens. Estimators do not whiten; callers whiten with `algos.losses.masked_whiten`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdvantageInput:
    token_rewards: torch.Tensor  # [B, T] shaped per-token rewards
    mask: torch.Tensor  # [B, T]
    values: torch.Tensor | None = None  # [B, T] critic values
    scores: torch.Tensor | None = None  # [B] sequence rewards
    group_ids: torch.Tensor | None = None  # [B] prompt group of each sample
    gamma: float = 1.0
    lam: float = 1.0


Estimator = Callable[[AdvantageInput], tuple[torch.Tensor, torch.Tensor]]
_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator '{name}' is already registered")
        _ESTIMATORS[name] = fn
        return fn

    return wrap


def unregister_estimator(name: str) -> None:
    _ESTIMATORS.pop(name, None)


def get_estimator(name: str) -> Estimator:
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator '{name}'; registered: {list_estimators()}")
    return _ESTIMATORS[name]


def list_estimators() -> list[str]:
    return sorted(_ESTIMATORS)


@register_estimator("gae")
def gae(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response, V after the last token = 0:
    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; R = A + V."""
    if inp.values is None:
        raise ValueError("the 'gae' estimator needs values from a critic (values is None)")
    m = inp.mask.to(torch.float32)
    r = inp.token_rewards.float() * m
    v = inp.values.float() * m
    t_len = r.shape[-1]
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_v = torch.zeros_like(r[:, 0])
    for t in reversed(range(t_len)):
        delta = r[:, t] + inp.gamma * next_v - v[:, t]
        a = (delta + inp.gamma * inp.lam * next_adv) * m[:, t]
        adv[:, t] = a
        # padding resets the recursion: V and A after the last valid token are 0
        next_adv = a
        next_v = v[:, t]
    returns = (adv + v) * m
    return adv, returns


def gae_reference(
    token_rewards: list[list[float]],
    values: list[list[float]],
    mask: list[list[int]],
    gamma: float,
    lam: float,
) -> tuple[list[list[float]], list[list[float]]]:
    """Plain-Python GAE, sample by sample and token by token (the test reference)."""
    advs, rets = [], []
    for r_row, v_row, m_row in zip(token_rewards, values, mask):
        n = len(r_row)
        a_row, ret_row = [0.0] * n, [0.0] * n
        last_adv, next_v = 0.0, 0.0
        for t in range(n - 1, -1, -1):
            if not m_row[t]:
                last_adv, next_v = 0.0, 0.0
                continue
            delta = r_row[t] + gamma * next_v - v_row[t]
            last_adv = delta + gamma * lam * last_adv
            a_row[t] = last_adv
            ret_row[t] = last_adv + v_row[t]
            next_v = v_row[t]
        advs.append(a_row)
        rets.append(ret_row)
    return advs, rets
