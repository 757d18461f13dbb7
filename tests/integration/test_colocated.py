"""Roles share devices: `relay train cluster.devices_per_node=1` runs PPO (generating with
vLLM), ReMax and GRPO with every role on one device (plan=auto plans it), and its first
three steps' numbers equal the per-role placement's (a device per role) within 1e-5: the
same computations on other devices. (Measured: equal to the last bit.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.tiny import RL_ONLY, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 3
KEYS = {
    "ppo": ("loss/policy", "loss/value", "rollout/reward_mean", "train/grad_norm_actor"),
    "remax": ("loss/policy", "rollout/reward_mean", "rollout/advantage_mean_raw",
              "train/grad_norm_actor"),
    "grpo": ("loss/policy", "rollout/reward_mean", "train/kl_loss", "train/grad_norm_actor"),
}  # fmt: skip


def run(tmp_path: Path, name: str, *extra: str) -> dict[int, dict]:
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller
    from orchestrator.run.tracking import read_metrics

    cfg = load_config(tiny_overrides(tmp_path, name, STEPS, *RL_ONLY, "train.eval_every_steps=100",
                                     *extra))  # fmt: skip
    Controller(cfg).run()
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    return {r["step"]: r for r in rows if r["stage"] == "rl" and "loss/policy" in r}


@pytest.mark.parametrize("algo", ["ppo", "remax", "grpo"])
def test_one_device_runs_every_role_as_the_per_role_placement(
    ray_cluster, tmp_path: Path, algo: str
) -> None:
    # vLLM for PPO (the default job's backend); transformers for the others, cheaper
    extra = [f"algo={algo}", "generate.backend=" + ("vllm" if algo == "ppo" else "hf")]
    if algo == "grpo":  # 4 prompts x 4 samples: the same 16 rows as the others
        extra += ["train.rollout_batch_prompts=4"]
    one = run(tmp_path, "one", *extra, "cluster.devices_per_node=1")
    separate = run(tmp_path, "separate", *extra, "plan=per_role")
    plan = json.loads((tmp_path / "one" / "plan.json").read_text())
    assert {c["mesh"] for c in plan["calls"].values()} == {"d0"}
    apart = json.loads((tmp_path / "separate" / "plan.json").read_text())
    assert len({c["mesh"] for c in apart["calls"].values()}) > 1
    assert sorted(one) == sorted(separate) == [1, 2, 3]
    for step in (1, 2, 3):
        if algo == "ppo":
            assert one[step]["rollout/logprob_diff"] < 1e-4  # vLLM samples from the trainer
        for key in KEYS[algo]:
            want = separate[step][key]
            assert one[step][key] == pytest.approx(want, rel=1e-5, abs=1e-7), (step, key)
