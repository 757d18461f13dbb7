"""The planner's estimate against executed plans: the default job's RL step under several
plans, estimated time per iteration next to the measured step time on this machine.

Runs `relay train` on the default job (SFT and reward-model stages shortened: they do
not change the RL step) under plan=per_role, symmetric, heuristic, search and a hand-made
mixed plan file, `--steps` RL steps each, all generating with transformers (the planner
does not model vLLM). Per plan: `plan/est_step_s` and the mean `time/step_s` over steps
2.. (step 1 pays first-call costs), their relative error |est - measured| / measured,
and the same per call. Adds `calibration` and `max_rel_error` to
benchmarks/results/planner.json (the other keys are benchmarks/planner.py's).

    .venv/bin/python benchmarks/calibration.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ("sft.steps=20", "reward.steps=20", "logger.wandb_mode=disabled", "logger.progress=false",
       "generate.backend=hf")  # fmt: skip
MIXED = {  # call -> (mesh, dp, tp): a plan no mode makes, with reallocations both ways
    "actor_gen": ("d0-1", 1, 2),
    "ref_inf": ("d3", 1, 1),
    "reward_inf": ("d2", 1, 1),
    "critic_inf": ("d0-1", 2, 1),
    "actor_train": ("d2-3", 2, 1),
    "critic_train": ("d0-3", 2, 2),
}


def train(out: str, name: str, steps: int, *plan: str) -> Path:
    cmd = [sys.executable, "-m", "launch.cli", "train", *JOB, *plan, f"train.steps={steps}",
           f"run.output_dir={out}", f"run.name={name}"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return Path(out) / name


def mixed_plan_file(folder: Path, template: Path) -> Path:
    data = json.loads(template.read_text())
    data["mode"] = "file"
    for call, (mesh, dp, tp) in MIXED.items():
        data["calls"][call].update(mesh=mesh, dp=dp, tp=tp, pp=1, micro_batches=1)
    path = folder / "mixed.json"
    path.write_text(json.dumps(data))
    return path


def measure(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "rl" and r.get("step", 0) > 1
            and "time/step_s" in r]  # fmt: skip
    plan = json.loads((folder / "plan.json").read_text())
    est = rows[0]["plan/est_step_s"]
    measured = statistics.fmean(r["time/step_s"] for r in rows)
    calls = {}
    for call in plan["calls"]:
        e = rows[0][f"plan/est_{call}_s"]
        m = statistics.fmean(r[f"time/{call}_s"] for r in rows)
        calls[call] = {"estimated_s": e, "measured_s": m, "rel_error": abs(e - m) / m}
    return {
        "plan": {
            n: f"{c['mesh']} dp{c['dp']} tp{c['tp']} pp{c['pp']}" for n, c in plan["calls"].items()
        },  # fmt: skip
        "estimated_step_s": est,
        "measured_step_s": measured,
        "rel_error": abs(est - measured) / measured,
        "steps_measured": len(rows),
        "calls": calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "planner.json"))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("per_role", "symmetric", "heuristic", "search"):
            results[mode] = measure(train(out, mode, args.steps, f"plan={mode}"))
        mixed = mixed_plan_file(Path(out), Path(out) / "symmetric" / "plan.json")
        results["mixed (file)"] = measure(
            train(out, "mixed", args.steps, "plan=file", f"plan.path={mixed}")
        )
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["calibration"] = {
        "command": "python " + " ".join(sys.argv),
        "job": list(JOB),
        "rl_steps": args.steps,
        "plans": results,
    }
    data["max_rel_error"] = max(r["rel_error"] for r in results.values())
    path.write_text(json.dumps(data, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:14s} estimated {r['estimated_step_s']:.4f} s  measured "
              f"{r['measured_step_s']:.4f} s  rel error {r['rel_error']:.2f}")  # fmt: skip
    print(f"max_rel_error {data['max_rel_error']:.2f} -> {path}")


if __name__ == "__main__":
    main()
