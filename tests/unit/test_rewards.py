"""KL estimators, shaped rewards and KL controllers against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algos.rewards import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    last_token_index,
    make_kl_controller,
    shaped_token_rewards,
)

TOL = dict(rtol=1e-5, atol=1e-6)
LP = torch.tensor([[0.0, -1.0]])
REF = torch.tensor([[-0.5, -0.5]])  # d = (0.5, -0.5)


def test_k1_k2_k3() -> None:
    assert_close(kl_estimate(LP, REF, "k1"), torch.tensor([[0.5, -0.5]]), **TOL)
    # d^2 / 2 = 0.125 for both
    assert_close(kl_estimate(LP, REF, "k2"), torch.tensor([[0.125, 0.125]]), **TOL)
    # exp(-0.5) - 1 + 0.5 = 0.10653066; exp(0.5) - 1 - 0.5 = 0.14872127
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]])
    assert_close(kl_estimate(LP, REF, "k3"), expected, **TOL)


def test_kl_clamps() -> None:
    lp, ref = torch.tensor([[30.0, -30.0, 3.0]]), torch.zeros(1, 3)
    # d clamped to (20, -20, 3); k1 then clamped to [-10, 10]
    assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[10.0, -10.0, 3.0]]), **TOL)
    # k2: 200, 200 -> 10; 4.5
    assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[10.0, 10.0, 4.5]]), **TOL)
    # k3 at d = 20: exp(-20) - 1 + 20 = 19.000000002 -> 10; d = -20: exp(20) - 21 -> 10;
    # d = 3: exp(-3) + 2 = 2.04978707
    assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([[10.0, 10.0, math.exp(-3) + 2]]), **TOL)
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lp, ref, "k4")


def test_last_token_index() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 2, 0]


def test_shaped_token_rewards() -> None:
    scores = torch.tensor([2.0, 20.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.4, 0.4, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    rt = shaped_token_rewards(scores, kl, mask, kl_coef=0.5, reward_clip=10.0)
    # row 0: -0.5 * (0.1, 0.2) and the score 2 on token 1 -> (-0.05, 1.9, 0)
    # row 1: -0.05 each, the score clipped to 10 on token 2 -> (-0.05, -0.05, 9.95)
    # row 2: no valid token -> nothing
    expected = torch.tensor([[-0.05, 1.9, 0.0], [-0.05, -0.05, 9.95], [0.0, 0.0, 0.0]])
    assert_close(rt, expected, **TOL)


def test_fixed_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(10.0, 1000)
    assert ctl.value == 0.05


def test_adaptive_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=0.02, horizon=1000)
    # e = clip(0.03 / 0.02 - 1 = 0.5, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    ctl.update(0.03, 100)
    assert ctl.value == pytest.approx(0.102, rel=1e-9)
    # e = 0.019 / 0.02 - 1 = -0.05 -> 0.102 * (1 - 0.05 * 0.1) = 0.10149
    ctl.update(0.019, 100)
    assert ctl.value == pytest.approx(0.10149, rel=1e-9)
    # e = clip(0 / 0.02 - 1 = -1) = -0.2 -> 0.10149 * (1 - 0.2 * 0.5) = 0.091341
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.091341, rel=1e-9)
    again = make_kl_controller("adaptive", 1.0, 1.0, 1)
    again.load_state_dict(ctl.state_dict())
    assert again.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="fixed"):
        make_kl_controller("pid", 0.1, 0.1, 1)
