"""The policy's task accuracy and reward on the held-out prompts, greedy and sampled."""

from __future__ import annotations

from typing import Any

from orchestrator.run.context import Run, call_seed
from orchestrator.run.specs import sampling


def evaluate_policy(run: Run, runtime: Any, step: int) -> dict[str, float]:
    """eval/ metrics of the actor on its generating replica (both evaluations at once)."""
    import ray

    prompts = run.assets.data.eval_prompts
    greedy = runtime.evaluate(prompts, sampling(run, 0, greedy=True))
    sampled = runtime.evaluate(prompts, sampling(run, call_seed(run.cfg.run.seed, step, "eval")))
    g, s = ray.get([greedy, sampled])
    return {
        "eval/greedy_accuracy": g["accuracy"],
        "eval/greedy_reward": g["reward"],
        "eval/sampled_accuracy": s["accuracy"],
        "eval/sampled_reward": s["reward"],
    }
