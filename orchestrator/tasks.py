"""Embedded synthetic tasks with a verifiable reward: demonstrations for SFT, prompts
for RL and held-out prompts for evaluation. Pure Python and deterministic per seed.

- sort: "S52817=" -> "12578" (the digits in ascending order).
- add:  "A123+045=" -> "861": the sum 168 written least significant digit first, which
  a tiny left-to-right model can learn (each digit depends on the carry so far).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class Task(Protocol):
    name: str
    num_digits: int

    def sample_prompt(self, rng: random.Random) -> str: ...
    def answer(self, prompt: str) -> str: ...
    def alphabet(self) -> str: ...
    @property
    def max_prompt_chars(self) -> int: ...
    @property
    def max_response_chars(self) -> int: ...


def _positional_reward(answer: str, response: str) -> float:
    """1.0 for an exact match, else 0.5 x the share of positions that match."""
    if response == answer:
        return 1.0
    width = max(len(answer), len(response))
    if width == 0:
        return 0.0
    same = sum(a == b for a, b in zip(answer, response))
    return 0.5 * same / width


class _DigitTask:
    name = "base"

    def __init__(self, num_digits: int) -> None:
        if num_digits < 1:
            raise ValueError(f"task.num_digits = {num_digits}: must be >= 1")
        self.num_digits = num_digits

    def answer(self, prompt: str) -> str:
        raise NotImplementedError

    def reward(self, prompt: str, response: str) -> float:
        return _positional_reward(self.answer(prompt), response)

    def correct(self, prompt: str, response: str) -> bool:
        return response == self.answer(prompt)

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        """The correct answer, or with probability `noise` one with a single mistake."""
        good = self.answer(prompt)
        if rng.random() >= noise:
            return good
        return self.corrupt(good, rng)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        chars = list(answer)
        i = rng.randrange(len(chars))
        chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
        return "".join(chars)


class SortTask(_DigitTask):
    name = "sort"

    def sample_prompt(self, rng: random.Random) -> str:
        return "S" + "".join(rng.choice("0123456789") for _ in range(self.num_digits)) + "="

    def answer(self, prompt: str) -> str:
        return "".join(sorted(prompt[1:-1]))

    def corrupt(self, answer: str, rng: random.Random) -> str:
        pairs = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if pairs and rng.random() < 0.5:  # swap two adjacent unequal digits
            i = rng.choice(pairs)
            c = list(answer)
            c[i], c[i + 1] = c[i + 1], c[i]
            return "".join(c)
        return super().corrupt(answer, rng)

    def alphabet(self) -> str:
        return "0123456789S="

    @property
    def max_prompt_chars(self) -> int:
        return self.num_digits + 2

    @property
    def max_response_chars(self) -> int:
        return self.num_digits


class AddTask(_DigitTask):
    name = "add"

    def sample_prompt(self, rng: random.Random) -> str:
        a = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
        b = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
        return f"A{a}+{b}="

    def answer(self, prompt: str) -> str:
        a, b = prompt[1:-1].split("+")
        return str(int(a) + int(b))[::-1]

    def alphabet(self) -> str:
        return "0123456789A+="

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.num_digits + 3

    @property
    def max_response_chars(self) -> int:
        return self.num_digits + 1


TASKS: dict[str, type[_DigitTask]] = {"sort": SortTask, "add": AddTask}


def make_task(name: str, num_digits: int) -> _DigitTask:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; tasks: {sorted(TASKS)}")
    return TASKS[name](num_digits)


@dataclass
class TaskData:
    sft_pairs: list[tuple[str, str]]
    rl_prompts: list[str]
    eval_prompts: list[str]


def build_task_data(
    task: _DigitTask,
    num_demos: int,
    num_rl_prompts: int,
    num_eval_prompts: int,
    demo_noise: float,
    seed: int,
) -> TaskData:
    """Demonstrations, RL prompts and evaluation prompts; eval prompts are held out from both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    eval_prompts: list[str] = []
    tries = 0
    while len(eval_prompts) < num_eval_prompts and tries < 100 * max(num_eval_prompts, 1):
        tries += 1
        p = task.sample_prompt(rng)
        if p not in seen:
            seen.add(p)
            eval_prompts.append(p)

    def fresh() -> str:
        for _ in range(1000):
            p = task.sample_prompt(rng)
            if p not in seen:
                return p
        raise ValueError(
            f"task '{task.name}' with {task.num_digits} digits has too few distinct prompts"
        )

    demo_prompts = [fresh() for _ in range(num_demos)]
    sft_pairs = [(p, task.demonstration(p, rng, demo_noise)) for p in demo_prompts]
    rl_prompts = [fresh() for _ in range(num_rl_prompts)]
    return TaskData(sft_pairs, rl_prompts, eval_prompts)
