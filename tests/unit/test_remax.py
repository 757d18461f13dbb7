"""ReMax: the estimator, the REINFORCE loss and the graph, against hand-worked numbers;
plus the group baselines reading the KL-shaped return."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.advantages import AdvantageInput, get_estimator
from algos.graph import CallKind
from algos.ppo import ALGORITHM_GRAPHS, ppo_rollout_advantages, remax_graph
from tests.reductions import reinforce_loss

TOL = dict(rtol=1e-5, atol=1e-6)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# d = logp - ref_logp per token; row 1's padded token holds junk that must not leak
LOGP = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, 9.0]])
REF = torch.zeros(2, 3)
SCORES = torch.tensor([1.0, 0.2])
BASELINE = torch.tensor([0.5, 0.9])


def remax_returns(
    gamma: float, scores: torch.Tensor = SCORES, estimator: str = "remax_reference"
) -> torch.Tensor:
    adv, ret, _ = ppo_rollout_advantages(
        LOGP,
        REF,
        torch.zeros(2, 3),
        scores,
        MASK,
        kl_coef=0.1,
        kl_estimator="k1",
        reward_clip=5.0,
        estimator=estimator,
        gamma=gamma,
        lam=1.0,
        whiten=False,
        baseline_scores=BASELINE,
    )
    assert_close(adv, ret, **TOL)
    return adv


def test_remax_return_discounts_the_outcome_and_keeps_each_tokens_own_kl() -> None:
    # outcome s = r - r_greedy = [1.0 - 0.5, 0.2 - 0.9] = [0.5, -0.7]; beta = 0.1, gamma = 0.9
    # G_t = gamma^(last - t) * s - beta * d_t
    # row 0 (last = 2): t0 0.81*0.5 - 0.01 = 0.395; t1 0.9*0.5 + 0.02 = 0.47; t2 0.5 - 0.03 = 0.47
    # row 1 (last = 1): t0 0.9*(-0.7) - 0.04 = -0.67; t1 -0.7 - 0 = -0.7; t2 padding = 0
    expected = torch.tensor([[0.395, 0.47, 0.47], [-0.67, -0.7, 0.0]])
    assert_close(remax_returns(0.9), expected, **TOL)


def test_remax_gamma_one_gives_every_token_the_whole_outcome() -> None:
    # row 0: 0.5 - 0.1 * [0.1, -0.2, 0.3] = [0.49, 0.52, 0.47]; row 1: -0.7 - 0.1 * [0.4, 0]
    expected = torch.tensor([[0.49, 0.52, 0.47], [-0.74, -0.7, 0.0]])
    assert_close(remax_returns(1.0), expected, **TOL)


def test_remax_outcome_is_clipped_to_five() -> None:
    # r - r_greedy = [9.5 - 0.5, -9.1 - 0.9] = [9, -10] -> clipped to [5, -5]
    g = remax_returns(1.0, torch.tensor([9.5, -9.1]))
    assert_close(g[:, -2], torch.tensor([5.0 + 0.02, -5.0]), **TOL)


def test_remax_estimator_needs_the_outcome() -> None:
    for name in ("remax", "remax_reference"):
        with pytest.raises(ValueError, match="scores"):
            get_estimator(name)(AdvantageInput(torch.zeros(2, 2), torch.ones(2, 2)))


def test_remax_default_gives_each_token_the_kl_to_go() -> None:
    """r = 1, baseline 0, beta = 0.1, k1 = [0.5, 0.5]: the per-token rewards are
    [-0.05, -0.05 + 1]; their sums to the end are [0.90, 0.95] (the reference code's
    form gives [0.95, 0.95])."""
    logp, ref, mask = torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2), torch.ones(1, 2)
    common = dict(kl_coef=0.1, kl_estimator="k1", reward_clip=5.0, gamma=1.0, lam=1.0,
                  whiten=False, baseline_scores=torch.zeros(1))  # fmt: skip
    args = (logp, ref, torch.zeros(1, 2), torch.ones(1), mask)
    to_go, _, _ = ppo_rollout_advantages(*args, estimator="remax", **common)
    own, _, _ = ppo_rollout_advantages(*args, estimator="remax_reference", **common)
    assert_close(to_go, torch.tensor([[0.90, 0.95]]), **TOL)
    assert_close(own, torch.tensor([[0.95, 0.95]]), **TOL)


def test_remax_default_discounts_the_rewards_to_go() -> None:
    # rt row 0 = -0.1 d + [0, 0, 0.5] = [-0.01, 0.02, 0.47]; gamma 0.9:
    # G2 = 0.47, G1 = 0.02 + 0.9 * 0.47 = 0.443, G0 = -0.01 + 0.9 * 0.443 = 0.3887
    # row 1 (last = 1): rt = [-0.04, -0.7]: G1 = -0.7, G0 = -0.04 - 0.63 = -0.67
    expected = torch.tensor([[0.3887, 0.443, 0.47], [-0.67, -0.7, 0.0]])
    assert_close(remax_returns(0.9, estimator="remax"), expected, **TOL)


def test_reinforce_loss_hand_worked() -> None:
    g = torch.tensor([[0.395, 0.47, 0.47], [-0.67, -0.7, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.4, float("nan")]], requires_grad=True)
    loss, m = reinforce_loss(lp, g, MASK)
    # sum of G * lp over valid tokens:
    # -0.395 - 0.94 - 0.235 + 0.201 + 0.28 = -1.089; loss = -(-1.089) / 5 tokens = 0.2178
    assert_close(loss, torch.tensor(0.2178), **TOL)
    loss.backward()
    # d loss / d lp = -G / 5 on valid tokens, 0 on padding (even where lp is NaN)
    assert_close(lp.grad, -g / 5 * MASK, **TOL)
    assert m["return_mean"] == pytest.approx((0.395 + 0.47 + 0.47 - 0.67 - 0.7) / 5)


def test_remax_graph_has_no_critic_and_two_independent_generations() -> None:
    g = remax_graph()
    assert set(g.roles) == {"actor", "ref", "reward"}
    gens = [c.name for c in g.calls if c.kind is CallKind.GENERATE]
    assert sorted(gens) == ["actor_gen", "actor_greedy_gen"]
    # both generations are ready at the start: they can run concurrently
    assert {c.name for c in g.ready(set(), set())} == set(gens)
    assert list(g.parents(g.call("reward_greedy_inf"))) == ["actor_greedy_gen"]
    assert g.call("actor_greedy_gen").inputs == ("unique_prompt_ids", "unique_prompt_mask")
    assert g.call("actor_greedy_gen").options["greedy"] is True
    assert "baseline_scores" in g.call("actor_train").inputs
    assert ALGORITHM_GRAPHS["remax"]().name == "remax"


def test_group_baselines_see_the_kl_penalty_in_the_reward() -> None:
    # one group of two: scores [1, 0]; d row sums [0.2, -0.4] with beta 0.5
    # returns: 1 - 0.5 * 0.2 = 0.9 and 0 + 0.5 * 0.4 = 0.2; RLOO: 0.9 - 0.2 = 0.7, -0.7
    logp = torch.tensor([[0.1, 0.1], [-0.4, 0.0]])
    adv, _, _ = ppo_rollout_advantages(
        logp,
        torch.zeros(2, 2),
        torch.zeros(2, 2),
        torch.tensor([1.0, 0.0]),
        torch.ones(2, 2),
        kl_coef=0.5,
        kl_estimator="k1",
        reward_clip=10.0,
        estimator="rloo",
        gamma=1.0,
        lam=1.0,
        whiten=False,
        group_ids=torch.tensor([0, 0]),
    )
    assert_close(adv, torch.tensor([[0.7, 0.7], [-0.7, -0.7]]), **TOL)
