"""Group-baseline estimators (GRPO, Dr. GRPO, RLOO) against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algos.advantages import AdvantageInput, get_estimator

TOL = dict(rtol=1e-5, atol=1e-6)
# two groups: prompt 0 with rewards (1, 0, 0, 1), prompt 1 with a single sample (0.5)
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5])
GROUPS = torch.tensor([0, 0, 0, 0, 1])
MASK = torch.tensor([[1, 1, 0]] * 4 + [[1, 0, 0]])


def run(name: str) -> torch.Tensor:
    inp = AdvantageInput(torch.zeros(5, 3), MASK, scores=SCORES, group_ids=GROUPS)
    adv, ret = get_estimator(name)(inp)
    assert_close(adv, ret, **TOL)
    assert torch.all(adv[MASK == 0] == 0)
    return adv[:, 0]


def test_grpo() -> None:
    # group 0: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = 0.5773503; A = +-0.5 / (0.57735 + 1e-6)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert_close(run("grpo"), torch.tensor([a, -a, -a, a, 0.0]), **TOL)


def test_grpo_std_keeps_the_spread_of_close_scores() -> None:
    """Scores 9.7 and 9.700001: std = 1e-6 / sqrt(2), A = 5e-7 / (7.071e-7 + 1e-6) =
    0.2929 (a one-pass sum of squares in float64 gives 0.2915)."""
    inp = AdvantageInput(torch.zeros(2, 1), torch.ones(2, 1),
                         scores=torch.tensor([9.7, 9.700001], dtype=torch.float64),
                         group_ids=torch.tensor([0, 0]))  # fmt: skip
    adv, _ = get_estimator("grpo")(inp)
    want = 5e-7 / (1e-6 / math.sqrt(2) + 1e-6)
    assert_close(adv[:, 0].double(), torch.tensor([-want, want], dtype=torch.float64),
                 rtol=1e-3, atol=0)  # fmt: skip


def test_dr_grpo() -> None:
    assert_close(run("dr_grpo"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0]), **TOL)


def test_rloo() -> None:
    # sample 0: 1 - (0 + 0 + 1) / 3 = 2/3; sample 1: 0 - (1 + 0 + 1) / 3 = -2/3
    assert_close(run("rloo"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]), **TOL)


def test_rloo_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, generator=g)
    groups = torch.arange(3).repeat_interleave(4)
    adv = get_estimator("rloo")(
        AdvantageInput(torch.zeros(12, 1), torch.ones(12, 1), scores=scores, group_ids=groups)
    )[0][:, 0]
    expected = []
    for i in range(12):
        others = [scores[j].item() for j in range(12) if groups[j] == groups[i] and j != i]
        expected.append(scores[i].item() - sum(others) / len(others))
    assert_close(adv, torch.tensor(expected), **TOL)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_needs_scores_and_groups(name: str) -> None:
    with pytest.raises(ValueError, match="group_ids"):
        get_estimator(name)(AdvantageInput(torch.zeros(2, 2), torch.ones(2, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_on_cuda_tensors(name: str) -> None:
    cuda = torch.device("cuda")
    inp = AdvantageInput(
        torch.zeros(5, 3, device=cuda),
        MASK.to(cuda),
        scores=SCORES.to(cuda),
        group_ids=GROUPS.to(cuda),
    )
    adv, _ = get_estimator(name)(inp)
    assert adv.device.type == "cuda"
    assert_close(adv.cpu()[:, 0], run(name), **TOL)
