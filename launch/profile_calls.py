"""`relay profile --calls [--steps N] [--rounds R] [--out F] [overrides ...]`: measure
this job's calls on this cluster, under every candidate layout, for the planner
(planner.measured).

For each layout (dp, tp) of m devices that every call of the job can take (m = 1, 2, 4,
... up to a node's devices), it runs `relay train` with the job's overrides under the
plan that puts every call on the first m devices with that layout, for `--steps` RL steps,
and records each call's mean time over the steps after the first, the threads it computed
with, and the step's orchestration overhead. The first layout's run trains the job's SFT
and reward models as the job sets them; every later run starts its RL stage from those
models (`model.path`, `reward.path`). A call's time follows the policy it runs: how long
its responses are (a batch is as long as its longest), so every layout is measured on the
job's own policy (a policy after one SFT step wrote other lengths: its ReMax train call
measured 88 ms where the job's took 114 ms). `--rounds` passes are made over the layouts,
every other one backwards, and each layout's figures are the mean over all its runs: this
machine's speed drifts by 10-30% over the minutes a profile takes, and one pass had
ranked a layout 14% ahead of another that runs measured as fast (calibration run 5, GRPO).
The file names the job it measured; a run that names it in `cluster.calls_profile` plans
with these times, and refuses it for another job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from launch.profile import _say, _write_atomic

REPO = Path(__file__).resolve().parents[1]


def candidate_layouts(ctx: Any) -> list[tuple[int, int, int]]:
    """(mesh size, dp, tp) of one node that every call of the job can run under."""
    from planner.search import layout_options

    out = []
    size = 1
    while size <= ctx.cluster.devices_per_node:
        ok: set[tuple[int, int]] | None = None
        for c in ctx.topo:
            have = {(x.dp, x.tp) for x in layout_options(ctx, c.name, size)
                    if x.pp == 1 and x.micro_batches == 1}  # fmt: skip
            ok = have if ok is None else ok & have
        out += [(size, dp, tp) for dp, tp in sorted(ok or ())]
        size *= 2
    return out


def plan_file(ctx: Any, size: int, dp: int, tp: int, folder: Path) -> Path:
    from planner.layout import Layout, Mesh
    from planner.plan import Assignment, to_dict

    assign = {c.name: Assignment(Mesh(0, size), Layout(dp, tp, 1, 1)) for c in ctx.topo}
    path = folder / f"m{size}_dp{dp}_tp{tp}.json"
    path.write_text(json.dumps(to_dict(ctx, assign, "file", None)))
    return path


def reuse_models(run_dir: Path) -> tuple[str, ...]:
    """The overrides that start a later profiling run's RL stage from the SFT and reward
    models the run in `run_dir` trained (none if it trained neither)."""
    models = run_dir / "models"
    out: tuple[str, ...] = ()
    if (models / "sft" / "DONE").is_file():
        out += ("sft.enabled=false", f"model.path={models / 'sft'}")
    if (models / "reward" / "DONE").is_file():
        out += (f"reward.path={models / 'reward'}",)
    return out


def run_layout(overrides: list[str], plan: Path, steps: int, out: Path) -> list[dict]:
    """The RL steps' metrics of one profiling run (the first step and evaluations left out)."""
    cmd = [sys.executable, "-m", "launch.cli", "train", *overrides, "plan=file",
           f"plan.path={plan}", f"train.steps={steps + 1}",
           f"train.eval_every_steps={steps + 2}", f"run.save_every_steps={steps + 2}",
           "logger.wandb_mode=disabled", "logger.progress=false", "cluster.calls_profile=null",
           f"run.output_dir={out}", f"run.name={plan.stem}"]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"profiling run {plan.stem} failed:\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-2000:]}")  # fmt: skip
    from orchestrator.run.tracking import read_metrics

    rows = read_metrics(out / plan.stem / "metrics.jsonl")
    rl = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]
    workers = json.loads((out / plan.stem / "workers.json").read_text())["workers"]
    cores = min(w.get("cores", os.cpu_count() or 1) for w in workers)
    return [{**r, "_cores": cores} for r in rl[1:] if not any(k.startswith("eval/") for k in r)]


def pass_order(layouts: int, rounds: int) -> list[int]:
    """The order the layouts are run in: `rounds` passes over all of them, every other
    pass backwards, so a drift of this machine's speed over the minutes a profile takes
    falls on every layout alike (the first layout once, first)."""
    order: list[int] = []
    for r in range(rounds):
        order += list(range(layouts)) if r % 2 == 0 else list(range(layouts - 1, -1, -1))
    return order


def measure(overrides: list[str], steps: int, rounds: int) -> dict[str, Any]:
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import context, job_identity
    from planner.layout import Layout, Mesh
    from planner.measured import median_ratios
    from planner.plan import Assignment
    from planner.threads import cores_per_device

    cfg = load_config([*overrides, "cluster.calls_profile=null"])
    ctx = context(cfg)
    c = cfg.cluster
    layouts: list[tuple[int, int, int, tuple[str, ...]]] = [
        (s, d, t, ()) for s, d, t in candidate_layouts(ctx)]  # fmt: skip
    if c.call_threads == "auto" and os.cpu_count() and os.cpu_count() > c.threads_per_device:
        # one device alone again at threads_per_device: how each call follows its cores
        layouts.append((1, 1, 1, ("cluster.call_threads=device",)))
    _say(f"relay profile --calls: {len(layouts)} layouts x {steps} steps of the "
         f"{ctx.workload.graph} graph: {', '.join(f'm{s} dp{d} tp{t}' for s, d, t, _ in layouts)}")  # fmt: skip
    calls, pairs, overheads, cores_seen = [], [], [], []
    models: tuple[str, ...] | None = None  # after the first run: the models it trained
    measured: dict[int, list[dict]] = {i: [] for i in range(len(layouts))}
    with tempfile.TemporaryDirectory() as tmp:
        for n, i in enumerate(pass_order(len(layouts), rounds)):
            size, dp, tp, extra = layouts[i]
            folder = Path(tmp) / f"pass{n // len(layouts)}"  # run names repeat per pass
            folder.mkdir(exist_ok=True)
            plan = plan_file(ctx, size, dp, tp, folder)
            if extra:
                plan = plan.rename(plan.with_name(plan.stem + "_device_threads.json"))
            measured[i] += run_layout([*overrides, *(models or ()), *extra], plan, steps,
                                      plan.parent / "runs")  # fmt: skip
            if models is None:
                models = reuse_models(plan.parent / "runs" / plan.stem)
            if rounds > 1:
                _say(f"  pass {n // len(layouts) + 1} of {rounds}: m{size} dp{dp} tp{tp} done")
        for i, (size, dp, tp, extra) in enumerate(layouts):
            rows = measured[i]
            cores = rows[0]["_cores"]
            cores_seen.append(cores)
            overheads += [r["time/overhead_s"] for r in rows]
            alone_threads = max(c.threads_per_device, cores // size)
            if c.call_threads != "auto":
                alone_threads = c.threads_per_device
            for w in ctx.topo:
                seconds = statistics.fmean(r[f"time/{w.name}_s"] for r in rows)
                threads = statistics.fmean(r.get(f"perf/threads_{w.name}", alone_threads)
                                           for r in rows)  # fmt: skip
                had = cores_per_device(threads, size, cores)
                calls.append({"call": w.name, "mesh_size": size, "dp": dp, "tp": tp,
                              "seconds": seconds, "cores": had})  # fmt: skip
                if extra:
                    continue
                roof = ctx.roofline_s(w.name, Assignment(Mesh(0, size), Layout(dp, tp, 1, 1)))
                pairs.append((w.kind.value, seconds, roof))
            _say(f"  m{size} dp{dp} tp{tp}: " + ", ".join(
                f"{x['call']} {x['seconds'] * 1e3:.1f} ms" for x in calls[-len(ctx.topo):]))  # fmt: skip
    return {
        "job": job_identity(cfg, ctx.workload),
        "cores_per_node": min(cores_seen),
        "step_overhead_s": statistics.median(overheads),
        "kind_ratio": median_ratios(pairs),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "steps": steps,
        "rounds": rounds,
        "overrides": overrides,
        "calls": calls,
    }


def profile_calls(argv: list[str]) -> int:
    p = argparse.ArgumentParser("relay profile --calls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="profiles/calls.json", help="where to write the profile")
    p.add_argument("--steps", type=int, default=3, help="measured RL steps per layout")
    p.add_argument("--rounds", type=int, default=2,
                   help="passes over the layouts, every other one backwards (drift)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="the job's overrides, as `relay train` takes them")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.steps < 1:
        _say(f"relay profile --calls: --steps = {args.steps}: must be >= 1. Fix: pass 2 or 3")
        return 2
    if args.rounds < 1:
        _say(f"relay profile --calls: --rounds = {args.rounds}: must be >= 1. Fix: pass 2")
        return 2
    if Path(args.out).is_dir():
        _say(f"relay profile --calls: --out = {args.out!r} is a folder. Fix: name a file")
        return 2
    data = measure(args.overrides, args.steps, args.rounds)
    _write_atomic(Path(args.out), data)
    _say(f"step overhead {data['step_overhead_s'] * 1e3:.1f} ms; measured / roofline by kind: "
         + ", ".join(f"{k} {v:.2f}" for k, v in sorted(data["kind_ratio"].items()))
         + f"\nwrote {args.out}; plan with it: relay train cluster.calls_profile={args.out} ...")  # fmt: skip
    return 0
