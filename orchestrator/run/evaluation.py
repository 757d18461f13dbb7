"""The policy's task accuracy and reward on the held-out prompts, greedy and sampled
(none without held-out prompts; accuracy only where the verifier or the reward function
says what is correct)."""

from __future__ import annotations

from typing import Any

from orchestrator.run.context import Run, call_seed
from orchestrator.run.specs import sampling


def evaluate_policy(run: Run, runtime: Any, step: int) -> dict[str, float]:
    """eval/ metrics of the actor on its generating replica (both evaluations at once)."""
    count = len(run.assets.eval_rows)
    if not count:
        return {}
    seed = call_seed(run.cfg.run.seed, step, "eval")
    g, s = runtime.evaluate(count, [sampling(run, 0, greedy=True), sampling(run, seed)])
    return {
        f"eval/{kind}_{k}": v for kind, r in (("greedy", g), ("sampled", s)) for k, v in r.items()
    }
