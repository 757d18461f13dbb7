"""Scoring responses to the run's RL rows: the task's verifier where the rows are the
task's own prompts, the user's reward function where one is given, and the metrics of
both (the share the verifier accepts, or the function's own "correct" where it has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.prompts import PromptRow


@dataclass
class Scores:
    scores: list[float] | None  # the function's (None: no function)
    verifier: list[float] | None  # the task verifier's reward (None: not the task's rows)
    correct: list[float] | None  # 1 or 0 per sample where known
    extras: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.correct is not None:
            out[f"{prefix}task_accuracy"] = sum(self.correct) / len(self.correct)
        if self.verifier is not None:
            out[f"{prefix}verifier_reward_mean"] = sum(self.verifier) / len(self.verifier)
        for k, values in self.extras.items():
            known = [v for v in values if not math.isnan(v)]
            if known:
                out[f"{prefix}reward_fn/{k}"] = sum(known) / len(known)
        return out


def score_rows(
    task: Any,
    task_rows: bool,
    reward: Callable[[Sequence[PromptRow], Sequence[str]], Any] | None,
    rows: Sequence[PromptRow],
    responses: Sequence[str],
) -> Scores:
    """The verifier's and the reward functions' (a LoadedReward) view of `responses` to
    `rows`; `task_rows` says the rows are the task's own prompts (its verifier applies)."""
    verifier = correct = None
    if task_rows:
        verifier = [float(task.reward(r.prompt, s)) for r, s in zip(rows, responses)]
        correct = [float(task.correct(r.prompt, s)) for r, s in zip(rows, responses)]
    scores, extras = None, {}
    if reward is not None:
        values = reward(rows, responses)
        scores, extras = values.scores, values.extras
        if correct is None and "correct" in extras:
            correct = [0.0 if math.isnan(c) else c for c in extras["correct"]]
    return Scores(scores, verifier, correct, extras)
