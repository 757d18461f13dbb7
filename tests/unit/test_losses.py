"""Losses and reductions against hand-worked numbers (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algos.losses import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    value_loss,
)
from tests.reductions import policy_loss

TOL = dict(rtol=1e-5, atol=1e-6)
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def t(v: float) -> torch.Tensor:
    return torch.tensor(v)


# ---------------------------------------------------------------- masked reductions


def test_masked_sum() -> None:
    # valid entries 1, 2 | 4: total 7; per row (1 + 2, 4) = (3, 4)
    assert_close(masked_sum(X, M), t(7.0), **TOL)
    assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]), **TOL)
    # per column: (1 + 4, 2, 0)
    assert_close(masked_sum(X, M, dim=0), torch.tensor([5.0, 2.0, 0.0]), **TOL)


def test_masked_mean_and_var() -> None:
    # valid entries 1, 2, 4: mean 7/3
    assert_close(masked_mean(X, M), t(7 / 3), **TOL)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; / 3 = 14/9
    assert_close(masked_var(X, M), t(14 / 9), **TOL)
    # unbiased: 42/9 / 2 = 7/3
    assert_close(masked_var(X, M, unbiased=True), t(7 / 3), **TOL)
    # per-row mean: row 0 (1+2)/2 = 1.5, row 1 4/1 = 4
    assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]), **TOL)
    # a bool mask is the same mask
    assert_close(masked_mean(X, M.bool()), t(7 / 3), **TOL)


def test_all_padding_reductions_are_zero() -> None:
    none = torch.zeros(2, 3)
    assert_close(masked_mean(X, none), t(0.0), **TOL)
    assert_close(masked_var(X, none), t(0.0), **TOL)
    # row 1 has no valid token: its mean is 0, not nan; row 0 = (1 + 2 + 3) / 3 = 2
    rows = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert_close(masked_mean(X, rows, dim=-1), torch.tensor([2.0, 0.0]), **TOL)


def test_masked_whiten() -> None:
    w = masked_whiten(X, M)
    # (1 - 7/3) / sqrt(14/9) = -4/sqrt(14); (2 - 7/3)/sqrt(14/9) = -1/sqrt(14); (4-7/3).. = 5/sqrt(14)
    s = math.sqrt(14)
    expected = torch.tensor([[-4 / s, -1 / s, 0.0], [5 / s, 0.0, 0.0]])
    assert_close(w, expected, **TOL)
    # over valid tokens: mean (-4 - 1 + 5) / 3 / s = 0; var (16 + 1 + 25) / 3 / 14 = 1
    assert_close(masked_mean(w, M), t(0.0), **TOL)
    assert_close(masked_var(w, M), t(1.0), **TOL)


def test_masked_whiten_scale_only() -> None:
    w = masked_whiten(X, M, shift_mean=False)
    # the mean 7/3 is added back on valid tokens; padding stays 0
    s, mu = math.sqrt(14), 7 / 3
    expected = torch.tensor([[-4 / s + mu, -1 / s + mu, 0.0], [5 / s + mu, 0.0, 0.0]])
    assert_close(w, expected, **TOL)


# ---------------------------------------------------------------- aggregation


def test_aggregation_modes() -> None:
    # token-mean: (1 + 2 + 4) / 3
    assert_close(aggregate_loss(X, M, "token-mean"), t(7 / 3), **TOL)
    # seq-mean-token-mean: mean(1.5, 4) = 2.75
    assert_close(aggregate_loss(X, M, "seq-mean-token-mean"), t(2.75), **TOL)
    # seq-mean-token-sum: mean(1 + 2, 4) = 3.5
    assert_close(aggregate_loss(X, M, "seq-mean-token-sum"), t(3.5), **TOL)


def test_aggregation_unknown_mode_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'") as err:
        aggregate_loss(X, M, "mean")
    for mode in LOSS_AGG_MODES:
        assert mode in str(err.value)


def test_aggregation_of_an_all_padding_batch_is_zero() -> None:
    # no valid token anywhere: every mode gives 0 (counts clamped to 1), never nan
    for mode in LOSS_AGG_MODES:
        assert_close(aggregate_loss(X, torch.zeros(2, 3), mode), t(0.0), **TOL)


def test_seq_mean_token_mean_skips_rows_without_tokens() -> None:
    x3 = torch.cat([X, torch.tensor([[7.0, 8.0, 9.0]])])
    m3 = torch.cat([M, torch.zeros(1, 3, dtype=torch.long)])
    # the empty third row is left out: still mean(1.5, 4) = 2.75; token-mean still 7/3
    assert_close(aggregate_loss(x3, m3, "seq-mean-token-mean"), t(2.75), **TOL)
    assert_close(aggregate_loss(x3, m3, "token-mean"), t(7 / 3), **TOL)


# ---------------------------------------------------------------- entropy and log-probs


@pytest.mark.parametrize("vocab", [2, 4, 7, 1000])
def test_entropy_uniform_is_log_v(vocab: int) -> None:
    # any constant logits give the uniform distribution: H = ln V
    logits = torch.full((2, 3, vocab), 1.7)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(vocab)), **TOL)


def test_entropy_two_tokens_by_hand() -> None:
    # logits (0, ln 3) -> p = (1/4, 3/4): H = 1/4 ln 4 + 3/4 ln(4/3) = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3)]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351446]]), **TOL)
    # logits (1, 0): logsumexp = ln(1 + e) = 1.3132617; sum p z = e / (1 + e) = 0.7310586;
    # H = 1.3132617 - 0.7310586 = 0.5822031; a shift of all logits by 5 changes nothing
    logits = torch.tensor([[[1.0, 0.0], [6.0, 5.0]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[0.5822031089, 0.5822031089]]), **TOL)


def test_entropy_is_fp32_for_bf16_logits() -> None:
    logits = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32
    assert_close(h, torch.full((1, 2), math.log(8)), **TOL)


def test_logprobs_from_logits() -> None:
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    # token 1 under (1/4, 3/4): ln 3/4; token 0 under (1/2, 1/2): ln 1/2
    lp = logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.5)]]), **TOL)
    # logits (ln 1, ln 2, ln 5) -> p = (1/8, 2/8, 5/8); tokens 2, 0 -> ln 5/8, ln 1/8
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]]))
    lp = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    assert_close(lp, torch.tensor([[math.log(5 / 8), math.log(1 / 8)]]), **TOL)


def test_logprobs_match_log_softmax_and_are_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 4
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert_close(logprobs_from_logits(logits, tokens), expected, **TOL)
    # bf16 logits are read in fp32: zeros over 8 tokens -> every log-prob is ln 1/8
    lp = logprobs_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.tensor([[3, 7]]))
    assert lp.dtype == torch.float32
    assert_close(lp, torch.full((1, 2), -math.log(8)), **TOL)


# ---------------------------------------------------------------- policy loss


def one_token(rho: float, adv: float) -> tuple[torch.Tensor, ...]:
    """logp = ln rho, old_logp = 0, so the ratio is rho; a second, padded token holds garbage."""
    logp = torch.tensor([[math.log(rho), 7.0]], requires_grad=True)
    return logp, torch.tensor([[0.0, -7.0]]), torch.tensor([[adv, -50.0]]), torch.tensor([[1, 0]])


# eps = 0.2 on both sides, dual clip c = 3. Columns: rho, A, L, clip_frac, dual_clip_frac,
# dL/dlogp (= -rho A where the unclipped term is taken, else 0).
POLICY_CASES = {
    # A > 0, rho inside the band: min(1.1 * 2, 1.1 * 2) = 2.2 -> L = -2.2
    "unclipped A>0": (1.1, 2.0, -2.2, 0.0, 0.0, -2.2),
    # A < 0, rho inside the band: min(0.9 * -2, 0.9 * -2) = -1.8 -> L = 1.8; dual min(1.8, 6)
    "unclipped A<0": (0.9, -2.0, 1.8, 0.0, 0.0, 1.8),
    # A > 0, rho above 1.2: min(1.5 * 2 = 3, 1.2 * 2 = 2.4) = 2.4 -> L = -2.4, clipped
    "clipped A>0": (1.5, 2.0, -2.4, 1.0, 0.0, 0.0),
    # A > 0, rho below 0.8: min(0.5 * 2 = 1, 0.8 * 2 = 1.6) = 1 -> L = -1, not clipped
    "low ratio A>0 keeps gradient": (0.5, 2.0, -1.0, 0.0, 0.0, -1.0),
    # A < 0, rho below 0.8: min(0.5 * -2 = -1, 0.8 * -2 = -1.6) = -1.6 -> L = 1.6, clipped
    "clipped A<0": (0.5, -2.0, 1.6, 1.0, 0.0, 0.0),
    # A < 0, rho above 1.2 but below c: min(-3, -2.4) = -3 -> L = 3; dual min(3, 6) = 3
    "high ratio A<0 keeps gradient": (1.5, -2.0, 3.0, 0.0, 0.0, 3.0),
    # A < 0, rho = 4 > c: min(-8, -2.4) = -8 -> L = 8; dual min(8, -3 * -2 = 6) = 6
    "dual clip A<0": (4.0, -2.0, 6.0, 0.0, 1.0, 0.0),
}


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_loss_single_token(case: str) -> None:
    rho, adv, expected, clip_frac, dual_frac, grad = POLICY_CASES[case]
    logp, old, a, mask = one_token(rho, adv)
    loss, m = policy_loss(logp, old, a, mask, 0.2, 0.2, 3.0, "token-mean")
    assert_close(loss, t(expected), **TOL)
    assert m["clip_frac"] == clip_frac
    assert m["dual_clip_frac"] == dual_frac
    # approx_kl = mean(old - new) = -ln rho over the one valid token
    assert m["approx_kl"] == pytest.approx(-math.log(rho), rel=1e-5, abs=1e-6)
    loss.backward()
    # the padded token gets no gradient
    assert_close(logp.grad, torch.tensor([[grad, 0.0]]), **TOL)


def test_policy_loss_dual_clip_off() -> None:
    logp, old, a, mask = one_token(4.0, -2.0)
    loss, m = policy_loss(logp, old, a, mask, 0.2, 0.2, None, "token-mean")
    # without the dual clip the loss is -min(-8, -2.4) = 8
    assert_close(loss, t(8.0), **TOL)
    assert m["dual_clip_frac"] == 0.0


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
    # the importance weight's mean over the valid tokens (the padded 9.0 left out)
    assert m["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 5.0) / 4, rel=1e-5)


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


def two_rows() -> tuple[torch.Tensor, ...]:
    # row 0: rho 1.1 and 1.5 with A = 2; row 1: rho 4 with A = -2, then a padded token
    new = torch.log(torch.tensor([[1.1, 1.5], [4.0, 3.0]]))
    adv = torch.tensor([[2.0, 2.0], [-2.0, 9.0]])
    return new, torch.zeros(2, 2), adv, torch.tensor([[1, 1], [1, 0]])


def test_policy_loss_aggregation_modes() -> None:
    new, old, adv, mask = two_rows()
    # L = (-2.2, -2.4 | 6): see POLICY_CASES
    by_mode = {
        "token-mean": (-2.2 - 2.4 + 6.0) / 3,  # 1.4 / 3 = 0.4666667
        "seq-mean-token-mean": ((-2.2 - 2.4) / 2 + 6.0) / 2,  # (-2.3 + 6) / 2 = 1.85
        "seq-mean-token-sum": ((-2.2 - 2.4) + 6.0) / 2,  # (-4.6 + 6) / 2 = 0.7
    }
    for mode, expected in by_mode.items():
        loss, m = policy_loss(new, old, adv, mask, 0.2, 0.2, 3.0, mode)
        assert_close(loss, t(expected), **TOL)
        # one of three valid tokens clipped (rho 1.5), one dual-clipped (rho 4)
        assert m["clip_frac"] == pytest.approx(1 / 3, rel=1e-6)
        assert m["dual_clip_frac"] == pytest.approx(1 / 3, rel=1e-6)
        # approx_kl = -(ln 1.1 + ln 1.5 + ln 4) / 3 = -ln 6.6 / 3 = -0.62902322
        assert m["approx_kl"] == pytest.approx(-0.6290232163, rel=1e-5)


def test_policy_loss_ratio_is_clamped() -> None:
    # logp - old = 100 -> rho = exp(20) = 4.8516520e8, not exp(100) = inf in fp32;
    # A = -1, no dual clip: L = -min(-exp(20), -1.2) = exp(20)
    loss, _ = policy_loss(
        torch.tensor([[100.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1),
        0.2, 0.2, None, "token-mean",
    )  # fmt: skip
    assert torch.isfinite(loss)
    assert_close(loss, t(math.exp(20)), **TOL)


# ---------------------------------------------------------------- value loss


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
    # seq-mean-token-sum of the one row: 0.5 + 0.32 = 0.82
    summed, _ = value_loss(v, v_old, ret, mask, 0.2, "seq-mean-token-sum")
    assert_close(summed, t(0.82), **TOL)
    unclipped, m2 = value_loss(v, v_old, ret, mask, None, "token-mean")
    # 0.5 * (1 + 0.01) / 2 = 0.2525
    assert_close(unclipped, t(0.2525), **TOL)
    assert m2["value_clip_frac"] == 0.0


def test_value_loss_clips_downward_moves() -> None:
    v, v_old, ret, mask = (torch.tensor([[x]]) for x in (-1.0, 0.0, -2.0, 1))
    # unclipped (-1 + 2)^2 = 1; clipped V = 0 + clip(-1, -0.2, 0.2) = -0.2 -> (1.8)^2 = 3.24
    # 0.5 * max(1, 3.24) = 1.62, and the clipped term was the larger one
    loss, m = value_loss(v, v_old, ret, mask, 0.2, "token-mean")
    assert_close(loss, t(1.62), **TOL)
    assert m["value_clip_frac"] == 1.0
    # eps_v = 0.5: clipped V = -0.5 -> 1.5^2 = 2.25 -> 0.5 * 2.25 = 1.125
    loss, _ = value_loss(v, v_old, ret, mask, 0.5, "token-mean")
    assert_close(loss, t(1.125), **TOL)
    # no clipping: 0.5 * 1 = 0.5
    loss, m = value_loss(v, v_old, ret, mask, None, "token-mean")
    assert_close(loss, t(0.5), **TOL)
    assert m["value_clip_frac"] == 0.0


# ---------------------------------------------------------------- explained variance


def test_explained_variance() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    r = torch.tensor([[1.0, 2.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # R - V = (0, 0, 1): var 2/9; Var(R) of (1, 2, 4) = 14/9 -> 1 - (2/9) / (14/9 + 1e-5)
    assert explained_variance(v, r, mask) == pytest.approx(1 - (2 / 9) / (14 / 9 + 1e-5), rel=1e-6)
    # perfect values: Var(R - V) = 0 -> exactly 1
    assert explained_variance(r, r, mask) == pytest.approx(1.0, abs=1e-7)
    # V = R / 2: Var(R - V) = Var(R) / 4 = 14/36 -> 1 - (14/36) / (14/9 + 1e-5) = 0.7500016
    half = explained_variance(r / 2, r, mask)
    assert half == pytest.approx(1 - (14 / 36) / (14 / 9 + 1e-5), rel=1e-5)


# ---------------------------------------------------------------- padding never contributes


def test_padding_never_contributes_to_reductions() -> None:
    garbage = X.clone()
    garbage[M == 0] = 1e6
    for mode in LOSS_AGG_MODES:
        assert_close(aggregate_loss(garbage, M, mode), aggregate_loss(X, M, mode), **TOL)
    assert_close(masked_sum(garbage, M), masked_sum(X, M), **TOL)
    assert_close(masked_mean(garbage, M, dim=-1), masked_mean(X, M, dim=-1), **TOL)
    assert_close(masked_var(garbage, M), masked_var(X, M), **TOL)
    assert_close(masked_whiten(garbage, M), masked_whiten(X, M), **TOL)


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n = 4, 6
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    return {
        "mask": mask,
        "logp": -torch.rand(b, n, generator=g) * 3,
        "old_logp": -torch.rand(b, n, generator=g) * 3,
        "adv": torch.randn(b, n, generator=g),
        "values": torch.randn(b, n, generator=g),
        "old_values": torch.randn(b, n, generator=g),
        "returns": torch.randn(b, n, generator=g),
        "logits": torch.randn(b, n, 11, generator=g),
    }


def corrupt_padding(batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = batch["mask"] == 0
    out = {"mask": batch["mask"]}
    for k, x in batch.items():
        if k == "mask":
            continue
        noise = torch.randn(x.shape, generator=g) * 40
        keep = ~pad if x.dim() == 2 else ~pad[..., None]
        out[k] = torch.where(keep, x, noise)
    return out


def all_results(b: dict[str, torch.Tensor], mode: str) -> dict[str, object]:
    pl, pm = policy_loss(b["logp"], b["old_logp"], b["adv"], b["mask"], 0.2, 0.28, 3.0, mode)
    vl, vm = value_loss(b["values"], b["old_values"], b["returns"], b["mask"], 0.2, mode)
    ent = aggregate_loss(entropy_from_logits(b["logits"]), b["mask"], mode)
    return {
        "policy_loss": pl,
        **{f"policy/{k}": v for k, v in pm.items()},
        "value_loss": vl,
        **{f"value/{k}": v for k, v in vm.items()},
        "entropy": ent,
        "explained_variance": explained_variance(b["values"], b["returns"], b["mask"]),
        "adv_whitened": masked_whiten(b["adv"], b["mask"]),
        "adv_var": masked_var(b["adv"], b["mask"]),
    }


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_padded_values_change_no_result(mode: str) -> None:
    clean = random_batch(0)
    dirty = corrupt_padding(clean, 1)
    assert not torch.equal(dirty["logp"], clean["logp"])  # the padding really changed
    a, b = all_results(clean, mode), all_results(dirty, mode)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert_close(b[k], a[k], **TOL, msg=k)
        else:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_padded_tokens_get_no_gradient() -> None:
    b = corrupt_padding(random_batch(2), 3)
    logp = b["logp"].clone().requires_grad_(True)
    values = b["values"].clone().requires_grad_(True)
    pl, _ = policy_loss(logp, b["old_logp"], b["adv"], b["mask"])
    vl, _ = value_loss(values, b["old_values"], b["returns"], b["mask"])
    (pl + vl).backward()
    pad = b["mask"] == 0
    assert pad.any()
    assert torch.all(logp.grad[pad] == 0) and torch.all(values.grad[pad] == 0)
    assert logp.grad[~pad].abs().sum() > 0 and values.grad[~pad].abs().sum() > 0


def test_nan_in_padding_stays_out() -> None:
    x = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]])
    m = torch.tensor([[1, 0], [1, 0]])
    assert_close(masked_mean(x, m), torch.tensor(1.5), rtol=1e-6, atol=1e-6)
    assert_close(masked_var(x, m), torch.tensor(0.25), rtol=1e-6, atol=1e-6)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.isfinite(aggregate_loss(x, m, mode))


def test_seq_mean_token_sum_skips_empty_rows() -> None:
    x = torch.tensor([[1.0, 2.0], [5.0, 5.0]])
    m = torch.tensor([[1, 1], [0, 0]])
    # only row 0 has valid tokens: its sum 3; an all-padding row does not dilute it
    assert_close(
        aggregate_loss(x, m, "seq-mean-token-sum"), torch.tensor(3.0), rtol=1e-6, atol=1e-6
    )


def test_bradley_terry_hand_worked() -> None:
    from algos.losses import bradley_terry_loss

    chosen = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.5, 1.0, 1.0])
    loss, margin = bradley_terry_loss(chosen, rejected)
    # margins [0, 1, -2]: -log sigmoid(0) = ln 2 = 0.6931472; -log sigmoid(1) = ln(1 + e^-1)
    # = 0.3132617; -log sigmoid(-2) = ln(1 + e^2) = 2.1269280
    assert_close(margin, torch.tensor([0.0, 1.0, -2.0]), rtol=1e-6, atol=0)
    assert_close(loss, torch.tensor([0.6931472, 0.3132617, 2.1269280]), rtol=1e-6, atol=0)
    loss.sum().backward()
    # d/dr_c -log sigmoid(r_c - r_r) = -sigmoid(-margin) = [-0.5, -0.2689414, -0.8807971]
    assert_close(chosen.grad, torch.tensor([-0.5, -0.2689414, -0.8807971]), rtol=1e-6, atol=0)
    big, _ = bradley_terry_loss(torch.tensor([200.0]), torch.tensor([-200.0]))
    assert big.item() == 0.0 and math.isfinite(
        bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))[0].item()
    )
