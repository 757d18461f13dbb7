"""The rollout math shared by PPO's two train calls."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.ppo import ppo_rollout_advantages

TOL = dict(rtol=1e-5, atol=1e-6)


def rollout(whiten: bool):
    return ppo_rollout_advantages(
        torch.tensor([[-1.0, -2.0]]),
        torch.tensor([[-1.5, -2.0]]),
        torch.tensor([[0.2, 0.4]]),
        torch.tensor([1.0]),
        torch.tensor([[1, 1]]),
        kl_coef=0.1,
        kl_estimator="k1",
        reward_clip=10.0,
        estimator="gae",
        gamma=1.0,
        lam=1.0,
        whiten=whiten,
    )


def test_by_hand() -> None:
    adv, ret, m = rollout(whiten=False)
    # k1 = (0.5, 0); rt = (-0.1 * 0.5, 0 + score 1) = (-0.05, 1.0)
    # t=1: delta = 1 + 0 - 0.4 = 0.6; t=0: delta = -0.05 + 0.4 - 0.2 = 0.15, A0 = 0.75
    assert_close(adv, torch.tensor([[0.75, 0.6]]), **TOL)
    assert_close(ret, torch.tensor([[0.95, 1.0]]), **TOL)
    assert m["rollout/kl_to_ref_token_mean"] == pytest.approx(0.25)
    assert m["rollout/kl_to_ref_seq_sum"] == pytest.approx(0.5)


def test_whitened() -> None:
    adv, ret, _ = rollout(whiten=True)
    # mean 0.675, population var 0.075^2 -> (+-0.075) / sqrt(0.005625 + 1e-8)
    s = 0.075 / (0.005625 + 1e-8) ** 0.5
    assert_close(adv, torch.tensor([[s, -s]]), **TOL)
    assert_close(ret, torch.tensor([[0.95, 1.0]]), **TOL)  # returns are not whitened
