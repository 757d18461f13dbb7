"""Advantage estimators: GAE against hand-worked numbers and its plain-loop reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from algos.advantages import (
    AdvantageInput,
    gae_reference,
    get_estimator,
    list_estimators,
    register_estimator,
    unregister_estimator,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def test_gae_by_hand() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    inp = AdvantageInput(r, torch.ones(1, 3), values=v, gamma=1.0, lam=0.95)
    adv, ret = get_estimator("gae")(inp)
    # t=2: delta = 1 + 0 - 0.7 = 0.3;            A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;          A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;          A0 = 0.1 + 0.95 * 0.385 = 0.46575
    assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3]]), **TOL)
    # R = A + V
    assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0]]), **TOL)


def test_gae_right_padding() -> None:
    r = torch.tensor([[0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.6, 9.0]])
    inp = AdvantageInput(r, torch.tensor([[1, 1, 0]]), values=v, gamma=1.0, lam=1.0)
    adv, ret = get_estimator("gae")(inp)
    # the padded token is ignored: V after the last valid token is 0
    # t=1: delta = 1 + 0 - 0.6 = 0.4; t=0: delta = 0 + 0.6 - 0.5 = 0.1; A0 = 0.5
    assert_close(adv, torch.tensor([[0.5, 0.4, 0.0]]), **TOL)
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]), **TOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_gae_matches_the_plain_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 6, 9
    r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    adv, ret = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=gamma, lam=lam))
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    assert_close(adv, torch.tensor(ref_adv), **TOL)
    assert_close(ret, torch.tensor(ref_ret), **TOL)


def test_gae_needs_values() -> None:
    with pytest.raises(ValueError, match="values"):
        get_estimator("gae")(AdvantageInput(torch.zeros(1, 2), torch.ones(1, 2)))


def test_registry_errors() -> None:
    assert "gae" in list_estimators()
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("gae")(lambda inp: (inp.token_rewards, inp.token_rewards))
    with pytest.raises(ValueError, match="gae"):
        get_estimator("nope")
    try:
        register_estimator("test_zero")(lambda inp: (inp.mask * 0.0, inp.mask * 0.0))
        adv, _ = get_estimator("test_zero")(AdvantageInput(torch.ones(1, 2), torch.ones(1, 2)))
        assert adv.sum() == 0
    finally:
        unregister_estimator("test_zero")
    assert "test_zero" not in list_estimators()
