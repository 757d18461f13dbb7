"""ReMax against PPO: time per RL step (with the per-call breakdown) and peak memory of
the model workers, on the same model, task and batch, each with its shipped defaults
(`algo=ppo` and `algo=remax`), side by side in one run.

The model is the `large` preset (about 60M parameters), so model states dominate the
workers' memory. The SFT and reward-model stages run one step each: they only build the
models (the timing of an RL step does not depend on how good they are; an untrained
policy writes every response to max_new_tokens, the same length in both runs).
Memory is each worker's peak resident set minus its resident set before it built its
model (the Python/torch runtime's own share), summed over the workers; the raw peaks are
reported too. Writes benchmarks/results/remax_vs_ppo.json.

    .venv/bin/python benchmarks/remax_vs_ppo.py [--steps 4] [overrides ...]
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


def run_algo(algo: str, steps: int, out: str, overrides: list[str]) -> dict:
    import ray

    from algos.ppo import ALGORITHM_GRAPHS
    from launch.cli import init_ray
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller
    from orchestrator.run.tracking import read_metrics

    cfg = load_config(
        [
            f"algo={algo}",
            "model.preset=large",
            f"run.output_dir={out}",
            f"run.name={algo}",
            f"train.steps={steps}",
            "sft.steps=1",
            "reward.steps=1",
            "task.num_eval_prompts=16",
            f"train.eval_every_steps={steps + 1}",
            f"run.save_every_steps={steps + 1}",
            "logger.wandb_mode=disabled",
            "logger.progress=false",
            *overrides,
        ]
    )
    init_ray(cfg)
    t0 = time.perf_counter()
    try:
        Controller(cfg).run()
    finally:
        ray.shutdown()
    rows = [
        r
        for r in read_metrics(Path(out) / algo / "metrics.jsonl")
        if r["stage"] == "rl" and "time/step_s" in r
    ]
    measured = [r for r in rows[1:] if "eval/greedy_accuracy" not in r]  # step 1: warm-up
    last = rows[-1]
    graph = ALGORITHM_GRAPHS[algo]()
    calls = sorted(c.name for c in graph.calls if f"time/{c.name}_s" in last)
    return {
        "steps_measured": len(measured),
        "step_s": statistics.mean(r["time/step_s"] for r in measured),
        "per_call_s": {c: statistics.mean(r[f"time/{c}_s"] for r in measured) for c in calls},
        "weight_sync_s": statistics.mean(r.get("time/weight_sync", 0.0) for r in measured),
        "model_memory_bytes": {
            k.rsplit("_", 1)[-1]: v for k, v in last.items() if k.startswith("perf/model_rss")
        },
        "peak_rss_bytes": {
            k.rsplit("_", 1)[-1]: v for k, v in last.items() if k.startswith("perf/peak_rss")
        },
        # the peak while calls ran (the load's transients left out), less the runtime
        "calls_model_memory_bytes": {
            k.rsplit("_", 1)[-1]: v for k, v in last.items() if k.startswith("perf/calls_model_rss")
        },
        # CPU seconds of each call's process: its work, whatever shared the cores
        "per_call_cpu_s": {
            c: statistics.mean(r[f"perf/cpu_{c}_s"] for r in measured) for c in calls
        },
        "job_s": time.perf_counter() - t0,
    }


def planner_estimate(budget_s: float) -> dict:
    """The planner's ReMax / PPO ratios (time per iteration and memory summed over the
    devices, searched plans) for the paper-scale 7B case of benchmarks/planner.py: Llama-2
    7B actor, critic and reward model on 8 H100s, 512 prompts of 128 + 128 tokens."""
    import importlib.util

    from planner.plan import evaluate
    from planner.search import mcmc

    spec = importlib.util.spec_from_file_location(
        "planner_bench", REPO / "benchmarks" / "planner.py"
    )
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    case = bench.PPO_CASES[0]
    est = {}
    for algo in ("ppo", "remax"):
        ctx = bench.case_context(algo, *case)
        found = mcmc(ctx, seed=0, time_budget_s=budget_s)
        e = evaluate(ctx, found.plan)
        est[algo] = {
            "iteration_s": e.time_per_iteration_s,
            "memory_bytes": float(e.memory_bytes.sum()),
            "max_device_bytes": float(e.memory_bytes.max()),
        }
    return {
        "case": dict(zip(("actor", "critic", "gpus", "prompts", "prompt_len", "gen_len"), case)),
        "search_budget_s": budget_s,
        "estimates": est,
        "time_ratio": est["remax"]["iteration_s"] / est["ppo"]["iteration_s"],
        "memory_ratio": est["remax"]["memory_bytes"] / est["ppo"]["memory_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from orchestrator.models.hf import MODEL_PRESETS

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for algo in ("ppo", "remax"):
            results[algo] = run_algo(algo, args.steps, out, args.overrides)
            print(algo, json.dumps(results[algo], indent=1), flush=True)
    ppo, remax = results["ppo"], results["remax"]
    memory = {a: sum(r["model_memory_bytes"].values()) for a, r in results.items()}
    calls_memory = {a: sum(r["calls_model_memory_bytes"].values()) for a, r in results.items()}
    raw = {a: sum(r["peak_rss_bytes"].values()) for a, r in results.items()}
    cores = len(os.sched_getaffinity(0))
    remax_work = sum(remax["per_call_cpu_s"].values())
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "model": {"preset": "large", **MODEL_PRESETS["large"]},
        "time_ratio": remax["step_s"] / ppo["step_s"],
        "memory_ratio": memory["remax"] / memory["ppo"],
        # the same without the load's transients (a state dict read beside the model, the
        # engine's start-up): what running the calls holds
        "calls_memory_ratio": calls_memory["remax"] / calls_memory["ppo"],
        "raw_rss_ratio": raw["remax"] / raw["ppo"],
        # the least time ratio any schedule of ReMax's calls could reach on this machine's
        # cores: its CPU seconds per step spread over every core, against PPO's step
        "cores": cores,
        "remax_cpu_s_per_step": remax_work,
        "ppo_cpu_s_per_step": sum(ppo["per_call_cpu_s"].values()),
        "time_ratio_bound": remax_work / cores / ppo["step_s"],
        # compute alone, as if every call ran one after another on one device
        "serial_compute_ratio": sum(remax["per_call_s"].values()) / sum(ppo["per_call_s"].values()),
        "goal": {"time_ratio": 0.8, "memory_ratio": 0.6},
        "planner_7b": planner_estimate(10.0),
        "ppo": ppo,
        "remax": remax,
    }
    out_path = REPO / "benchmarks" / "results" / "remax_vs_ppo.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("time_ratio", "time_ratio_bound", "memory_ratio", "calls_memory_ratio",
            "raw_rss_ratio", "serial_compute_ratio")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))
    p7 = result["planner_7b"]
    print(
        f"planner, 7B on 8 H100: time_ratio {p7['time_ratio']:.2f} memory_ratio "
        f"{p7['memory_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
