"""KL estimators, shaped rewards and KL controllers against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algos.rewards import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
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


# ---------------------------------------------------------------- KL estimators


def test_k1_k2_k3() -> None:
    assert_close(kl_estimate(LP, REF, "k1"), torch.tensor([[0.5, -0.5]]), **TOL)
    # d^2 / 2 = 0.125 for both
    assert_close(kl_estimate(LP, REF, "k2"), torch.tensor([[0.125, 0.125]]), **TOL)
    # exp(-0.5) - 1 + 0.5 = 0.10653066; exp(0.5) - 1 - 0.5 = 0.14872127
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]])
    assert_close(kl_estimate(LP, REF, "k3"), expected, **TOL)


def test_k3_by_hand_more_points() -> None:
    lp, ref = torch.tensor([[2.0, -2.0, 0.0]]), torch.zeros(1, 3)
    # d = 2: exp(-2) - 1 + 2 = 0.13533528 + 1 = 1.13533528
    # d = -2: exp(2) - 1 - 2 = 7.3890561 - 3 = 4.3890561
    # d = 0: 1 - 1 + 0 = 0
    expected = torch.tensor([[1.1353352832, 4.3890560989, 0.0]])
    assert_close(kl_estimate(lp, ref, "k3"), expected, **TOL)
    # k2 at d = 2, -2, 0: 4 / 2 = 2, 2, 0
    assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[2.0, 2.0, 0.0]]), **TOL)


def test_kl_clamps() -> None:
    lp, ref = torch.tensor([[30.0, -30.0, 3.0]]), torch.zeros(1, 3)
    # d clamped to (20, -20, 3); k1 then clamped to [-10, 10]
    assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[10.0, -10.0, 3.0]]), **TOL)
    # k2: 200, 200 -> 10; 4.5
    assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[10.0, 10.0, 4.5]]), **TOL)
    # k3 at d = 20: exp(-20) - 1 + 20 = 19.000000002 -> 10; d = -20: exp(20) - 21 -> 10;
    # d = 3: exp(-3) + 2 = 2.04978707
    assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([[10.0, 10.0, math.exp(-3) + 2]]), **TOL)


def test_kl_clamp_on_d_keeps_k3_finite() -> None:
    # lp = -inf: d = -inf is clamped to -20 first, so k3 = exp(20) - 21 -> 10.
    # Without the clamp on d, k3 = exp(inf) - 1 - inf = inf - inf = nan.
    lp, ref = torch.tensor([[-math.inf, 0.0]]), torch.tensor([[-1.0, -math.inf]])
    # second token: d = +inf -> 20: k3 = exp(-20) + 19 -> 10
    assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([[10.0, 10.0]]), **TOL)
    # k1: -20 -> -10, 20 -> 10; k2: 200 -> 10 both
    assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[-10.0, 10.0]]), **TOL)
    assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[10.0, 10.0]]), **TOL)


def test_kl_values_inside_the_clamps_are_kept() -> None:
    # just inside the estimate clamp: k1 at d = 9.5 stays 9.5, k2 at d = 4 stays 8
    lp, ref = torch.tensor([[9.5, 4.0]]), torch.zeros(1, 2)
    assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[9.5, 4.0]]), **TOL)
    assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[10.0, 8.0]]), **TOL)  # 45.125 -> 10


def test_unknown_kl_estimator() -> None:
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'") as err:
        kl_estimate(LP, REF, "k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    for name in KL_ESTIMATORS:
        assert name in str(err.value)


# ---------------------------------------------------------------- shaped reward


def test_last_token_index() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 2, 0, 0]
    assert last_token_index(mask).dtype == torch.long
    assert last_token_index(mask.bool()).tolist() == [1, 2, 0, 0]
    assert last_token_index(mask.float()).tolist() == [1, 2, 0, 0]


def test_shaped_token_rewards() -> None:
    scores = torch.tensor([2.0, 20.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.4, 0.4, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    rt = shaped_token_rewards(scores, kl, mask, kl_coef=0.5, reward_clip=10.0)
    # row 0: -0.5 * (0.1, 0.2) and the score 2 on token 1 -> (-0.05, 1.9, 0);
    #        the KL 0.3 on the padded token is dropped
    # row 1: -0.05 each, the score clipped to 10 on token 2 -> (-0.05, -0.05, 9.95)
    # row 2: no valid token -> nothing
    expected = torch.tensor([[-0.05, 1.9, 0.0], [-0.05, -0.05, 9.95], [0.0, 0.0, 0.0]])
    assert_close(rt, expected, **TOL)


def test_shaped_reward_clip_both_sides_and_custom_c() -> None:
    scores = torch.tensor([-20.0, 0.5, 3.0])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    kl = torch.full((3, 3), 7.0)
    # kl_coef 0 -> only the scores: clip(-20, -1, 1) = -1 on t0; 0.5 on t2; clip(3) = 1 on t1
    rt = shaped_token_rewards(scores, kl, mask, kl_coef=0.0, reward_clip=1.0)
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    assert_close(rt, expected, **TOL)
    # default c = 10: -20 -> -10
    rt = shaped_token_rewards(scores, torch.zeros(3, 3), mask, kl_coef=0.1)
    assert_close(rt[0], torch.tensor([-10.0, 0.0, 0.0]), **TOL)


def test_shaped_reward_kl_term_and_padding() -> None:
    scores = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kl = torch.tensor([[0.2, -0.4, 0.6, 0.0], [1.0, 2.0, 0.0, 0.0]])
    # beta = 0.05: row 0: (-0.01, 0.02, -0.03 + 1, 0); row 1: (-0.05, -0.1 - 1, 0, 0)
    expected = torch.tensor([[-0.01, 0.02, 0.97, 0.0], [-0.05, -1.1, 0.0, 0.0]])
    assert_close(shaped_token_rewards(scores, kl, mask, kl_coef=0.05), expected, **TOL)
    # garbage KL on padded tokens changes nothing
    dirty = torch.where(mask.bool(), kl, torch.full_like(kl, 123.0))
    assert_close(shaped_token_rewards(scores, dirty, mask, kl_coef=0.05), expected, **TOL)


# ---------------------------------------------------------------- KL controllers


def test_fixed_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(10.0, 1000)
    ctl.update(0.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05 and other.state_dict() == {"value": 0.05}


def test_adaptive_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=0.02, horizon=1000)
    # e = clip(0.03 / 0.02 - 1 = 0.5, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    ctl.update(0.03, 100)
    assert ctl.value == pytest.approx(0.102, rel=1e-9)
    # e = 0.019 / 0.02 - 1 = -0.05 (inside the clip) -> 0.102 * (1 - 0.05 * 0.1) = 0.10149
    ctl.update(0.019, 100)
    assert ctl.value == pytest.approx(0.10149, rel=1e-9)
    # e = clip(0 / 0.02 - 1 = -1) = -0.2 -> 0.10149 * (1 - 0.2 * 0.5) = 0.091341
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.091341, rel=1e-9)
    # on target: e = 0 -> unchanged
    ctl.update(0.02, 500)
    assert ctl.value == pytest.approx(0.091341, rel=1e-9)


def test_adaptive_controller_state_round_trip() -> None:
    ctl = AdaptiveKLController(0.091341, target=0.02, horizon=1000)
    again = make_kl_controller("adaptive", 1.0, 0.02, 1000)
    again.load_state_dict(ctl.state_dict())
    assert again.state_dict() == {"value": 0.091341, "target": 0.02, "horizon": 1000}
    # both continue identically: e = clip(0.05 / 0.02 - 1 = 1.5) = 0.2;
    # 0.091341 * (1 + 0.2 * 200 / 1000) = 0.091341 * 1.04 = 0.09499464
    for c in (ctl, again):
        c.update(0.05, 200)
        assert c.value == pytest.approx(0.09499464, rel=1e-9)


def test_restoring_keeps_the_configured_target_and_horizon() -> None:
    saved = AdaptiveKLController(0.5, target=0.02, horizon=1000).state_dict()
    ctl = make_kl_controller("adaptive", 1.0, 0.05, 500)
    ctl.load_state_dict(saved)  # only the coefficient is state; the rest is config
    assert ctl.state_dict() == {"value": 0.5, "target": 0.05, "horizon": 500}


def test_make_kl_controller() -> None:
    fixed = make_kl_controller("fixed", 0.1, 6.0, 10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1
    adaptive = make_kl_controller("adaptive", 0.2, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 10000)
    with pytest.raises(ValueError, match="unknown KL controller 'pid'") as err:
        make_kl_controller("pid", 0.1, 0.1, 1)
    assert "fixed" in str(err.value) and "adaptive" in str(err.value)


def test_adaptive_controller_rejects_bad_target_and_horizon() -> None:
    # both problems are reported in one error
    with pytest.raises(ValueError, match="target=0.0 must be > 0.*horizon=0 must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=0)
    with pytest.raises(ValueError, match="horizon=-5"):
        make_kl_controller("adaptive", 0.1, 0.02, -5)
    # a fixed controller ignores target and horizon
    assert make_kl_controller("fixed", 0.1, 0.0, 0).value == 0.1
    assert KL_CONTROLLERS == ("fixed", "adaptive")


def test_kl_to_reward_to_controller_by_hand() -> None:
    # d = logp - ref = (0.1, 0.3 | 0.2, <pad>); k1 = d; per-token mean over the 3 valid
    # tokens = (0.1 + 0.3 + 0.2) / 3 = 0.2 (the controller's unit)
    mask = torch.tensor([[1, 1], [1, 0]])
    kl = kl_estimate(torch.tensor([[0.1, 0.3], [0.2, 9.0]]), torch.zeros(2, 2), "k1")
    kl_token_mean = float((kl * mask).sum() / mask.sum())
    assert kl_token_mean == pytest.approx(0.2, rel=1e-6)
    # beta = 0.1, scores (1, -1): row 0 (-0.01, -0.03 + 1), row 1 (-0.02 - 1, 0)
    rt = shaped_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.1)
    assert_close(rt, torch.tensor([[-0.01, 0.97], [-1.02, 0.0]]), **TOL)
    # target 0.1: e = clip(0.2 / 0.1 - 1 = 1, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 2 / 10) = 0.104
    ctl = AdaptiveKLController(0.1, target=0.1, horizon=10)
    ctl.update(kl_token_mean, n_samples=2)
    assert ctl.value == pytest.approx(0.104, rel=1e-6)
