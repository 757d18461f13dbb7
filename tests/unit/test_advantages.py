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


# ---------------------------------------------------------------- GAE by hand


def test_gae_by_hand() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    inp = AdvantageInput(r, torch.ones(1, 3), values=v, gamma=1.0, lam=0.95)
    adv, ret = get_estimator("gae")(inp)
    # V after the last token is 0.
    # t=2: delta = 1 + 0 - 0.7 = 0.3;            A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;          A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;          A0 = 0.1 + 0.95 * 0.385 = 0.46575
    assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3]]), **TOL)
    # R = A + V = (0.96575, 0.985, 1.0)
    assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0]]), **TOL)
    # the plain loop gives the same hand-worked numbers
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), [[1, 1, 1]], 1.0, 0.95)
    assert_close(torch.tensor(ref_adv), torch.tensor([[0.46575, 0.385, 0.3]]), **TOL)
    assert_close(torch.tensor(ref_ret), torch.tensor([[0.96575, 0.985, 1.0]]), **TOL)


def test_gae_by_hand_discounted() -> None:
    r = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2]])
    inp = AdvantageInput(r, torch.ones(1, 2), values=v, gamma=0.9, lam=0.5)
    adv, ret = get_estimator("gae")(inp)
    # t=1: delta = 1 + 0.9 * 0 - 0.2 = 0.8;          A1 = 0.8
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32;      A0 = -0.32 + 0.9 * 0.5 * 0.8 = 0.04
    # R = (0.04 + 0.5, 0.8 + 0.2) = (0.54, 1.0)
    assert_close(adv, torch.tensor([[0.04, 0.8]]), **TOL)
    assert_close(ret, torch.tensor([[0.54, 1.0]]), **TOL)


def test_gae_right_padding() -> None:
    r = torch.tensor([[0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.6, 9.0]])
    inp = AdvantageInput(r, torch.tensor([[1, 1, 0]]), values=v, gamma=1.0, lam=1.0)
    adv, ret = get_estimator("gae")(inp)
    # the padded token is ignored: V after the last valid token is 0
    # t=1: delta = 1 + 0 - 0.6 = 0.4; t=0: delta = 0 + 0.6 - 0.5 = 0.1; A0 = 0.5
    assert_close(adv, torch.tensor([[0.5, 0.4, 0.0]]), **TOL)
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]), **TOL)


def test_gae_right_padded_batch_by_hand() -> None:
    # row 0 is the 1x3 example above; row 1 has two valid tokens and garbage after them;
    # row 2 has none
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 99.0], [3.0, 3.0, 3.0]])
    v = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.5, -99.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    adv, ret = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=1.0, lam=0.95))
    # row 1, t=1: delta = 2 + 0 - 1.5 = 0.5;        A1 = 0.5
    #        t=0: delta = 0.5 + 1.5 - 1.0 = 1.0;    A0 = 1.0 + 0.95 * 0.5 = 1.475
    #        R = (1.475 + 1.0, 0.5 + 1.5, 0) = (2.475, 2.0, 0)
    expected_adv = torch.tensor([[0.46575, 0.385, 0.3], [1.475, 0.5, 0.0], [0.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.96575, 0.985, 1.0], [2.475, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(adv, expected_adv, **TOL)
    assert_close(ret, expected_ret, **TOL)
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), mask.tolist(), 1.0, 0.95)
    assert_close(torch.tensor(ref_adv), expected_adv, **TOL)
    assert_close(torch.tensor(ref_ret), expected_ret, **TOL)


# ---------------------------------------------------------------- vectorised vs plain loop


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.5)])
def test_gae_matches_the_plain_loop(gamma: float, lam: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, t = 7, 11
    r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    # right padded, lengths 0..T (a row with no valid token included)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = 0, t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    adv, ret = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=gamma, lam=lam))
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    assert_close(adv, torch.tensor(ref_adv), **TOL)
    assert_close(ret, torch.tensor(ref_ret), **TOL)


def test_gae_padded_values_change_nothing() -> None:
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4], [1], [0]])).long()
    clean = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=0.99, lam=0.95))
    pad = mask == 0
    r2 = torch.where(pad, torch.full_like(r, 1e4), r)
    v2 = torch.where(pad, torch.full_like(v, -1e4), v)
    dirty = get_estimator("gae")(AdvantageInput(r2, mask.bool(), values=v2, gamma=0.99, lam=0.95))
    assert_close(dirty[0], clean[0], **TOL)
    assert_close(dirty[1], clean[1], **TOL)
    assert torch.all(clean[0][pad] == 0) and torch.all(clean[1][pad] == 0)


def test_gae_needs_values() -> None:
    with pytest.raises(ValueError, match="'gae' estimator needs values"):
        get_estimator("gae")(AdvantageInput(torch.zeros(1, 2), torch.ones(1, 2)))


# ---------------------------------------------------------------- registry


def test_registry_lists_gae() -> None:
    assert "gae" in list_estimators()
    assert list_estimators() == sorted(list_estimators())


def test_duplicate_registration_raises_and_keeps_the_original() -> None:
    original = get_estimator("gae")
    try:
        with pytest.raises(ValueError, match="'gae' is already registered"):
            register_estimator("gae")(lambda inp: (inp.token_rewards, inp.token_rewards))
        assert get_estimator("gae") is original
    finally:
        # restore the registry even if the duplicate was (wrongly) accepted
        if get_estimator("gae") is not original:
            unregister_estimator("gae")
            register_estimator("gae")(original)
    assert get_estimator("gae") is original


def test_unknown_estimator_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'") as err:
        get_estimator("nope")
    for name in list_estimators():
        assert f"'{name}'" in str(err.value)


def test_temporary_registration_is_removed() -> None:
    name = "test_zero_estimator"
    assert name not in list_estimators()
    try:

        @register_estimator(name)
        def zero(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
            return inp.mask * 0.0, inp.mask * 0.0

        assert name in list_estimators()
        with pytest.raises(ValueError, match=f"'{name}' is already registered"):
            register_estimator(name)(zero)
        adv, ret = get_estimator(name)(AdvantageInput(torch.ones(1, 2), torch.ones(1, 2)))
        assert_close(adv, torch.zeros(1, 2), **TOL)
        assert_close(ret, torch.zeros(1, 2), **TOL)
    finally:
        unregister_estimator(name)
    assert name not in list_estimators()
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        get_estimator(name)
