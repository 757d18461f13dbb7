"""An example reward function for `reward=function`:

    relay train reward=function reward.function=examples/rewards.py:sorted_digits

Relay calls it once per sampled response, as name(prompt, response) -> float, in the
reward role's worker. It must return a finite number; a function that raises or returns
NaN stops the run with a checkpoint, or skips the step with reward.on_error=skip.
"""

from __future__ import annotations


def sorted_digits(prompt: str, response: str) -> float:
    """For the sort task ("S3120=" -> "0123"): 1 for the exact answer; otherwise the share
    of the answer's digits the response uses, minus 0.5 if it is out of order. Unlike the
    task's verifier it gives credit for the right multiset in the wrong places."""
    answer = "".join(sorted(prompt[1:-1]))
    if response == answer:
        return 1.0
    remaining = list(answer)
    hits = 0
    for ch in response:
        if ch in remaining:
            remaining.remove(ch)
            hits += 1
    score = 0.5 * hits / max(len(answer), len(response), 1)
    return score - (0.5 if list(response) != sorted(response) else 0.0)
