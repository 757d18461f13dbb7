"""The rollout math shared by PPO's two train calls."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.advantages import gae_reference
from algos.losses import masked_mean, masked_var
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
    # k1 = lp - ref = (-1 + 1.5, -2 + 2) = (0.5, 0); rt = (-0.1 * 0.5, 0 + score 1) = (-0.05, 1.0)
    # t=1: delta = 1 + 0 - 0.4 = 0.6;               A1 = 0.6
    # t=0: delta = -0.05 + 0.4 - 0.2 = 0.15;        A0 = 0.15 + 1 * 1 * 0.6 = 0.75
    assert_close(adv, torch.tensor([[0.75, 0.6]]), **TOL)
    # R = A + V = (0.75 + 0.2, 0.6 + 0.4) = (0.95, 1.0)
    assert_close(ret, torch.tensor([[0.95, 1.0]]), **TOL)
    # KL token mean (0.5 + 0) / 2 = 0.25; per-sequence sum 0.5
    assert m["rollout/kl_to_ref_token_mean"] == pytest.approx(0.25, rel=1e-6)
    assert m["rollout/kl_to_ref_seq_sum"] == pytest.approx(0.5, rel=1e-6)
    # raw advantage mean (0.75 + 0.6) / 2 = 0.675; returns (0.95 + 1) / 2 = 0.975;
    # values (0.2 + 0.4) / 2 = 0.3
    assert m["rollout/advantage_mean_raw"] == pytest.approx(0.675, rel=1e-6)
    assert m["rollout/return_mean"] == pytest.approx(0.975, rel=1e-6)
    assert m["rollout/value_mean"] == pytest.approx(0.3, rel=1e-6)


def test_whitened() -> None:
    adv, ret, m = rollout(whiten=True)
    # mean 0.675, population var ((0.075)^2 + (-0.075)^2) / 2 = 0.005625
    # -> (+-0.075) / sqrt(0.005625 + 1e-8) = +-0.99999911
    s = 0.075 / (0.005625 + 1e-8) ** 0.5
    assert_close(adv, torch.tensor([[s, -s]]), **TOL)
    assert_close(ret, torch.tensor([[0.95, 1.0]]), **TOL)  # returns are not whitened
    assert m["rollout/advantage_mean_raw"] == pytest.approx(0.675, rel=1e-6)  # before whitening


def random_rollout(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 7
    lengths = torch.tensor([7, 3, 1, 5, 6])
    return {
        "logprobs": -torch.rand(b, t, generator=g) * 4,
        "ref_logprobs": -torch.rand(b, t, generator=g) * 4,
        "values": torch.randn(b, t, generator=g),
        "scores": torch.randn(b, generator=g) * 8,  # some beyond the clip c = 5
        "mask": (torch.arange(t)[None] < lengths[:, None]).long(),
    }


def run(batch: dict[str, torch.Tensor], whiten: bool):
    return ppo_rollout_advantages(
        batch["logprobs"],
        batch["ref_logprobs"],
        batch["values"],
        batch["scores"],
        batch["mask"],
        kl_coef=0.05,
        kl_estimator="k1",
        reward_clip=5.0,
        estimator="gae",
        gamma=0.99,
        lam=0.95,
        whiten=whiten,
    )


def plain_loop_rollout(batch: dict[str, torch.Tensor]) -> tuple[list, list]:
    """k1 KL, shaped reward and GAE, token by token in plain Python."""
    rewards = []
    for lp, ref, score, m in zip(
        batch["logprobs"].tolist(),
        batch["ref_logprobs"].tolist(),
        batch["scores"].tolist(),
        batch["mask"].tolist(),
    ):
        last = max(i for i, x in enumerate(m) if x)
        row = []
        for i in range(len(m)):
            r = -0.05 * (lp[i] - ref[i]) if m[i] else 0.0
            if i == last:
                r += min(max(score, -5.0), 5.0)
            row.append(r)
        rewards.append(row)
    return gae_reference(
        rewards, batch["values"].tolist(), batch["mask"].tolist(), gamma=0.99, lam=0.95
    )


def test_random_batch_matches_the_plain_loop() -> None:
    batch = random_rollout(0)
    adv, ret, _ = run(batch, whiten=False)
    ref_adv, ref_ret = plain_loop_rollout(batch)
    assert_close(adv, torch.tensor(ref_adv), **TOL)
    assert_close(ret, torch.tensor(ref_ret), **TOL)


def test_whitened_has_zero_mean_unit_variance_over_valid_tokens() -> None:
    batch = random_rollout(1)
    adv, ret, _ = run(batch, whiten=True)
    mask = batch["mask"]
    assert_close(masked_mean(adv, mask), torch.tensor(0.0), **TOL)
    assert_close(masked_var(adv, mask), torch.tensor(1.0), **TOL)
    assert torch.all(adv[mask == 0] == 0)
    # returns are the estimator's, not whitened
    _, raw_ret, _ = run(batch, whiten=False)
    assert_close(ret, raw_ret, **TOL)


@pytest.mark.parametrize("whiten", [False, True])
def test_padded_values_change_nothing(whiten: bool) -> None:
    clean = random_rollout(2)
    pad = clean["mask"] == 0
    dirty = dict(clean)
    for k, fill in (("logprobs", -1e4), ("ref_logprobs", 50.0), ("values", 1e3)):
        dirty[k] = torch.where(pad, torch.full_like(clean[k], fill), clean[k])
    a_adv, a_ret, a_m = run(clean, whiten)
    b_adv, b_ret, b_m = run(dirty, whiten)
    assert_close(b_adv, a_adv, **TOL)
    assert_close(b_ret, a_ret, **TOL)
    for k in a_m:
        assert b_m[k] == pytest.approx(a_m[k], rel=1e-5, abs=1e-6), k
