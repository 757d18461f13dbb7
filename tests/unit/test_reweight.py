"""Loss-based sample reweighting (algos.reweight) against hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.reweight import (
    REWEIGHT_STRATEGIES,
    in_warmup,
    normalise_losses,
    per_sample_token_mean,
    sample_weights,
    strategy_scores,
    weighted_token_loss,
)

TOL = dict(rtol=1e-5, atol=1e-7)
LOSSES = torch.tensor([1.0, 2.0, 4.0])
# l_max = 4, l_min = 1, l_max - l_min = 3, l_max + l_min = 5: x = (2 l - 5) / 3
#   = [(2 - 5) / 3, (4 - 5) / 3, (8 - 5) / 3] = [-1, -1/3, 1]
X = torch.tensor([-1.0, -1 / 3, 1.0])


def test_strategies_are_the_four_of_the_paper() -> None:
    assert REWEIGHT_STRATEGIES == ("uniform", "linupper", "quadratic", "extremes")


def test_normalise_hand_worked() -> None:
    assert_close(normalise_losses(LOSSES), X, **TOL)
    # delta = 2 doubles x: [-2, -2/3, 2]
    assert_close(normalise_losses(LOSSES, delta=2.0), 2 * X, **TOL)
    # equal losses: l_max - l_min = 0 -> denominator 1e-6, numerator 0 -> x = 0
    assert torch.equal(normalise_losses(torch.full((4,), 3.0)), torch.zeros(4))


def test_normalise_detaches() -> None:
    losses = LOSSES.clone().requires_grad_(True)
    assert not normalise_losses(losses).requires_grad


def test_strategy_scores_hand_worked() -> None:
    # linupper min(x + 1, 1) = [min(0, 1), min(2/3, 1), min(2, 1)] = [0, 2/3, 1]
    assert_close(strategy_scores(X, "linupper"), torch.tensor([0.0, 2 / 3, 1.0]), **TOL)
    # quadratic 1 - x^2 = [1 - 1, 1 - 1/9, 1 - 1] = [0, 8/9, 0]
    assert_close(strategy_scores(X, "quadratic"), torch.tensor([0.0, 8 / 9, 0.0]), **TOL)
    # extremes |x| = [1, 1/3, 1]
    assert_close(strategy_scores(X, "extremes"), torch.tensor([1.0, 1 / 3, 1.0]), **TOL)
    # uniform: a constant (zeros), not f = x
    assert torch.equal(strategy_scores(X, "uniform"), torch.zeros(3))
    # delta = 2 on x = [-2, -2/3, 2]: linupper min(x + 2, 2) = [0, 4/3, 2];
    #   quadratic 1 - x^2 / 4 = [0, 1 - 1/9, 0] = [0, 8/9, 0]
    x2 = 2 * X
    assert_close(strategy_scores(x2, "linupper", 2.0), torch.tensor([0.0, 4 / 3, 2.0]), **TOL)
    assert_close(strategy_scores(x2, "quadratic", 2.0), torch.tensor([0.0, 8 / 9, 0.0]), **TOL)


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="hardest.*uniform.*linupper.*quadratic.*extremes"):
        strategy_scores(X, "hardest")
    with pytest.raises(ValueError, match="valid strategies"):
        sample_weights(LOSSES, "hardest", 1.0)


# w = softmax((f - max f) / r) with f from test_strategy_scores_hand_worked.
HAND_WEIGHTS = {
    # r = 1: (f - 1) = [-1, -1/3, 0]; e^-1 = 0.36787944, e^(-1/3) = 0.71653131, e^0 = 1;
    #   sum 2.08441075 -> [0.1764909, 0.3437573, 0.4797519]
    ("linupper", 1.0): [0.1764909, 0.3437573, 0.4797519],
    # r = 0.4: (f - 1) / 0.4 = [-2.5, -5/6, 0]; e^-2.5 = 0.08208500, e^(-5/6) = 0.43459821, 1;
    #   sum 1.51668321 -> [0.0541214, 0.2865451, 0.6593335]
    ("linupper", 0.4): [0.0541214, 0.2865451, 0.6593335],
    # r = 1: (f - 8/9) = [-8/9, 0, -8/9]; e^(-8/9) = 0.41111229; sum 1 + 2 x 0.41111229
    #   = 1.82222458 -> [0.2256101, 0.5487798, 0.2256101]
    ("quadratic", 1.0): [0.2256101, 0.5487798, 0.2256101],
    # r = 0.4: (f - 8/9) / 0.4 = [-20/9, 0, -20/9]; e^(-20/9) = 0.10836802;
    #   sum 1.21673605 -> [0.0890645, 0.8218709, 0.0890645]
    ("quadratic", 0.4): [0.0890645, 0.8218709, 0.0890645],
    # r = 1: (f - 1) = [0, -2/3, 0]; e^(-2/3) = 0.51341712; sum 2.51341712
    #   -> [0.3978647, 0.2042706, 0.3978647]
    ("extremes", 1.0): [0.3978647, 0.2042706, 0.3978647],
    # r = 0.4: (f - 1) / 0.4 = [0, -5/3, 0]; e^(-5/3) = 0.18887560; sum 2.18887560
    #   -> [0.4568556, 0.0862889, 0.4568556]
    ("extremes", 0.4): [0.4568556, 0.0862889, 0.4568556],
}


@pytest.mark.parametrize(("strategy", "temperature"), list(HAND_WEIGHTS))
def test_weights_hand_worked(strategy: str, temperature: float) -> None:
    w = sample_weights(LOSSES, strategy, temperature)
    assert_close(w, torch.tensor(HAND_WEIGHTS[(strategy, temperature)]), **TOL)
    assert_close(w.sum(), torch.tensor(1.0), **TOL)


@pytest.mark.parametrize("strategy", REWEIGHT_STRATEGIES)
@pytest.mark.parametrize("temperature", [0.05, 0.4, 1.0, 10.0])
def test_weights_sum_to_one_on_random_losses(strategy: str, temperature: float) -> None:
    losses = torch.rand(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = sample_weights(losses * 5, strategy, temperature)
    assert w.shape == (37,) and w.dtype == torch.float64
    assert torch.all(w > 0)
    assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)


def test_uniform_is_exactly_one_over_n_in_the_losses_dtype() -> None:
    assert torch.equal(sample_weights(LOSSES, "uniform", 1.0), torch.full((3,), 1 / 3))
    w64 = sample_weights(LOSSES.double(), "uniform", 0.4)
    assert torch.equal(w64, torch.full((3,), 1 / 3, dtype=torch.float64))
    # one sample: weight 1 for every strategy (softmax of a single score)
    for strategy in REWEIGHT_STRATEGIES:
        assert torch.equal(sample_weights(torch.tensor([2.5]), strategy, 1.0), torch.ones(1))


def test_large_temperature_gives_near_uniform() -> None:
    # r = 1e6: exponents (f - max f) / r lie in [-1e-6, 0], so w = 1/3 within ~1e-6
    for strategy in ("linupper", "quadratic", "extremes"):
        near = sample_weights(LOSSES, strategy, 1e6)
        assert_close(near, torch.full((3,), 1 / 3), rtol=1e-5, atol=0)


def test_linupper_down_weights_low_loss_samples() -> None:
    losses = torch.tensor([0.3, 2.0, 0.1, 1.2, 3.5])
    w = sample_weights(losses, "linupper", 0.4)
    # midpoint (0.1 + 3.5) / 2 = 1.8: below it x < 0 and f = x + 1 rises with the loss;
    # at or above it f = min(x + 1, 1) = 1 saturates, so 2.0 and 3.5 share the top weight
    order = torch.argsort(losses)  # 0.1, 0.3, 1.2, 2.0, 3.5
    assert torch.all(torch.diff(w[order][:4]) > 0)  # strictly rising up to the midpoint
    assert_close(w[1], w[4], **TOL)
    assert int(w.argmin()) == 2  # the easiest sample gets the lowest weight


def test_weights_never_carry_gradient() -> None:
    losses = LOSSES.clone().requires_grad_(True)
    for strategy in REWEIGHT_STRATEGIES:
        w = sample_weights(losses, strategy, 0.4)
        assert not w.requires_grad and w.grad_fn is None


def test_weight_errors() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            sample_weights(LOSSES, "linupper", bad)
    with pytest.raises(ValueError, match="no samples"):
        sample_weights(torch.zeros(0), "linupper", 1.0)
    with pytest.raises(ValueError, match="NaN"):
        sample_weights(torch.tensor([1.0, float("nan")]), "linupper", 1.0)
    with pytest.raises(ValueError, match="NaN"):  # even though uniform ignores the values
        sample_weights(torch.tensor([1.0, float("nan")]), "uniform", 1.0)
    with pytest.raises(ValueError, match="inf"):
        sample_weights(torch.tensor([1.0, float("inf")]), "extremes", 1.0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        sample_weights(torch.ones(2, 3), "linupper", 1.0)


def test_weighted_token_loss_hand_worked_with_gradient() -> None:
    # l = [1, 2, 4], n = [2, 1, 3] (total 6), w = [0.5, 0.25, 0.25], N = 3:
    #   3 x (0.5 x 2/6 x 1 + 0.25 x 1/6 x 2 + 0.25 x 3/6 x 4)
    #   = 3 x (1/6 + 1/12 + 1/2) = 3 x 3/4 = 2.25
    # d/dl_i = N w_i n_i / total = 3 x [0.5 x 2, 0.25 x 1, 0.25 x 3] / 6 = [0.5, 0.125, 0.375]
    per_sample = LOSSES.clone().requires_grad_(True)
    w = torch.tensor([0.5, 0.25, 0.25], requires_grad=True)
    loss = weighted_token_loss(per_sample, torch.tensor([2, 1, 3]), w, 6.0, 3)
    assert loss.dim() == 0
    assert_close(loss, torch.tensor(2.25), **TOL)
    loss.backward()
    assert_close(per_sample.grad, torch.tensor([0.5, 0.125, 0.375]), **TOL)
    assert w.grad is None  # the weights are detached inside
    # total_tokens as a tensor gives the same
    same = weighted_token_loss(LOSSES, torch.tensor([2, 1, 3]), w, torch.tensor(6), 3)
    assert_close(same, torch.tensor(2.25), **TOL)


def test_weighted_token_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[B\]"):
        weighted_token_loss(LOSSES, torch.ones(3), torch.ones(3, 1), 3.0, 3)


def _random_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    loss_mat = torch.rand(6, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]] * 2)
    loss_mat[mask == 0] = float("nan")  # padding may hold anything
    return loss_mat.requires_grad_(True), mask


def test_uniform_weights_give_the_token_mean() -> None:
    loss_mat, mask = _random_batch()
    per_sample, counts = per_sample_token_mean(loss_mat, mask)
    total = float(counts.sum())  # 3 + 1 + 5 + 3 + 1 + 5 = 18
    assert total == 18.0
    w = sample_weights(per_sample, "uniform", 1.0)
    uniform = weighted_token_loss(per_sample, counts, w, total, 6)
    token_mean = torch.where(mask.bool(), loss_mat, 0).sum() / mask.sum()
    assert_close(uniform, token_mean, rtol=1e-6, atol=0)


def test_slices_add_up_and_gradient_reaches_only_valid_tokens() -> None:
    loss_mat, mask = _random_batch()
    per_sample, counts = per_sample_token_mean(loss_mat, mask)
    total = float(counts.sum())
    w = sample_weights(per_sample, "linupper", 0.4)  # per_sample requires grad here
    assert per_sample.requires_grad and not w.requires_grad
    whole = weighted_token_loss(per_sample, counts, w, total, 6)
    # micro-batches of the same global batch: totals stay the global ones
    parts = [
        weighted_token_loss(*per_sample_token_mean(loss_mat[s], mask[s]), w[s], total, 6)
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    ]
    assert_close(sum(parts), whole, **TOL)
    (grad,) = torch.autograd.grad(whole, loss_mat)
    # d whole / d loss_mat[i, t] = N w_i (n_i / total) (1 / n_i) = 6 w_i / 18 on valid tokens
    expected = torch.where(mask.bool(), (6 * w / 18)[:, None].expand(6, 5), 0.0)
    assert_close(grad, expected, **TOL)
    assert torch.all(grad[mask == 0] == 0) and torch.isfinite(grad).all()


def test_per_sample_token_mean_hand_worked_and_padding_never_leaks() -> None:
    # row 0: mean(1, 3) = 2 over 2 tokens; row 1: 5 over 1 token; row 2: no tokens -> 0, 0
    nan, inf = float("nan"), float("inf")
    loss_mat = torch.tensor([[1.0, 3.0, nan], [inf, 5.0, nan], [nan, inf, -inf]])
    mask = torch.tensor([[True, True, False], [False, True, False], [False, False, False]])
    loss_mat.requires_grad_(True)
    per_sample, counts = per_sample_token_mean(loss_mat, mask)
    assert torch.equal(per_sample.detach(), torch.tensor([2.0, 5.0, 0.0]))
    assert torch.equal(counts, torch.tensor([2.0, 1.0, 0.0]))
    per_sample.sum().backward()
    # d mean_i / d l_it = 1 / n_i on valid tokens: row 0 -> 1/2 each, row 1 -> 1, else 0
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(loss_mat.grad, expected)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        per_sample_token_mean(torch.zeros(2, 3), torch.ones(2, 4))


def test_in_warmup() -> None:
    # steps count from 0: with 2 warm-up steps, steps 0 and 1 are uniform, step 2 is not
    assert in_warmup(0, 2) and in_warmup(1, 2)
    assert not in_warmup(2, 2) and not in_warmup(3, 2)
    assert not in_warmup(0, 0)  # no warm-up at all
