"""Where an RL step's time goes: per-call compute, concurrency and orchestration.

Runs the default job's PPO stage (after a short SFT) on a local Ray cluster and reports,
per step, the compute time of every call (measured on its worker), the step's wall time,
the critical path through the graph (the longest chain of call times), and the share
of wall time that is orchestration (wall minus critical path: dispatch, object
transfers, logging, checkpoints). Writes benchmarks/results/step_breakdown.json.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 40] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository first: this folder's planner.py would shadow the planner package
sys.path.insert(0, str(REPO))


def critical_path(graph, times: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for call in graph.order:
        start = max((finish[p] for p in graph.parents(call)), default=0.0)
        finish[call.name] = start + times[call.name]
    return max(finish.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import ray

    from algos.ppo import ALGORITHM_GRAPHS
    from launch.cli import init_ray
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller
    from orchestrator.run.tracking import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            [
                f"run.output_dir={out}",
                "run.name=bench",
                f"train.steps={args.steps}",
                "sft.steps=100",
                "reward=verifier",  # as measured in docs/benchmarks.md (no reward-model stage)
                "logger.wandb_mode=disabled",
                "logger.progress=false",
                f"train.eval_every_steps={args.steps}",
                f"run.save_every_steps={args.steps}",
                *args.overrides,
            ]
        )
        init_ray(cfg)
        t0 = time.perf_counter()
        try:
            Controller(cfg).run()
        finally:
            ray.shutdown()
        total_s = time.perf_counter() - t0
        rows = [
            r
            for r in read_metrics(Path(out) / "bench" / "metrics.jsonl")
            if r["stage"] == "rl" and "time/step_s" in r
        ]
    graph = ALGORITHM_GRAPHS[cfg.algo.name]()
    rows = rows[2:]  # warm-up steps
    calls = [c.name for c in graph.calls]
    per_call = {c: statistics.mean(r[f"time/{c}_s"] for r in rows) for c in calls}
    wall = [r["time/step_s"] for r in rows if "eval/greedy_accuracy" not in r]
    crit = [critical_path(graph, {c: r[f"time/{c}_s"] for c in calls}) for r in rows]
    serial = [sum(r[f"time/{c}_s"] for c in calls) for r in rows]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "steps_measured": len(rows),
        "per_call_s": per_call,
        "step_wall_s": statistics.mean(wall),
        "critical_path_s": statistics.mean(crit),
        "serial_sum_s": statistics.mean(serial),
        "concurrency_gain": statistics.mean(serial) / statistics.mean(wall),
        "orchestration_share": 1 - statistics.mean(crit) / statistics.mean(wall),
        "job_total_s": total_s,
    }
    out_path = REPO / "benchmarks" / "results" / "step_breakdown.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
