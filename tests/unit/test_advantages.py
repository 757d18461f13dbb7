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


def test_gae_skips_a_masked_token_inside_the_response() -> None:
    # token 1 is masked (e.g. a tool output): it is skipped, not treated as the end
    r = torch.tensor([[0.0, 50.0, 1.0]])
    v = torch.tensor([[0.5, -50.0, 0.7]])
    mask = torch.tensor([[1, 0, 1]])
    adv, ret = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=0.9, lam=0.5))
    # t=2: delta = 1 + 0 - 0.7 = 0.3;                 A2 = 0.3
    # t=1: masked -> A1 = 0, carries (V, A) = (0.7, 0.3) back to t=0
    # t=0: delta = 0 + 0.9 * 0.7 - 0.5 = 0.13;        A0 = 0.13 + 0.9 * 0.5 * 0.3 = 0.265
    # R = (0.265 + 0.5, 0, 0.3 + 0.7) = (0.765, 0, 1.0)
    assert_close(adv, torch.tensor([[0.265, 0.0, 0.3]]), **TOL)
    assert_close(ret, torch.tensor([[0.765, 0.0, 1.0]]), **TOL)
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), mask.tolist(), 0.9, 0.5)
    assert_close(torch.tensor(ref_adv), adv, **TOL)
    assert_close(torch.tensor(ref_ret), ret, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_the_plain_loop_with_holes(seed: int) -> None:
    # any mask, not only right padding: masked tokens inside rows are skipped by both
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) < 0.6
    adv, ret = get_estimator("gae")(AdvantageInput(r, mask, values=v, gamma=0.99, lam=0.95))
    ref_adv, ref_ret = gae_reference(r.tolist(), v.tolist(), mask.int().tolist(), 0.99, 0.95)
    assert_close(adv, torch.tensor(ref_adv), **TOL)
    assert_close(ret, torch.tensor(ref_ret), **TOL)


def test_gae_nan_in_padding_stays_out() -> None:
    r = torch.tensor([[0.0, 1.0, float("nan")]])
    v = torch.tensor([[0.5, 0.6, float("inf")]])
    adv, ret = get_estimator("gae")(AdvantageInput(r, torch.tensor([[1, 1, 0]]), values=v))
    # as in test_gae_right_padding: A = (0.5, 0.4, 0), R = (1, 1, 0)
    assert_close(adv, torch.tensor([[0.5, 0.4, 0.0]]), **TOL)
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]), **TOL)


def test_gae_float64_in_float64_out_and_no_gradient() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64, requires_grad=True)
    adv, ret = get_estimator("gae")(AdvantageInput(r, torch.ones(1, 3), values=v, lam=0.95))
    assert adv.dtype == ret.dtype == torch.float64
    # advantages and returns are targets: no gradient flows back into the critic
    assert not adv.requires_grad and not ret.requires_grad
    expected = torch.tensor([[0.46575, 0.385, 0.3]], dtype=torch.float64)  # test_gae_by_hand
    assert_close(adv, expected, rtol=1e-12, atol=1e-12)


def test_advantage_input_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as err:
        AdvantageInput(
            torch.zeros(2, 3),
            torch.ones(2, 4),
            values=torch.zeros(3, 3),
            scores=torch.zeros(3),
            group_ids=torch.zeros(2, 1, dtype=torch.long),
            gamma=1.5,
            lam=-0.1,
        )
    msg = str(err.value)
    for part in ("mask has shape (2, 4)", "values has shape (3, 3)", "scores has shape (3,)",
                 "group_ids has shape (2, 1)", "gamma=1.5", "lam=-0.1"):  # fmt: skip
        assert part in msg, part
    with pytest.raises(ValueError, match=r"token_rewards has shape \(3,\)"):
        AdvantageInput(torch.zeros(3), torch.ones(3))
    # a valid record: right shapes, gamma and lam at the ends of [0, 1]
    AdvantageInput(
        torch.zeros(2, 3),
        torch.ones(2, 3, dtype=torch.bool),
        values=torch.zeros(2, 3),
        scores=torch.zeros(2),
        group_ids=torch.tensor([0, 0]),
        gamma=0.0,
        lam=1.0,
    )


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
