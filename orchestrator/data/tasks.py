"""Embedded synthetic tasks with a verifiable reward: demonstrations for SFT, prompts for
RL and held-out prompts for evaluation. Pure Python, deterministic for a seed.

Tasks (n = `num_digits`):
- sort: "S" + n digits + "=" -> the digits in ascending order: "S3120=" -> "0123".
- add:  "A" + a + "+" + b + "=" with a and b written with exactly n digits (leading zeros
  kept) -> the decimal sum without leading zeros, written REVERSED, least significant digit
  first: "A123+045=" -> 123 + 45 = 168 -> "861"; "A999+999=" -> 1998 -> "8991". A model
  that writes left to right then produces each digit from the two digits at that place and
  the carry so far, which a tiny model can learn; the usual order needs the whole sum first.

- bandit: the single-token bandit of ALGORITHMS.md: one empty prompt, a response of one
  token out of the vocabulary (the n digits "0".."n-1" plus the tokenizer's 4 special
  tokens, so V = n + 4), reward 1 for "0" and 0 otherwise. With a uniform reference and
  KL coefficient beta the KL-regularised optimum is p(a*) = e^(1/beta) / (e^(1/beta) + V - 1).

Reward (sort, add): 1.0 for the exact answer, otherwise partial credit
0.5 * (positions i where response[i] == answer[i]) / max(len(answer), len(response)),
so a wrong answer scores below 0.5 and an empty response scores 0.0.

Preference pairs (for the reward model): two different candidate responses to a prompt
(the answer, or the answer with a mistake, with one or two near misses that keep its form,
with a digit dropped or added), the one
with the higher verifier reward chosen; a share `label_noise` of the pairs is swapped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

DIGITS = "0123456789"


class Task(Protocol):
    """A prompt distribution with a known answer per prompt and a graded reward."""

    @property
    def name(self) -> str: ...

    @property
    def num_digits(self) -> int: ...

    @property
    def num_distinct_prompts(self) -> int:
        """How many different prompts `sample_prompt` can return."""
        ...

    @property
    def max_prompt_chars(self) -> int: ...

    @property
    def max_response_chars(self) -> int: ...

    @property
    def answer_tokens(self) -> int:
        """Tokens the longest answer takes, eos included."""
        ...

    def sample_prompt(self, rng: random.Random) -> str: ...

    def answer(self, prompt: str) -> str:
        """The correct response; ValueError for a prompt this task cannot produce."""
        ...

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        """The answer, or with probability `noise` an answer with one mistake."""
        ...

    def reward(self, prompt: str, response: str) -> float:
        """In [0, 1]: 1.0 for the exact answer, else positional partial credit below 0.5."""
        ...

    def correct(self, prompt: str, response: str) -> bool: ...

    def corrupt(self, answer: str, rng: random.Random) -> str:
        """`answer` with one plausible mistake (always different from `answer`)."""
        ...

    def near_miss(self, answer: str, rng: random.Random) -> str:
        """A wrong answer that keeps the answer's form (for sort: sorted, wrong digits), so
        a reward model must check the content, not only the form."""
        ...

    def alphabet(self) -> str:
        """Every character that may appear in a prompt or a response."""
        ...


# ---------------------------------------------------------------- shared pure functions


def positional_reward(answer: str, response: str) -> float:
    """1.0 for an exact match, else 0.5 x matching positions / max(len(answer), len(response))."""
    if response == answer:
        return 1.0
    width = max(len(answer), len(response))
    if width == 0:
        return 0.0
    same = sum(a == r for a, r in zip(answer, response))
    return 0.5 * same / width


def replace_one_digit(text: str, rng: random.Random) -> str:
    """`text` with one position replaced by a different digit."""
    chars = list(text)
    i = rng.randrange(len(chars))
    chars[i] = rng.choice([d for d in DIGITS if d != chars[i]])
    return "".join(chars)


def swap_adjacent_or_replace(text: str, rng: random.Random) -> str:
    """`text` with two adjacent unequal characters swapped (half of the time, when such a
    pair exists), otherwise with one digit replaced. The result always differs from `text`."""
    pairs = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if pairs and rng.random() < 0.5:
        i = rng.choice(pairs)
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return replace_one_digit(text, rng)


def noisy(
    answer: str, rng: random.Random, noise: float, corrupt: Callable[[str, random.Random], str]
) -> str:
    """`answer`, or with probability `noise` `corrupt(answer, rng)`."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"demonstration noise = {noise}: must be in [0, 1]")
    return corrupt(answer, rng) if rng.random() < noise else answer


def _random_digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


# the most digits a task takes (the bandit's arms are the ten digits)
MAX_DIGITS: dict[str, int] = {"bandit": 10}


def _check_num_digits(task: str, num_digits: int) -> None:
    if not isinstance(num_digits, int) or num_digits < 1:
        raise ValueError(f"task '{task}': num_digits = {num_digits!r}; it must be an integer >= 1")


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class SortTask:
    """ "S3120=" -> "0123": the prompt's digits in ascending order."""

    num_digits: int

    @property
    def name(self) -> str:
        return "sort"

    def __post_init__(self) -> None:
        _check_num_digits(self.name, self.num_digits)

    @property
    def num_distinct_prompts(self) -> int:
        return 10**self.num_digits

    @property
    def max_prompt_chars(self) -> int:
        return self.num_digits + 2

    @property
    def max_response_chars(self) -> int:
        return self.num_digits

    @property
    def answer_tokens(self) -> int:
        return self.num_digits + 1

    def alphabet(self) -> str:
        return DIGITS + "S="

    def sample_prompt(self, rng: random.Random) -> str:
        return f"S{_random_digits(rng, self.num_digits)}="

    def answer(self, prompt: str) -> str:
        m = re.fullmatch(rf"S(\d{{{self.num_digits}}})=", prompt)
        if m is None:
            raise ValueError(
                f"sort task ({self.num_digits} digits): bad prompt {prompt!r}; "
                f"expected 'S' + {self.num_digits} digits + '='"
            )
        return "".join(sorted(m.group(1)))

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        return noisy(self.answer(prompt), rng, noise, self.corrupt)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        return swap_adjacent_or_replace(answer, rng)

    def near_miss(self, answer: str, rng: random.Random) -> str:
        return "".join(sorted(replace_one_digit(answer, rng)))

    def reward(self, prompt: str, response: str) -> float:
        return positional_reward(self.answer(prompt), response)

    def correct(self, prompt: str, response: str) -> bool:
        return response == self.answer(prompt)


@dataclass(frozen=True)
class AddTask:
    """ "A123+045=" -> "861": the sum 168 written least significant digit first."""

    num_digits: int

    @property
    def name(self) -> str:
        return "add"

    def __post_init__(self) -> None:
        _check_num_digits(self.name, self.num_digits)

    @property
    def num_distinct_prompts(self) -> int:
        return 10 ** (2 * self.num_digits)

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.num_digits + 3

    @property
    def max_response_chars(self) -> int:
        return self.num_digits + 1

    @property
    def answer_tokens(self) -> int:
        return self.num_digits + 2

    def alphabet(self) -> str:
        return DIGITS + "A+="

    def sample_prompt(self, rng: random.Random) -> str:
        a = _random_digits(rng, self.num_digits)
        b = _random_digits(rng, self.num_digits)
        return f"A{a}+{b}="

    def answer(self, prompt: str) -> str:
        n = self.num_digits
        m = re.fullmatch(rf"A(\d{{{n}}})\+(\d{{{n}}})=", prompt)
        if m is None:
            raise ValueError(
                f"add task ({n} digits): bad prompt {prompt!r}; "
                f"expected 'A' + {n} digits + '+' + {n} digits + '='"
            )
        return str(int(m.group(1)) + int(m.group(2)))[::-1]

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        return noisy(self.answer(prompt), rng, noise, self.corrupt)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        return replace_one_digit(answer, rng)

    def near_miss(self, answer: str, rng: random.Random) -> str:
        return replace_one_digit(answer, rng)

    def reward(self, prompt: str, response: str) -> float:
        return positional_reward(self.answer(prompt), response)

    def correct(self, prompt: str, response: str) -> bool:
        return response == self.answer(prompt)


@dataclass(frozen=True)
class BanditTask:
    """One empty prompt; the response is one token; reward 1 for "0", else 0."""

    num_digits: int  # arms among the digits; V = num_digits + 4 special tokens

    @property
    def name(self) -> str:
        return "bandit"

    def __post_init__(self) -> None:
        _check_num_digits(self.name, self.num_digits)
        if self.num_digits > MAX_DIGITS["bandit"]:
            raise ValueError(
                f"task 'bandit': num_digits = {self.num_digits}; at most {MAX_DIGITS['bandit']}"
            )

    @property
    def num_distinct_prompts(self) -> int:
        return 1

    @property
    def max_prompt_chars(self) -> int:
        return 0

    @property
    def max_response_chars(self) -> int:
        return 1

    @property
    def answer_tokens(self) -> int:
        return 1  # one token, no eos: generate.max_new_tokens=1

    def alphabet(self) -> str:
        return DIGITS[: self.num_digits]

    def sample_prompt(self, rng: random.Random) -> str:
        return ""

    def answer(self, prompt: str) -> str:
        if prompt != "":
            raise ValueError(f"bandit task: bad prompt {prompt!r}; the only prompt is ''")
        return "0"

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        return noisy(self.answer(prompt), rng, noise, self.corrupt)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        return rng.choice([d for d in DIGITS[: self.num_digits] if d != answer] or ["<unk>"])

    def near_miss(self, answer: str, rng: random.Random) -> str:
        return self.corrupt(answer, rng)

    def reward(self, prompt: str, response: str) -> float:
        return float(response == self.answer(prompt))

    def correct(self, prompt: str, response: str) -> bool:
        return response == self.answer(prompt)

    def vocabulary_size(self) -> int:
        return self.num_digits + 4

    def optimum(self, kl_coef: float) -> float:
        """p(a*) maximising E[r] - kl_coef KL(pi || uniform): e^(1/b) / (e^(1/b) + V - 1)."""
        import math

        e = math.exp(1.0 / kl_coef)
        return e / (e + self.vocabulary_size() - 1)


TASKS: dict[str, Callable[[int], Task]] = {"sort": SortTask, "add": AddTask, "bandit": BanditTask}


def make_task(name: str, num_digits: int) -> Task:
    if name not in TASKS:
        raise ValueError(f"task.name = {name!r}: unknown task; tasks: {sorted(TASKS)}")
    return TASKS[name](num_digits)


# ---------------------------------------------------------------- data sets


@dataclass
class TaskData:
    sft_pairs: list[tuple[str, str]]
    rl_prompts: list[str]
    eval_prompts: list[str]
    pref_pairs: list[tuple[str, str, str]] = field(default_factory=list)  # prompt, chosen, rej.
    eval_pref_pairs: list[tuple[str, str, str]] = field(default_factory=list)


def max_eval_prompts(task: Task) -> int:
    """At most half of a task's distinct prompts may be held out for evaluation; a task
    with a single prompt (the bandit) evaluates on that prompt, as often as asked."""
    if task.num_distinct_prompts == 1:
        return 1 << 30
    return task.num_distinct_prompts // 2


def preference_pair(
    task: Task, prompt: str, rng: random.Random, label_noise: float
) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): two different candidates ranked by the verifier's
    reward; with probability `label_noise` the two are swapped."""
    answer = task.answer(prompt)

    def candidate() -> str:
        kind = rng.randrange(7)
        if kind <= 1:
            return answer
        if kind == 2:
            return task.corrupt(answer, rng)
        if kind == 3:
            return task.near_miss(answer, rng)
        if kind == 4:
            return task.near_miss(task.near_miss(answer, rng), rng)
        if kind == 5 and len(answer) > 1:
            i = rng.randrange(len(answer))
            return answer[:i] + answer[i + 1 :]
        i = rng.randrange(len(answer) + 1)
        return answer[:i] + rng.choice(DIGITS) + answer[i:]

    while True:
        a, b = candidate(), candidate()
        ra, rb = task.reward(prompt, a), task.reward(prompt, b)
        if ra != rb and len(a) <= task.max_response_chars and len(b) <= task.max_response_chars:
            break
    chosen, rejected = (a, b) if ra > rb else (b, a)
    if rng.random() < label_noise:
        chosen, rejected = rejected, chosen
    return prompt, chosen, rejected


def build_task_data(
    task: Task,
    num_demos: int,
    num_rl_prompts: int,
    num_eval_prompts: int,
    demo_noise: float,
    seed: int,
    num_pairs: int = 0,
    num_eval_pairs: int = 0,
    label_noise: float = 0.0,
) -> TaskData:
    """Demonstrations (prompt, possibly noisy response) for SFT, prompts for RL, and
    distinct evaluation prompts that appear in neither. SFT and RL prompts are drawn
    independently and may repeat (the prompt space of a short task is small).

    Eval prompts may take at most half of the task's distinct prompts, so the rest can be
    drawn by rejection quickly; a larger request is a ValueError.
    """
    problems = []
    for name, value in (
        ("num_demos", num_demos),
        ("num_rl_prompts", num_rl_prompts),
        ("num_eval_prompts", num_eval_prompts),
    ):
        if not isinstance(value, int) or value < 0:
            problems.append(f"task.{name} = {value!r}: must be an integer >= 0")
    if not 0.0 <= demo_noise <= 1.0:
        problems.append(f"task.demo_noise = {demo_noise!r}: must be in [0, 1]")
    room = max_eval_prompts(task)
    if isinstance(num_eval_prompts, int) and num_eval_prompts > room:
        problems.append(
            f"task.num_eval_prompts = {num_eval_prompts}: the {task.name} task with "
            f"{task.num_digits} digits has {task.num_distinct_prompts} distinct prompts and "
            f"at most half ({room}) may be held out; lower num_eval_prompts or raise num_digits"
        )
    if problems:
        raise ValueError("invalid task data settings:\n  " + "\n  ".join(problems))

    if task.num_distinct_prompts == 1:  # nothing to hold out: every list uses the prompt
        only = task.sample_prompt(random.Random(seed))
        rng = random.Random(seed)
        return TaskData(
            sft_pairs=[(only, task.demonstration(only, rng, demo_noise)) for _ in range(num_demos)],
            rl_prompts=[only] * num_rl_prompts,
            eval_prompts=[only] * num_eval_prompts,
            pref_pairs=[preference_pair(task, only, rng, label_noise) for _ in range(num_pairs)],
            eval_pref_pairs=[preference_pair(task, only, rng, 0.0) for _ in range(num_eval_pairs)],
        )
    rng = random.Random(seed)
    held_out: set[str] = set()
    eval_prompts: list[str] = []
    while len(eval_prompts) < num_eval_prompts:
        p = task.sample_prompt(rng)
        if p not in held_out:
            held_out.add(p)
            eval_prompts.append(p)

    def train_prompt() -> str:
        while True:  # at least half the prompts are free: ~2 draws expected
            p = task.sample_prompt(rng)
            if p not in held_out:
                return p

    demo_prompts = [train_prompt() for _ in range(num_demos)]
    sft_pairs = [(p, task.demonstration(p, rng, demo_noise)) for p in demo_prompts]
    rl_prompts = [train_prompt() for _ in range(num_rl_prompts)]
    # A generator of its own, so the pairs leave the other lists as they were.
    pair_rng = random.Random(f"{seed}-preference-pairs")
    pref_pairs = [
        preference_pair(task, train_prompt_from(pair_rng, task, held_out), pair_rng, label_noise)
        for _ in range(num_pairs)
    ]
    eval_pref_pairs = [
        preference_pair(task, eval_prompts[i % len(eval_prompts)], pair_rng, 0.0)
        for i in range(num_eval_pairs if eval_prompts else 0)
    ]
    return TaskData(sft_pairs, rl_prompts, eval_prompts, pref_pairs, eval_pref_pairs)


def train_prompt_from(rng: random.Random, task: Task, held_out: set[str]) -> str:
    while True:  # at least half the prompts are free: ~2 draws expected
        p = task.sample_prompt(rng)
        if p not in held_out:
            return p
