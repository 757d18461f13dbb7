"""Inputs a user brings to a run: a prompt file for the RL stage (`task.prompt_file`) and
a reward function (`reward.source=function reward.function=...`).

Both are checked before the run folder is touched. A prompt file's problems are reported
with line numbers, grouped by kind (not JSON, no prompt string, too long for the model's
context, not a prompt of the task), at most `MAX_LISTED` lines per kind.

A reward function that raises, returns something that is not a number, or returns NaN or
an infinity fails the reward call with a `RewardError`; the controller then skips the step
or stops the run with a checkpoint (`reward.on_error`). The same holds for a reward model
whose scores are not finite.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.data.prompts import PromptRow, listed
from orchestrator.data.reward_fns import BUILTIN, RewardError, call_reward

MAX_LISTED = 8
RewardFunction = Callable[..., Any]
__all__ = ["RewardError", "load_reward_function", "call_reward_function", "check_finite"]


# ------------------------------------------------------------------- prompt files


@dataclass
class PromptFileReport:
    """What reading a prompt file found: the prompts and, per kind, the bad lines."""

    prompts: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "line 3: ..." (JSON, no prompt key)
    too_long: list[str] = field(default_factory=list)
    not_task: list[str] = field(default_factory=list)
    unreadable: str | None = None  # the file is missing, a folder, or not UTF-8

    @property
    def ok(self) -> bool:
        bad = self.malformed or self.too_long or self.not_task or self.unreadable
        return not bad and bool(self.prompts)


def _listed(lines: list[str]) -> str:
    return listed(lines, MAX_LISTED, "line")


def read_prompt_file(
    path: str | Path,
    answer: Callable[[str], str],
    count_tokens: Callable[[str], int],
    context: int,
    max_new_tokens: int,
) -> PromptFileReport:
    """Read a JSONL file of {"prompt": "..."} objects, one per line (blank lines are
    skipped). A prompt must fit the model's context with bos and `max_new_tokens`
    (1 + tokens + max_new_tokens <= context) and be a prompt the task can score
    (`answer(prompt)` raises ValueError otherwise)."""
    report = PromptFileReport()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        report.unreadable = "no such file"
        return report
    except IsADirectoryError:
        report.unreadable = "is a folder, not a file"
        return report
    except UnicodeDecodeError as e:
        report.unreadable = f"is not UTF-8 text ({e.reason} at byte {e.start})"
        return report
    except OSError as e:
        report.unreadable = f"cannot be read ({e.strerror})"
        return report
    room = context - 1 - max_new_tokens
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.malformed.append(f"line {number}: not valid JSON ({e.msg}, column {e.colno})")
            continue
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            got = f"a {type(row).__name__}" if not isinstance(row, dict) else f"keys {sorted(row)}"
            report.malformed.append(f'line {number}: needs a "prompt" string (got {got})')
            continue
        tokens = count_tokens(prompt)
        if tokens > room:
            report.too_long.append(f"line {number}: {tokens} tokens")
            continue
        try:
            answer(prompt)
        except ValueError:
            report.not_task.append(f"line {number}: {prompt[:40]!r}")
            continue
        report.prompts.append(prompt)
    return report


def prompt_file_problems(
    report: PromptFileReport,
    task_name: str,
    example: str,
    context: int,
    max_new_tokens: int,
    batch_prompts: int,
) -> list[tuple[str, str]]:
    """(rule, fix) pairs for `task.prompt_file`, one per kind of problem found."""
    shape = json.dumps({"prompt": example})
    if report.unreadable:
        return [(report.unreadable, "point task.prompt_file at a JSONL file of prompts")]
    out: list[tuple[str, str]] = []
    if report.malformed:
        out.append(
            (
                f"{len(report.malformed)} malformed line(s): {_listed(report.malformed)}",
                f"write one JSON object per line, like {shape}",
            )
        )
    if report.too_long:
        room = context - 1 - max_new_tokens
        out.append(
            (
                f"{len(report.too_long)} prompt(s) longer than the model's context allows: "
                f"{_listed(report.too_long)}; bos + prompt + generate.max_new_tokens "
                f"({max_new_tokens}) must fit in {context} positions, so at most {room} tokens",
                "shorten or drop those prompts, lower generate.max_new_tokens, or use a model "
                "with a longer context (model.max_position_embeddings)",
            )
        )
    if report.not_task:
        out.append(
            (
                f"{len(report.not_task)} prompt(s) the '{task_name}' task cannot score: "
                f"{_listed(report.not_task)}",
                f"use prompts of the task's form, like {example!r}, or change task.name; "
                "for prompts of your own, use data.train_files with reward=function (docs/data.md)",
            )
        )
    if not out and not report.prompts:
        out.append(("holds no prompts", f"add lines like {shape}"))
    elif not out and len(report.prompts) < batch_prompts:
        out.append(
            (
                f"holds {len(report.prompts)} prompts, fewer than train.rollout_batch_prompts "
                f"({batch_prompts})",
                "add prompts, or lower train.rollout_batch_prompts",
            )
        )
    return out


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------- reward functions


def load_reward_function(spec: str) -> RewardFunction:
    """`path/to/file.py:name`, `package.module:name` or a built-in name (`math`, `format`)
    -> the callable (orchestrator/data/reward_fns.py has the forms it may take).
    ValueError naming what is wrong."""
    if isinstance(spec, str) and spec in BUILTIN:
        return BUILTIN[spec]
    if not isinstance(spec, str) or spec.count(":") != 1 or spec.endswith(":"):
        raise ValueError(
            "must have the form 'path/to/file.py:name' or 'package.module:name', or be a "
            f"built-in reward ({', '.join(sorted(BUILTIN))})"
        )
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"the file {where} does not exist")
        module_name = f"relay_reward_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"importing {where} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ValueError(
                f"importing module {where!r} failed: {type(e).__name__}: {e}"
            ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{where} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"{where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def call_reward_function(
    fn: RewardFunction, spec: str, pairs: Sequence[tuple[str, str]]
) -> list[float]:
    """fn's scores of (prompt, response) pairs with no label; RewardError on the first pair
    that raises or returns something that is not a score."""
    rows = [PromptRow(p, p) for p, _ in pairs]
    return call_reward(fn, spec, rows, [r for _, r in pairs]).scores


def check_finite(scores: Sequence[float], pairs: Sequence[tuple[str, str]], source: str) -> None:
    """RewardError naming how many scores are NaN or infinite, with the first such sample."""
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        prompt, response = pairs[bad[0]]
        raise RewardError(
            f"{source} returned {scores[bad[0]]} for {len(bad)} of {len(scores)} samples "
            f"(first: prompt {prompt!r}, response {response!r})"
        )
