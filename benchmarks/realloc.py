"""Parameter reallocation throughput against this machine's point-to-point limit.

Four processes (one per device, gloo over loopback, one thread each) hold a Llama model of
about 134M parameters (fp32) sharded under one of the six 4-device layouts
(dp, tp, pp) = (4,1,1), (2,2,1), (1,4,1), (2,1,2), (1,2,2), (1,1,4), and reallocate it to
every other layout with the runtime's executor (orchestrator.workers.realloc), 30 ordered pairs.
Per pair: the bytes that crossed between processes (local copies excluded), the wall time
(barrier to barrier, the slowest rank), and the throughput. In the same run the limit:
one tensor of the same size as the pair's moved bytes sent from one process to another
over the same transport (gloo send/recv). `throughput_vs_limit` is the median, over the pairs that move bytes between processes, of
(pair throughput / limit throughput); the goal is at least 0.5. (From dp4 every device
already holds the whole model: those pairs are local copies only and are reported apart.)

    .venv/bin/python benchmarks/realloc.py [--repeats 3] [--hidden 768 --layers 12]

It also runs the default job under plan=search (`--job-steps` RL steps) and reports the
share of RL step time spent in reallocation and orchestration: `overhead_share` (goal at
most 0.10), the mean over steps 2.. of perf/non_compute_share, the step's wall time minus
the union of its calls' compute spans, over the step's wall time.

Writes benchmarks/results/realloc.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from planner.catalogue import ModelShape  # noqa: E402
from planner.layout import Layout, Mesh  # noqa: E402

WORLD = 4
LAYOUTS = [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]


def shape_of(args: argparse.Namespace) -> ModelShape:
    return ModelShape("bench", hidden=args.hidden, layers=args.layers, heads=args.heads,
                      kv_heads=args.heads, intermediate=args.intermediate, vocab=args.vocab)  # fmt: skip


def random_shards(shape: ModelShape, sharding: tuple[Mesh, Layout], device: int) -> dict:
    """This device's slices under `sharding`, random (values do not matter here), made
    slice by slice so no process ever holds the whole model."""
    from planner.realloc import held_range, model_tensors

    mesh, layout = sharding
    out = {}
    g = torch.Generator().manual_seed(device)
    for t in model_tensors(shape):
        held = held_range(t, shape.layers, mesh, layout, device)
        if held is not None:
            dims = list(t.shape)
            dims[t.split_dim if t.split_dim is not None else 0] = held[1] - held[0]
            out[t.name] = torch.randn(dims, generator=g)
    return out


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def p2p_limit_s(nbytes: int) -> float:
    """One tensor of `nbytes` from rank 0 to rank 1 (the others wait at the barrier)."""
    rank = dist.get_rank()
    buf = torch.empty(max(nbytes // 4, 1))

    def go() -> None:
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)

    return timed(go)


def _worker(rank: int, store: str, args: argparse.Namespace, out: str) -> None:
    from orchestrator.workers.realloc import reallocate
    from planner.realloc import plan_ops

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    shape = shape_of(args)
    full = Mesh(0, WORLD)
    rows = []
    for a in LAYOUTS:
        src = (full, Layout(*a))
        mine = random_shards(shape, src, rank)
        for b in LAYOUTS:
            if a == b:
                continue
            dst = (full, Layout(*b))
            ops = plan_ops(shape, src, dst, devices_per_node=WORLD)
            moved = sum(op.nbytes for op in ops if op.src != op.dst)
            times, limits = [], []
            for _ in range(args.repeats):
                run = functools.partial(reallocate, mine, shape, src, dst, rank,
                                        devices_per_node=WORLD, ops=ops)  # fmt: skip
                times.append(timed(run))
                limits.append(p2p_limit_s(moved))
            t, lim = min(times), min(limits)
            rows.append({
                "src": "dp{}tp{}pp{}".format(*a), "dst": "dp{}tp{}pp{}".format(*b),
                "moved_bytes": moved, "messages": sum(op.src != op.dst for op in ops),
                "realloc_s": t, "limit_s": lim,
                "throughput_gb_s": moved / t / 1e9, "limit_gb_s": moved / lim / 1e9,
                "throughput_vs_limit": lim / t,
            })  # fmt: skip
            if rank == 0 and moved:
                r = rows[-1]
                print(f"{r['src']:>10} -> {r['dst']:<10} {moved / 1e6:8.1f} MB  "
                      f"{t * 1e3:8.1f} ms  {r['throughput_gb_s']:6.2f} GB/s  "
                      f"limit {r['limit_gb_s']:6.2f} GB/s  ratio {r['throughput_vs_limit']:.2f}",
                      flush=True)  # fmt: skip
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


JOB = (  # the default job (SFT, reward model, PPO) with short SFT and reward stages
    "plan=search", "sft.steps=20", "reward.steps=20", "logger.wandb_mode=disabled",
    "logger.progress=false", "generate.backend=hf", "run.name=bench-overhead",
)  # fmt: skip


def default_job_overhead(steps: int) -> dict:
    """`relay train` on the default job under plan=search: per RL step, the shares of
    wall time spent in reallocation and in orchestration (the time no call computes),
    averaged over steps 2.. (step 1 includes first-call costs and is reported apart)."""
    import subprocess

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "launch.cli", "train", *JOB, f"train.steps={steps}",
               f"run.output_dir={out}"]  # fmt: skip
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        folder = Path(out) / "bench-overhead"
        plan = json.loads((folder / "plan.json").read_text())
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r and r.get("step")]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["step"] > 1)

    return {
        "overhead_share": mean("perf/non_compute_share"),  # reallocation + orchestration
        "orchestration_share": mean("perf/overhead_share"),
        "realloc_share": mean("perf/realloc_share"),
        "job": {
            "overrides": list(JOB),
            "rl_steps": steps,
            "step_s_mean": mean("time/step_s"),
            "first_step": {k: rows[0][k] for k in ("time/step_s", "perf/non_compute_share")},
            "plan_calls": {
                n: f"{c['mesh']} dp{c['dp']} tp{c['tp']} pp{c['pp']}"
                for n, c in plan["calls"].items()
            },  # fmt: skip
            "reallocations": plan["reallocations"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--job-steps", type=int, default=12,
                    help="RL steps of the default job under plan=search (0: skip it)")  # fmt: skip
    ap.add_argument("--only-job", action="store_true",
                    help="rerun the job part only, keeping the pairs of the existing results")  # fmt: skip
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "realloc.json"))
    args = ap.parse_args()
    if args.only_job:
        result = json.loads(Path(args.out).read_text())
        result.update(default_job_overhead(args.job_steps))
        result["command_job"] = "python " + " ".join(sys.argv)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"overhead_share {result['overhead_share']:.3f} -> {args.out}")
        return
    shape = shape_of(args)
    print(f"model: {shape.params / 1e6:.1f}M parameters, {shape.params * 4 / 1e6:.0f} MB fp32; "
          f"{WORLD} processes, gloo", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), args, rows_path), nprocs=WORLD)
        rows = json.loads(Path(rows_path).read_text())
    # pairs whose every piece is already on its device move nothing between processes
    # (from dp4, every device holds the whole model): local copies, no transport to rate
    moving = [r for r in rows if r["moved_bytes"] > 0]
    for r in rows:
        if r["moved_bytes"] == 0:
            r["throughput_vs_limit"] = None
    ratios = [r["throughput_vs_limit"] for r in moving]
    result = {
        "benchmark": "realloc",
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },  # fmt: skip
        "model_parameters": shape.params,
        "processes": WORLD,
        "transport": "gloo (loopback)",
        "repeats": args.repeats,
        "pairs": rows,
        "pairs_moving_bytes": len(moving),
        "local_only_pairs_max_s": max(
            (r["realloc_s"] for r in rows if r["moved_bytes"] == 0), default=None
        ),  # fmt: skip
        "throughput_vs_limit": statistics.median(ratios),
        "throughput_vs_limit_min": min(ratios),
    }
    if args.job_steps:
        result.update(default_job_overhead(args.job_steps))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"throughput_vs_limit: median {result['throughput_vs_limit']:.2f}, "
          f"min {result['throughput_vs_limit_min']:.2f}; overhead_share "
          f"{result.get('overhead_share')} -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
