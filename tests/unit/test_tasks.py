"""Embedded tasks: answers, rewards, demonstration noise, data sets."""

from __future__ import annotations

import random

import pytest

from orchestrator.data.tasks import TASKS, AddTask, SortTask, build_task_data, make_task


def test_registry_builds_each_task_and_lists_names_on_error() -> None:
    assert isinstance(make_task("sort", 4), SortTask)
    assert isinstance(make_task("add", 3), AddTask)
    for name in TASKS:
        assert make_task(name, 2).name == name
    with pytest.raises(ValueError, match=r"\['add', 'bandit', 'sort'\]"):
        make_task("nope", 3)
    with pytest.raises(ValueError, match="num_digits"):
        make_task("sort", 0)


def test_sort_answers_prompts_and_sizes() -> None:
    task = make_task("sort", 4)
    assert task.answer("S3120=") == "0123"
    assert task.answer("S9909=") == "0999"
    rng = random.Random(0)
    for _ in range(50):
        p = task.sample_prompt(rng)
        assert len(p) == task.max_prompt_chars == 6 and p[0] == "S" and p[-1] == "="
        assert len(task.answer(p)) == task.max_response_chars == 4
        assert set(p + task.answer(p)) <= set(task.alphabet())
    with pytest.raises(ValueError, match="bad prompt"):
        task.answer("S12=")  # 2 digits, not 4


def test_add_answers_are_the_reversed_sum() -> None:
    task = make_task("add", 3)
    # 123 + 045 = 168; written least significant digit first: "861"
    assert task.answer("A123+045=") == "861"
    # 999 + 999 = 1998 -> "8991" (n + 1 digits)
    assert task.answer("A999+999=") == "8991"
    # 000 + 007 = 7 -> "7": no leading zeros before reversing
    assert task.answer("A000+007=") == "7"
    # 500 + 500 = 1000 -> "0001"
    assert task.answer("A500+500=") == "0001"
    assert task.max_prompt_chars == 9 and task.max_response_chars == 4
    rng = random.Random(1)
    for _ in range(50):
        p = task.sample_prompt(rng)
        assert len(p) == 9 and p[0] == "A" and p[4] == "+" and p[-1] == "="
        assert int(task.answer(p)[::-1]) == int(p[1:4]) + int(p[5:8])
        assert set(p + task.answer(p)) <= set(task.alphabet())
    with pytest.raises(ValueError, match="bad prompt"):
        task.answer("A12+45=")


def test_rewards_by_hand() -> None:
    sort = make_task("sort", 4)
    assert sort.reward("S3120=", "0123") == 1.0 and sort.correct("S3120=", "0123")
    # "0132" vs "0123": positions 0, 1 match, 2 and 3 do not -> 0.5 * 2/4 = 0.25
    assert sort.reward("S3120=", "0132") == pytest.approx(0.25, rel=1e-12)
    assert not sort.correct("S3120=", "0132")
    # "01" vs "0123": 2 matches over max(4, 2) = 4 -> 0.25
    assert sort.reward("S3120=", "01") == pytest.approx(0.25, rel=1e-12)
    # "012345" vs "0123": 4 matches over max(4, 6) = 6 -> 0.5 * 4/6 = 1/3
    assert sort.reward("S3120=", "012345") == pytest.approx(1 / 3, rel=1e-12)
    assert sort.reward("S3120=", "") == 0.0
    add = make_task("add", 3)
    # answer "861"; "168" (not reversed) matches only position 1 ('6') -> 0.5 * 1/3 = 1/6
    assert add.reward("A123+045=", "168") == pytest.approx(1 / 6, rel=1e-12)
    assert add.reward("A123+045=", "861") == 1.0
    assert add.correct("A123+045=", "861") and not add.correct("A123+045=", "168")
    assert add.reward("A123+045=", "") == 0.0


@pytest.mark.parametrize("name", ["sort", "add"])
def test_demonstration_noise_rate(name: str) -> None:
    task, rng = make_task(name, 6), random.Random(0)
    draws, noise = 2000, 0.3
    wrong = 0
    for _ in range(draws):
        p = task.sample_prompt(rng)
        demo = task.demonstration(p, rng, noise)
        assert len(demo) == len(task.answer(p))  # one mistake keeps the length
        wrong += demo != task.answer(p)
    assert abs(wrong / draws - noise) < 0.05
    p = task.sample_prompt(rng)
    assert task.demonstration(p, rng, 0.0) == task.answer(p)
    assert task.demonstration(p, rng, 1.0) != task.answer(p)
    with pytest.raises(ValueError, match="noise"):
        task.demonstration(p, rng, 1.5)


def test_sort_mistakes_differ_by_a_swap_or_one_digit() -> None:
    task, rng = make_task("sort", 5), random.Random(3)
    kinds = set()
    for _ in range(200):
        p = task.sample_prompt(rng)
        good, bad = task.answer(p), task.demonstration(p, rng, 1.0)
        diff = [i for i in range(5) if good[i] != bad[i]]
        if len(diff) == 1:
            kinds.add("replace")
        else:
            i, j = diff
            assert j == i + 1 and (bad[i], bad[j]) == (good[j], good[i])
            kinds.add("swap")
    assert kinds == {"replace", "swap"}
    # all digits equal: no unequal pair to swap, so one digit is replaced
    assert task.demonstration("S77777=", rng, 1.0).count("7") == 4


def test_task_data_is_deterministic_and_eval_is_held_out() -> None:
    task = make_task("sort", 3)  # 1000 prompts: repeats are likely, so disjointness is tested
    a = build_task_data(task, 400, 400, 200, 0.3, seed=7)
    b = build_task_data(task, 400, 400, 200, 0.3, seed=7)
    c = build_task_data(task, 400, 400, 200, 0.3, seed=8)
    assert a == b and a != c
    assert len(a.sft_pairs) == 400 and len(a.rl_prompts) == 400
    held = set(a.eval_prompts)
    assert len(held) == len(a.eval_prompts) == 200
    assert not held & {p for p, _ in a.sft_pairs}
    assert not held & set(a.rl_prompts)
    wrong = sum(r != task.answer(p) for p, r in a.sft_pairs)
    assert 0.2 < wrong / 400 < 0.4


def test_task_data_rejects_bad_settings_all_at_once() -> None:
    with pytest.raises(ValueError) as err:
        build_task_data(make_task("sort", 1), -1, 10, 6, 2.0, seed=0)
    msg = str(err.value)
    # 10 distinct prompts: at most 5 may be held out
    assert "num_demos" in msg and "demo_noise" in msg and "num_eval_prompts = 6" in msg
    data = build_task_data(make_task("sort", 1), 20, 20, 5, 0.0, seed=0)
    assert len(set(data.eval_prompts)) == 5
    assert set(data.rl_prompts).isdisjoint(data.eval_prompts)


def test_bandit_task() -> None:
    from orchestrator.data.tasks import BanditTask, build_task_data

    task = BanditTask(4)
    assert task.alphabet() == "0123" and task.answer_tokens == 1
    assert task.reward("", "0") == 1.0 and task.reward("", "3") == 0.0
    assert task.reward("", "") == 0.0 and not task.correct("", "<eos>")
    data = build_task_data(task, 0, 5, 3, 0.0, seed=1)
    assert data.rl_prompts == [""] * 5 and data.eval_prompts == [""] * 3


def test_preference_pairs_are_ranked_by_the_verifier_with_label_noise() -> None:
    from orchestrator.data.tasks import SortTask, build_task_data

    task = SortTask(6)
    data = build_task_data(task, 10, 10, 20, 0.3, seed=3, num_pairs=2000, num_eval_pairs=50,
                           label_noise=0.1)  # fmt: skip
    assert len(data.pref_pairs) == 2000 and len(data.eval_pref_pairs) == 50
    flipped = 0
    for p, chosen, rejected in data.pref_pairs:
        assert chosen != rejected and len(chosen) <= 6 and len(rejected) <= 6
        flipped += task.reward(p, chosen) < task.reward(p, rejected)
    assert 0.07 < flipped / 2000 < 0.13  # label_noise 0.1
    held_out = set(data.eval_prompts)
    assert all(p in held_out for p, _, _ in data.eval_pref_pairs)
    assert all(task.reward(p, c) > task.reward(p, r) for p, c, r in data.eval_pref_pairs)
    assert not held_out & {p for p, _, _ in data.pref_pairs}
    # the pairs come from a generator of their own: the other lists do not change
    plain = build_task_data(task, 10, 10, 20, 0.3, seed=3)
    assert plain.sft_pairs == data.sft_pairs and plain.rl_prompts == data.rl_prompts
