"""Losses and reductions against hand-worked numbers (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algos.losses import (
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

TOL = dict(rtol=1e-5, atol=1e-6)
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def t(v: float) -> torch.Tensor:
    return torch.tensor(v)


def test_masked_mean_and_var() -> None:
    # valid entries 1, 2, 4: mean 7/3
    assert_close(masked_mean(X, M), t(7 / 3), **TOL)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; / 3 = 14/9
    assert_close(masked_var(X, M), t(14 / 9), **TOL)
    # unbiased: 42/9 / 2 = 7/3
    assert_close(masked_var(X, M, unbiased=True), t(7 / 3), **TOL)
    # per-row mean: row 0 (1+2)/2 = 1.5, row 1 4/1 = 4
    assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]), **TOL)


def test_masked_whiten() -> None:
    w = masked_whiten(X, M)
    # (1 - 7/3) / sqrt(14/9) = -4/sqrt(14); (2 - 7/3)/sqrt(14/9) = -1/sqrt(14); (4-7/3).. = 5/sqrt(14)
    s = math.sqrt(14)
    expected = torch.tensor([[-4 / s, -1 / s, 0.0], [5 / s, 0.0, 0.0]])
    assert_close(w, expected, **TOL)


def test_aggregation_modes() -> None:
    # token-mean: (1 + 2 + 4) / 3
    assert_close(aggregate_loss(X, M, "token-mean"), t(7 / 3), **TOL)
    # seq-mean-token-mean: mean(1.5, 4) = 2.75
    assert_close(aggregate_loss(X, M, "seq-mean-token-mean"), t(2.75), **TOL)
    # seq-mean-token-sum: mean(1 + 2, 4) = 3.5
    assert_close(aggregate_loss(X, M, "seq-mean-token-sum"), t(3.5), **TOL)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(X, M, "mean")


def test_padding_never_contributes() -> None:
    garbage = X.clone()
    garbage[M == 0] = 1e6
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert_close(aggregate_loss(garbage, M, mode), aggregate_loss(X, M, mode), **TOL)
    assert_close(masked_whiten(garbage, M), masked_whiten(X, M), **TOL)


def test_entropy() -> None:
    # uniform over 4 tokens: log 4
    assert_close(entropy_from_logits(torch.zeros(1, 1, 4)), torch.tensor([[math.log(4)]]), **TOL)
    # logits (0, ln 3) -> p = (1/4, 3/4): H = 1/4 ln 4 + 3/4 ln(4/3) = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3)]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351446]]), **TOL)


def test_logprobs_from_logits() -> None:
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    # token 1 under (1/4, 3/4): ln 3/4; token 0 under (1/2, 1/2): ln 1/2
    lp = logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.5)]]), **TOL)


def ratio_case() -> tuple[torch.Tensor, ...]:
    # rho = 1.1, 1.5, 0.5, 5.0 with A = 1, 1, -1, -1; a fifth, padded token holds garbage
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.1, 1.5, 0.5, 5.0, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return new, old, adv, mask


def test_policy_loss_clip_and_dual_clip() -> None:
    new, old, adv, mask = ratio_case()
    loss, m = policy_loss(new, old, adv, mask, 0.2, 0.2, 3.0, "token-mean")
    # token 0: min(1.1, clip 1.1) = 1.1 -> L = -1.1 (not clipped)
    # token 1: min(1.5, 1.2) = 1.2 -> L = -1.2 (clipped)
    # token 2: min(-0.5, 0.8 * -1 = -0.8) = -0.8 -> L = 0.8 (clipped); dual min(0.8, 3) = 0.8
    # token 3: min(-5, -1.2) = -5 -> L = 5; dual: min(5, -3 * -1 = 3) = 3 (dual clip)
    # token-mean = (-1.1 - 1.2 + 0.8 + 3) / 4 = 0.375
    assert_close(loss, t(0.375), **TOL)
    assert m["clip_frac"] == pytest.approx(0.5, rel=1e-6)
    assert m["dual_clip_frac"] == pytest.approx(0.25, rel=1e-6)
    # approx_kl = mean(old - new) = -(ln 1.1 + ln 1.5 + ln 0.5 + ln 5) / 4 = -0.35426650
    assert m["approx_kl"] == pytest.approx(-(math.log(1.1 * 1.5 * 0.5 * 5)) / 4, rel=1e-5)


def test_policy_loss_without_dual_clip() -> None:
    new, old, adv, mask = ratio_case()
    loss, m = policy_loss(new, old, adv, mask, 0.2, 0.2, None, "token-mean")
    # token 3 keeps L = 5: (-1.1 - 1.2 + 0.8 + 5) / 4 = 0.875
    assert_close(loss, t(0.875), **TOL)
    assert m["dual_clip_frac"] == 0.0


def test_policy_loss_asymmetric_clip() -> None:
    new, old, adv, mask = ratio_case()
    loss, _ = policy_loss(new, old, adv, mask, 0.2, 0.28, 3.0, "token-mean")
    # token 1: min(1.5, 1.28) = 1.28 -> (-1.1 - 1.28 + 0.8 + 3) / 4 = 0.355
    assert_close(loss, t(0.355), **TOL)


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    new, old, adv, mask = ratio_case()
    new = new.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, adv, mask, 0.2, 0.2, 3.0, "token-mean")
    loss.backward()
    # d/dlp of -rho*A/4 at token 0 = -1.1/4; clipped tokens 1, 2, dual-clipped token 3: 0
    assert_close(new.grad, torch.tensor([[-1.1 / 4, 0.0, 0.0, 0.0, 0.0]]), **TOL)


def test_value_loss() -> None:
    v = torch.tensor([[1.0, 0.9, 7.0]])
    v_old = torch.tensor([[0.5, 0.0, 7.0]])
    ret = torch.tensor([[0.0, 1.0, -7.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = value_loss(v, v_old, ret, mask, 0.2, "token-mean")
    # token 0: (1 - 0)^2 = 1; clipped V = 0.5 + 0.2 = 0.7 -> 0.49; 0.5 * max = 0.5
    # token 1: (0.9 - 1)^2 = 0.01; clipped V = 0 + 0.2 -> (0.2 - 1)^2 = 0.64; 0.5 * 0.64 = 0.32
    # mean = (0.5 + 0.32) / 2 = 0.41; the clipped term was larger on 1 of 2 tokens
    assert_close(loss, t(0.41), **TOL)
    assert m["value_clip_frac"] == pytest.approx(0.5)
    unclipped, m2 = value_loss(v, v_old, ret, mask, None, "token-mean")
    # 0.5 * (1 + 0.01) / 2 = 0.2525
    assert_close(unclipped, t(0.2525), **TOL)
    assert m2["value_clip_frac"] == 0.0


def test_explained_variance() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    r = torch.tensor([[1.0, 2.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # R - V = (0, 0, 1): var 2/9; Var(R) of (1, 2, 4) = 14/9 -> 1 - (2/9) / (14/9 + 1e-5)
    assert explained_variance(v, r, mask) == pytest.approx(1 - (2 / 9) / (14 / 9 + 1e-5), rel=1e-6)
