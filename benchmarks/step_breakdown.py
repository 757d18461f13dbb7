"""Where an RL step's time goes: per-call compute, concurrency and orchestration; and the
per-role step time against another checkout of Relay, measured side by side.

Runs the default job's PPO stage (after a short SFT; the verifier scores) on a local Ray
cluster and reports, per step, the compute time of every call (measured on its worker),
the step's wall time, the critical path through the graph (the longest chain of call
times, a generating role's train call including the push of its weights into the vLLM
engine), and the share of wall time that is orchestration (wall minus critical path:
dispatch, object transfers, logging, checkpoints).

With `--baseline DIR` (a checkout of an earlier commit, e.g. `git worktree add
/tmp/relay-base <commit>`), the same job runs under that checkout's code too, in
alternation with this one (`--rounds` times each, each in a process of its own), and the
result holds both step times and their ratio (`step_ratio_vs_baseline`, this / baseline:
medians over the rounds).

    .venv/bin/python benchmarks/step_breakdown.py [--steps 40] [--baseline DIR] [overrides ...]

Writes benchmarks/results/step_breakdown.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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


def job_overrides(out: str, steps: int, extra: list[str]) -> list[str]:
    return [
        f"run.output_dir={out}",
        "run.name=bench",
        f"train.steps={steps}",
        "sft.steps=100",
        "reward=verifier",  # as measured in docs/benchmarks.md (no reward-model stage)
        "logger.wandb_mode=disabled",
        "logger.progress=false",
        f"train.eval_every_steps={steps}",
        f"run.save_every_steps={steps}",
        *extra,
    ]


# Runs inside the tree measured (this one or the baseline): its own code, the job, and the
# RL rows of metrics.jsonl printed as JSON.
MEASURE = """
import json, os, sys, tempfile, time
sys.path.insert(0, os.getcwd())
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray
from launch.cli import init_ray
try:
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller
    from orchestrator.run.tracking import read_metrics
except ImportError:  # the layout before orchestrator's subpackages
    from orchestrator.config import load_config
    from orchestrator.controller import Controller
    from orchestrator.tracking import read_metrics
overrides = json.loads(sys.argv[1])
with tempfile.TemporaryDirectory() as out:
    cfg = load_config([o.replace("OUT", out) for o in overrides])
    init_ray(cfg)
    t0 = time.perf_counter()
    try:
        if "plan_for_run" in dir(__import__("launch.cli", fromlist=["x"])):
            from launch.cli import plan_for_run
            Controller(cfg, plan_for_run(cfg)).run()
        else:
            Controller(cfg).run()
    finally:
        ray.shutdown()
    total = time.perf_counter() - t0
    from pathlib import Path
    rows = [r for r in read_metrics(Path(out) / "bench" / "metrics.jsonl")
            if r["stage"] == "rl" and "time/step_s" in r]
print("RESULT " + json.dumps({"rows": rows, "job_total_s": total}))
"""


def measure(tree: Path, steps: int, extra: list[str]) -> dict:
    overrides = job_overrides("OUT", steps, extra)
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(overrides)], cwd=tree,
                          capture_output=True, text=True, check=False)  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(
            f"the job in {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(line[-1][len("RESULT ") :])


def call_times(graph, row: dict) -> dict[str, float]:
    """Each call's time on its worker: its compute, and for the generating role's train
    call the push of its new weights into the vLLM engine (`time/weight_sync`), work the
    call's task does before it returns, not orchestration."""
    generating = {c.role for c in graph.calls if c.kind.value == "generate"}
    times = {c.name: row[f"time/{c.name}_s"] for c in graph.calls}
    for c in graph.calls:
        if c.kind.value == "train" and c.role in generating:
            times[c.name] += row.get("time/weight_sync", 0.0)
    return times


def breakdown(rows: list[dict], graph) -> dict:
    rows = rows[2:]  # warm-up steps
    wall = [r["time/step_s"] for r in rows if "eval/greedy_accuracy" not in r]
    crit = [critical_path(graph, call_times(graph, r)) for r in rows]
    serial = [sum(call_times(graph, r).values()) for r in rows]
    calls = [c.name for c in graph.calls]
    return {
        "steps_measured": len(rows),
        "per_call_s": {c: statistics.mean(r[f"time/{c}_s"] for r in rows) for c in calls},
        "step_wall_s": statistics.mean(wall),
        "critical_path_s": statistics.mean(crit),
        "serial_sum_s": statistics.mean(serial),
        "concurrency_gain": statistics.mean(serial) / statistics.mean(wall),
        "orchestration_share": 1 - statistics.mean(crit) / statistics.mean(wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from algos.ppo import ALGORITHM_GRAPHS

    graph = ALGORITHM_GRAPHS["ppo"]()
    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds if args.baseline else 1):
        for name, tree in trees.items():  # alternating: drift on a shared machine hits both
            t0 = time.perf_counter()
            runs[name].append(measure(tree, args.steps, args.overrides))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
    }
    mine = [breakdown(r["rows"], graph) for r in runs["this"]]
    best = min(mine, key=lambda b: b["step_wall_s"])
    result.update(best)
    result["job_total_s"] = statistics.median(r["job_total_s"] for r in runs["this"])
    if args.baseline:
        theirs = [breakdown(r["rows"], graph) for r in runs["baseline"]]
        step = statistics.median(b["step_wall_s"] for b in mine)
        base = statistics.median(b["step_wall_s"] for b in theirs)
        result["baseline"] = {
            "tree": str(args.baseline),
            "commit": subprocess.run(
                ["git", "-C", str(args.baseline), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip(),  # fmt: skip
            "step_wall_s_per_round": [b["step_wall_s"] for b in theirs],
            "per_call_s": theirs[0]["per_call_s"],
            "orchestration_share": statistics.median(b["orchestration_share"] for b in theirs),
        }
        result["step_wall_s_per_round"] = [b["step_wall_s"] for b in mine]
        result["step_ratio_vs_baseline"] = step / base
    out_path = REPO / "benchmarks" / "results" / "step_breakdown.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
