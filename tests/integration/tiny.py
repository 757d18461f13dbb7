"""Overrides for a tiny, fast run of the real pipeline."""

from __future__ import annotations

from pathlib import Path

# RL alone: no SFT or reward-model stage (the verifier scores), for tests of the RL loop's
# faults and resumes, which would otherwise spend most of their time on those stages.
RL_ONLY = ("sft.enabled=false", "reward=verifier")
# every role on one device, one worker to start: for tests whose subject is not placement
ONE_DEVICE = "cluster.devices_per_node=1"


def tiny_overrides(out: Path, name: str, steps: int, *extra: str) -> list[str]:
    """The run's overrides. Generation is transformers' unless `extra` names a backend:
    every device of a plan starts a vLLM engine shard (seconds each on two cores), which
    the tests of vLLM itself, of the default job and of roles sharing devices pay for."""
    backend = (
        [] if any(e.startswith("generate.backend=") for e in extra) else ["generate.backend=hf"]
    )
    return [
        *backend,
        f"run.output_dir={out}",
        f"run.name={name}",
        f"train.steps={steps}",
        "run.save_every_steps=2",
        "sft.steps=10",
        "sft.batch_samples=16",
        "sft.micro_batch_samples_per_device=16",
        "task.num_demos=200",
        "reward.steps=10",
        "reward.batch_pairs=16",
        "reward.micro_batch_pairs_per_device=8",
        "reward.num_pairs=200",
        "reward.num_eval_pairs=16",
        "task.num_rl_prompts=200",
        "task.num_eval_prompts=16",
        "train.rollout_batch_prompts=16",
        "train.mini_batch_samples=8",
        "train.micro_batch_samples_per_device=8",
        "train.eval_every_steps=2",
        "logger.wandb_mode=disabled",
        "logger.progress=false",
        *extra,
    ]
