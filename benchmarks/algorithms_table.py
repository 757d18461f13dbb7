"""The algorithms on the default task, from the same SFT and reward models: final task
accuracy (the verifier's, on the held-out prompts) and reward for SFT alone, PPO, ReMax,
GRPO, RLOO and PPO with a PMOE policy. Writes benchmarks/results/algorithms.json and
prints the table that docs/algorithms.md shows.

The first run is the default job (`relay train`: SFT -> reward model -> PPO); the others
start from its models/sft and models/reward (`model.path=... sft.enabled=false
reward.path=...`), which is what each would build itself (every stage is seeded).

    .venv/bin/python benchmarks/algorithms_table.py [--out runs] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository first: this folder's planner.py would shadow the planner package
sys.path.insert(0, str(REPO))
VARIANTS = {
    "PPO": ["algo=ppo"],
    "ReMax": ["algo=remax"],
    "GRPO": ["algo=grpo"],
    "RLOO": ["algo=rloo"],
    "GRPO, KL in the reward": ["algo=grpo", "algo.kl_in_loss=false"],
    "RLOO, KL in the reward": ["algo=rloo", "algo.kl_in_loss=false"],
    "PPO + PMOE (K=5)": ["algo=ppo", "policy=pmoe"],
}


def run(overrides: list[str]) -> tuple[Path, float]:
    import ray

    from launch.cli import init_ray
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller

    cfg = load_config(overrides)
    init_ray(cfg)
    t0 = time.perf_counter()
    try:
        summary = Controller(cfg).run()
    finally:
        ray.shutdown()
    return Path(summary["run_dir"]), time.perf_counter() - t0


def rl_result(run_dir: Path) -> dict[str, float]:
    from orchestrator.run.tracking import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]
    evals = [r for r in rows if "eval/greedy_accuracy" in r]
    last10 = [r for r in rows if "rollout/reward_mean" in r][-10:]
    steps = [
        r["time/step_s"] for r in rows if "time/step_s" in r and "eval/greedy_accuracy" not in r
    ]
    return {
        **{k: evals[-1][k] for k in evals[-1] if k.startswith("eval/")},
        "rollout_reward_last10": statistics.mean(r["rollout/reward_mean"] for r in last10),
        "rollout_task_accuracy_last10": statistics.mean(r["rollout/task_accuracy"] for r in last10),
        "step_s": statistics.mean(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = [f"run.output_dir={args.out}", "logger.wandb_mode=disabled",
              "logger.progress=false", *args.overrides]  # fmt: skip
    results: dict[str, dict] = {}
    first, wall = run(["run.name=table-ppo", *common, *VARIANTS["PPO"]])
    sft = json.loads((first / "models" / "sft" / "DONE").read_text())
    rm = json.loads((first / "models" / "reward" / "DONE").read_text())
    results["SFT alone"] = sft
    results["PPO"] = {**rl_result(first), "job_s": wall}
    reuse = [f"model.path={first / 'models' / 'sft'}", "sft.enabled=false",
             f"reward.path={first / 'models' / 'reward'}"]  # fmt: skip
    for name, overrides in VARIANTS.items():
        if name == "PPO":
            continue
        slug = "".join(c for c in name.lower().replace("+", "-") if c.isalnum() or c == "-")
        run_dir, wall = run([f"run.name=table-{slug}", *common, *reuse, *overrides])
        results[name] = {**rl_result(run_dir), "job_s": wall, "overrides": overrides}
        print(name, json.dumps(results[name]), flush=True)
    out = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "reward_model": rm,
        "results": results,
    }
    path = REPO / "benchmarks" / "results" / "algorithms.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(
        "| | greedy acc. | sampled acc. | sampled verifier reward | RM reward (last 10) | s/step |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['eval/greedy_accuracy']:.3f} | {r['eval/sampled_accuracy']:.3f} | "
            f"{r['eval/sampled_reward']:.3f} | "
            f"{r.get('rollout_reward_last10', float('nan')):.3f} | {r.get('step_s', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    main()
