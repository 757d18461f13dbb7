"""Loss-based sample reweighting against hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.reweight import (
    in_warmup,
    normalise_losses,
    per_sample_token_mean,
    sample_weights,
    strategy_scores,
    weighted_token_loss,
)

TOL = dict(rtol=1e-5, atol=1e-6)
LOSSES = torch.tensor([1.0, 2.0, 4.0])


def test_normalise_hand_worked() -> None:
    # l_max = 4, l_min = 1: x = (2 l - 5) / 3 = [-1, -1/3, 1]
    assert_close(normalise_losses(LOSSES), torch.tensor([-1.0, -1 / 3, 1.0]), **TOL)


def test_strategy_scores_hand_worked() -> None:
    x = torch.tensor([-1.0, -1 / 3, 1.0])
    # linupper min(x + 1, 1) = [0, 2/3, 1]; quadratic 1 - x^2 = [0, 8/9, 0]; extremes |x|
    assert_close(strategy_scores(x, "linupper"), torch.tensor([0.0, 2 / 3, 1.0]), **TOL)
    assert_close(strategy_scores(x, "quadratic"), torch.tensor([0.0, 8 / 9, 0.0]), **TOL)
    assert_close(strategy_scores(x, "extremes"), torch.tensor([1.0, 1 / 3, 1.0]), **TOL)
    with pytest.raises(ValueError, match="linupper"):
        strategy_scores(x, "hardest")


def test_weights_hand_worked() -> None:
    # linupper, r = 1: softmax([0, 2/3, 1] - 1) = [e^-1, e^-1/3, 1] / 2.0844108
    #   = [0.3678794, 0.7165313, 1] / 2.0844108 = [0.1764909, 0.3437573, 0.4797519]
    w = sample_weights(LOSSES, "linupper", 1.0)
    assert_close(w, torch.tensor([0.1764909, 0.3437573, 0.4797519]), **TOL)
    # extremes, r = 0.4: (f - max f) / r = [0, -2/3, 0] / 0.4 = [0, -5/3, 0]
    #   e^-5/3 = 0.1888756; sum 2.1888756 -> [0.4568556, 0.0862889, 0.4568556]
    w = sample_weights(LOSSES, "extremes", 0.4)
    assert_close(w, torch.tensor([0.4568556, 0.0862889, 0.4568556]), **TOL)
    # quadratic, r = 1: [e^-8/9, 1, e^-8/9] / (1 + 2 x 0.4111123) = [0.2256101, 0.5487798, ...]
    w = sample_weights(LOSSES, "quadratic", 1.0)
    assert_close(w, torch.tensor([0.2256101, 0.5487798, 0.2256101]), **TOL)
    assert torch.equal(sample_weights(LOSSES, "uniform", 1.0), torch.full((3,), 1 / 3))
    near = sample_weights(LOSSES, "linupper", 1e6)  # r -> infinity: uniform
    assert_close(near, torch.full((3,), 1 / 3), rtol=0, atol=1e-6)


def test_weight_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_weights(LOSSES, "linupper", 0.0)
    with pytest.raises(ValueError, match="no samples"):
        sample_weights(torch.zeros(0), "linupper", 1.0)
    with pytest.raises(ValueError, match="NaN"):
        sample_weights(torch.tensor([1.0, float("nan")]), "linupper", 1.0)


def test_uniform_weights_give_the_token_mean_and_slices_add_up() -> None:
    g = torch.Generator().manual_seed(0)
    loss_mat = torch.rand(6, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]] * 2)
    per_sample, counts = per_sample_token_mean(loss_mat, mask)
    total = float(mask.sum())
    uniform = weighted_token_loss(per_sample, counts, torch.full((6,), 1 / 6), total, 6)
    token_mean = (loss_mat * mask).sum() / mask.sum()
    assert_close(uniform, token_mean, rtol=1e-6, atol=0)
    w = sample_weights(per_sample.detach(), "linupper", 0.4)
    whole = weighted_token_loss(per_sample, counts, w, total, 6)
    parts = sum(
        weighted_token_loss(per_sample[s], counts[s], w[s], total, 6)
        for s in (slice(0, 2), slice(2, 6))
    )
    assert_close(parts, whole, **TOL)
    whole.backward()
    assert loss_mat.grad is not None and not w.requires_grad
    assert torch.all(loss_mat.grad[mask == 0] == 0)


def test_padding_never_leaks_and_warmup() -> None:
    loss_mat = torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    per_sample, counts = per_sample_token_mean(loss_mat, mask)
    assert torch.equal(per_sample, torch.tensor([1.0, 0.0]))
    assert torch.equal(counts, torch.tensor([1.0, 0.0]))
    assert in_warmup(0, 2) and in_warmup(1, 2) and not in_warmup(2, 2)
    assert not in_warmup(0, 0)
