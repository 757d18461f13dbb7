"""`relay plan [key=value ...]`: the execution plan of a config, its estimated cost next
to the other modes', the plan file and a Gantt chart of the simulated schedule."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from orchestrator.config.schema import ConfigError, RelayConfig
from orchestrator.runtime.planning import PlanResult, context, make_plan, runtime_problems
from planner.plan import Context, to_dict

GIB = 2**30


def plan_table(result: PlanResult) -> str:
    ctx, plan, est = result.ctx, result.plan, result.estimate
    rows = [("call", "role", "kind", "mesh", "dp", "tp", "pp", "mb", "time_s", "realloc_s")]
    for c in ctx.topo:
        a = plan[c.name]
        rows.append((c.name, c.role, c.kind.value, str(a.mesh), str(a.layout.dp),
                     str(a.layout.tp), str(a.layout.pp), str(a.layout.micro_batches),
                     f"{est.call_s[c.name]:.4g}", f"{est.realloc_s.get(c.name, 0.0):.3g}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def draw_gantt(result: PlanResult, path: Path) -> None:
    """The simulated schedule: a row per device, a bar per call (hatched: reallocation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx, slots = result.ctx, result.estimate.slots
    n = ctx.cluster.num_devices
    names = [c.name for c in ctx.topo]
    cmap = plt.get_cmap("tab10")
    color = {name: cmap(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(11, 1.5 + min(n, 64) * 0.25))
    for s in slots:
        call = s.task.name.split(" -> ")[-1]
        for r in s.task.devices:
            ax.barh(list(r), s.end_s - s.start_s, left=s.start_s, height=0.8,
                    color=color.get(call, "grey"), edgecolor="black", linewidth=0.3,
                    hatch="//" if s.task.kind == "realloc" else None,
                    alpha=0.55 if s.task.kind == "realloc" else 1.0)  # fmt: skip
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[c]) for c in names]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.set_xlabel("seconds (simulated; hatched: parameter reallocation)")
    ax.set_ylabel("device")
    ax.invert_yaxis()
    est = result.estimate
    ax.set_title(f"{ctx.workload.graph}, plan={result.mode}: {est.time_per_iteration_s:.4g} s "
                 f"per iteration ({ctx.iterations} unrolled) on {ctx.cluster.describe()}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress() -> Callable[[int, float], None]:
    """Prints the search's best plan at most once a second."""
    last = [0.0]

    def report(evaluated: int, cost_s: float) -> None:
        now = time.perf_counter()
        if now - last[0] > 1.0:
            print(f"  search: {evaluated} plans evaluated, best {cost_s:.4g} s", flush=True)
            last[0] = now

    return report


def run_plan(cfg: RelayConfig) -> int:
    ctx: Context = context(cfg)
    mode = cfg.plan.mode
    if mode == "auto":  # the mode auto picks for this cluster, shown beside the others
        auto = make_plan(cfg, "auto", ctx)
        mode = auto.mode
        cfg = replace(cfg, plan=replace(cfg.plan, mode=mode))
        print(f"relay plan: plan=auto: {mode} ({auto.reason})")
    print(f"relay plan: {ctx.workload.graph} on {ctx.cluster.describe()}; "
          f"mode {cfg.plan.mode}", flush=True)  # fmt: skip
    modes = ["per_role", "symmetric", "heuristic", "search"] + (["file"] if cfg.plan.path else [])
    if cfg.plan.mode not in modes:
        modes.append(cfg.plan.mode)
    results: dict[str, PlanResult | str] = {}
    for mode in modes:
        t0 = time.perf_counter()
        try:
            prog = _progress() if mode == "search" else None
            results[mode] = make_plan(cfg, mode, ctx, progress=prog)
        except ConfigError as e:
            if mode == cfg.plan.mode:
                raise
            results[mode] = e.problems[0].rule
        took = time.perf_counter() - t0
        r = results[mode]
        summary = (
            f"{r.estimate.time_per_iteration_s:.4g} s/iteration" if isinstance(r, PlanResult) else r
        )
        print(f"  {mode}: {summary} (planned in {took:.2f} s)", flush=True)
    chosen = results[cfg.plan.mode]
    assert isinstance(chosen, PlanResult)
    print(f"\nplan ({cfg.plan.mode}):\n{plan_table(chosen)}")
    from planner.plan import offloaded_roles, realloc_hooks

    hooks = realloc_hooks(ctx, chosen.plan)
    print("\nreallocations:" + ("" if hooks else " none"))
    for h in hooks:
        print(f"  before {h.before}: {h.role} {h.src.mesh} dp{h.src.layout.dp} tp{h.src.layout.tp}"
              f" pp{h.src.layout.pp} -> {h.dst.mesh} dp{h.dst.layout.dp} tp{h.dst.layout.tp} "
              f"pp{h.dst.layout.pp}: {chosen.estimate.realloc_s[h.before]:.3g} s per iteration")  # fmt: skip
    off = offloaded_roles(ctx, chosen.plan)
    print("offloaded between calls (frozen, sharing devices): " + (", ".join(off) or "none"))
    mem = chosen.estimate.memory_bytes
    print(f"peak memory per device: {mem.max() / GIB:.3g} GiB of "
          f"{ctx.cluster.kind.memory_bytes / GIB:.3g} GiB")  # fmt: skip
    print("\nestimated time per iteration:")
    base = results.get("symmetric")
    for mode, r in results.items():
        if isinstance(r, PlanResult):
            ratio = ""
            if isinstance(base, PlanResult):
                ratio = f"  (symmetric / this = {base.estimate.time_per_iteration_s / r.estimate.time_per_iteration_s:.3f})"
            print(f"  {mode:10s} {r.estimate.time_per_iteration_s:.5g} s{ratio}")
        else:
            print(f"  {mode:10s} none: {r}")
    problems = runtime_problems(chosen, cfg)
    print("\nthis runtime can execute it: " + ("yes" if not problems else
                                              f"no ({problems[0].rule})"))  # fmt: skip
    out = Path(cfg.plan.out or Path(cfg.run.output_dir) / f"{cfg.run.name}.plan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(ctx, chosen.plan, chosen.mode, chosen.estimate)
    data["modes"] = {m: (r.estimate.time_per_iteration_s if isinstance(r, PlanResult) else None)
                     for m, r in results.items()}  # fmt: skip
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    png = out.with_suffix(".png")
    draw_gantt(chosen, png)
    print(f"\nplan file: {out}\nschedule: {png}")
    if not math.isfinite(chosen.estimate.time_per_iteration_s):
        return 2
    return 0


def plan(argv: list[str]) -> int:
    from launch.overrides import config_help, expand
    from orchestrator.config.load import load_config

    if any(a in ("-h", "--help") for a in argv):
        print("usage: relay plan [plan=search|symmetric|heuristic|file] [key=value ...]\n\n"
              "Plans the run the same overrides give `relay train`: every call's mesh and\n"
              "layout, the reallocations, the estimated time per iteration of each mode,\n"
              "the plan file (plan.out) and a Gantt chart of the simulated schedule.\n"
              "Paper-scale example:\n  relay plan plan=search cluster.device=cuda "
              "cluster.device_kind=h100-sxm cluster.num_nodes=2 cluster.devices_per_node=8 \\\n"
              "    plan.actor_shape=llama2-13b plan.critic_shape=llama2-7b "
              "train.rollout_batch_prompts=512 \\\n    train.mini_batch_samples=128 "
              "plan.prompt_tokens=128 generate.max_new_tokens=128\n\n" + config_help())  # fmt: skip
        return 0
    try:
        cfg = load_config(expand(argv), for_run=False)
        return run_plan(cfg)
    except ConfigError as e:
        print(f"relay plan: {e}", file=sys.stderr)
        return 2
