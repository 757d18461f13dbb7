"""Calling a reward function the way its signature asks, and the built-in ones.

Two forms, told apart by the first parameter's name:
- per sample: `score(prompt, response)`, or `score(prompt, response, label)`, and any
  other field of the row by its name (`score(prompt, response, label, difficulty)`);
- per batch, first parameter `prompts`: `score(prompts, responses, labels, **fields)`
  with one list per argument, called once for the reward call's share of the batch.
A value may be a number, or a dict with a number under "score" and other numbers, which
are logged as metrics (`rollout/reward_fn/<name>`); a batch function returns a list of
those or a dict of lists. `prompt` is the row's prompt as given (text, or messages).

Built-in functions, named without a colon: `math` (1 when the response's final answer
equals the label, by `math-verify` where installed, else by the parser below) and
`format` (1 when the response states a final answer the parser finds). math-verify
(`pip install math-verify`) compares expressions; without it answers must match as
numbers or as written.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.prompts import PromptRow


class RewardError(RuntimeError):
    """A reward call produced no usable score for some sample."""


@dataclass
class RewardValues:
    scores: list[float]
    extras: dict[str, list[float]] = field(default_factory=dict)  # other numbers, per sample


def _number(value: Any) -> float | None:
    """A real number (Python, numpy or a one-element tensor) as a float, else None."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return float(value)
        item = value.item()
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
    except Exception:  # no .item(), or an int too large for a float
        return None
    return None


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def is_batch_form(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return bool(params) and params[0] == "prompts"


def _fields(fn: Callable, rows: Sequence[PromptRow]) -> list[str]:
    names = sorted({k for r in rows for k in r.extras})
    taken = ("prompt", "response", "label", "prompts", "responses", "labels")
    return [n for n in names if _accepts(fn, n) and n not in taken]


def _parse(value: Any, where: Callable[[], str], spec: str) -> tuple[float, dict[str, float]]:
    if isinstance(value, dict):
        score = _number(value.get("score"))
        if score is None:
            raise RewardError(f"reward.function {spec} returned a dict without a number under "
                              f"'score' ({value!r}) for {where()}")  # fmt: skip
        extras = {}
        for k, v in value.items():
            if k != "score":
                n = _number(v)
                if n is not None:
                    extras[str(k)] = n
        return score, extras
    score = _number(value)
    if score is None:
        raise RewardError(f"reward.function {spec} returned {value!r} (a {type(value).__name__}) "
                          f"for {where()}; it must return a float or a dict with 'score'")  # fmt: skip
    return score, {}


def call_reward(
    fn: Callable, spec: str, rows: Sequence[PromptRow], responses: Sequence[str]
) -> RewardValues:
    """Scores (and other returned numbers) of `responses` to `rows`; RewardError on a
    function that raises or returns something that is not a score."""
    names = _fields(fn, rows)
    out = RewardValues([])
    if is_batch_form(fn):
        kwargs: dict[str, Any] = {"responses": list(responses)}
        if _accepts(fn, "labels"):
            kwargs["labels"] = [r.label for r in rows]
        for n in names:
            kwargs[n] = [r.extras.get(n) for r in rows]
        try:
            values: Any = fn([r.prompt for r in rows], **kwargs)
        except Exception as e:
            raise RewardError(f"reward.function {spec} raised {type(e).__name__}: {e} "
                              f"(a batch of {len(rows)} samples)") from None  # fmt: skip
        if isinstance(values, dict):
            keys = list(values)
            try:
                values = [{k: values[k][i] for k in keys} for i in range(len(rows))]
            except (TypeError, IndexError, KeyError):
                raise RewardError(f"reward.function {spec} returned a dict whose values are not "
                                  f"lists of {len(rows)} numbers") from None  # fmt: skip
        if not isinstance(values, (list, tuple)) or len(values) != len(rows):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward.function {spec} returned {got} values for {len(rows)} "
                              "samples; a batch function returns one per sample")  # fmt: skip
    else:
        label = _accepts(fn, "label")
        values = []
        for row, response in zip(rows, responses):
            kw = {n: row.extras.get(n) for n in names}
            if label:
                kw["label"] = row.label
            try:
                values.append(fn(row.prompt, response, **kw))
            except Exception as e:
                raise RewardError(f"reward.function {spec} raised {type(e).__name__}: {e} "
                                  f"(prompt {row.prompt!r}, response {response!r})") from None  # fmt: skip
    for i, value in enumerate(values):
        score, extras = _parse(value, lambda i=i: f"prompt {rows[i].prompt!r}, response "
                               f"{responses[i]!r}", spec)  # fmt: skip
        out.scores.append(score)
        for k, v in extras.items():
            out.extras.setdefault(k, [math.nan] * len(rows))[i] = v
    return out


# ------------------------------------------------------------------- built-in rewards

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_MARKERS = ("####", "answer is", "Answer:")  # what states a final answer, besides \boxed


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def final_answer(text: str) -> str | None:
    """A response's (or a label's) final answer: the last \\boxed{...}; else what follows
    the last '####' (GSM8K's marker); else what follows 'the answer is'; else the last
    number. None when there is none of these."""
    if not isinstance(text, str):
        return None if text is None else str(text)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    for marker in _MARKERS:
        k = text.rfind(marker)
        if k >= 0:
            rest = text[k + len(marker) :].lstrip(" :").split("\n")[0].strip().rstrip(".")
            number = _NUMBER.match(rest)  # "42 apples" -> "42"
            if number:
                return number.group(0)
            if rest:
                return rest
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def label_answer(label: Any) -> str | None:
    """A label's answer: its last \\boxed{...} or what follows '####' (GSM8K's solutions),
    else the whole label."""
    if label is None:
        return None
    text = str(label)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    k = text.rfind("####")
    return text[k + 4 :].strip() if k >= 0 else text.strip()


def _normal(answer: str) -> str:
    a = answer.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    try:
        x = float(a)
    except ValueError:
        return a.lower()
    return repr(int(x)) if x.is_integer() else repr(x)


def answers_equal(got: str, want: str) -> bool:
    """Equal as written (after dropping $, commas and spaces), as numbers, or, by
    math-verify where it is installed, as expressions (1/2 = \\frac{1}{2} = 0.5)."""
    if _normal(got) == _normal(want):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:  # no timeouts: math-verify's use SIGALRM, which only the main thread has
        gold = parse(want, parsing_timeout=None)
        return bool(verify(gold, parse(got, parsing_timeout=None), timeout_seconds=None))
    except Exception:  # an expression math-verify cannot parse is not equal
        return False


def math_reward(prompt: Any, response: str, label: Any = None) -> dict[str, float]:
    """1 when the response's final answer equals the label's (see `final_answer`)."""
    if label is None:
        raise ValueError("the math reward needs each row's label (data.label_key)")
    got, want = final_answer(response), label_answer(label)
    correct = got is not None and want is not None and answers_equal(got, want)
    return {"score": float(correct), "correct": float(correct), "answered": float(got is not None)}


def format_reward(prompt: Any, response: str) -> float:
    """1 when the response states a final answer (\\boxed{...}, '####', 'the answer is')."""
    return float(_boxed(response) is not None or any(m in response for m in _MARKERS))


BUILTIN: dict[str, Callable] = {"math": math_reward, "format": format_reward}


# ------------------------------------------------------------------- several functions


@dataclass(frozen=True)
class RewardMix:
    """The reward functions of a run (specs made absolute), their weights, and the time
    one call of each may take (None: no limit)."""

    specs: tuple[str, ...]
    weights: tuple[float, ...]
    timeout_s: float | None = None

    @property
    def label(self) -> str:
        return " + ".join(f"{w:g} x {s}" if len(self.specs) > 1 else s
                          for s, w in zip(self.specs, self.weights))  # fmt: skip


def _short(spec: str) -> str:
    """A function's name in metric keys: `math`, or the `name` of `file.py:name`."""
    return spec.rsplit(":", 1)[-1]


def _with_timeout(fn: Callable, timeout_s: float | None, spec: str) -> Callable:
    """fn, failing with RewardError when one call takes longer than `timeout_s` (the call
    itself runs on in its thread: Python cannot stop it)."""
    if timeout_s is None:
        return fn
    import threading

    def limited(*args: Any, **kwargs: Any) -> Any:
        out: dict[str, Any] = {}

        def call() -> None:
            try:
                out["value"] = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller below
                out["error"] = e

        thread = threading.Thread(target=call, name="reward", daemon=True)  # one per call:
        thread.start()  # a call left running blocks no later one
        thread.join(timeout_s)
        if thread.is_alive():
            raise RewardError(f"reward.function {spec} took longer than reward.timeout_s = "
                              f"{timeout_s:g} s")  # fmt: skip
        if "error" in out:
            raise out["error"]
        return out["value"]

    limited.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return limited


class LoadedReward:
    """A RewardMix's functions, imported: the weighted sum of their scores, and their other
    values (with several functions each under its own name, its score included)."""

    def __init__(self, mix: RewardMix, load: Callable[[str], Callable]) -> None:
        self.mix = mix
        self.fns = [(s, _with_timeout(load(s), mix.timeout_s, s), w)
                    for s, w in zip(mix.specs, mix.weights)]  # fmt: skip

    def __call__(self, rows: Sequence[PromptRow], responses: Sequence[str]) -> RewardValues:
        if len(self.fns) == 1:
            spec, fn, w = self.fns[0]
            one = call_reward(fn, spec, rows, responses)
            return RewardValues([w * s for s in one.scores], one.extras)
        total = RewardValues([0.0] * len(rows))
        for spec, fn, w in self.fns:
            part = call_reward(fn, spec, rows, responses)
            total.scores = [t + w * s for t, s in zip(total.scores, part.scores)]
            name = _short(spec)
            total.extras[f"{name}/score"] = part.scores
            for k, v in part.extras.items():
                total.extras[f"{name}/{k}"] = v
                if k == "correct" and "correct" not in total.extras:
                    total.extras["correct"] = v  # the first function that says
        return total
