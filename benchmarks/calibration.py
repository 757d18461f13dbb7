"""The planner's estimate against executed plans, and whether the searched plan wins when
measured: per algorithm, the RL step under every plan mode, estimated next to measured.

Per algorithm (`--algos`, default ppo, remax, grpo) on the default job (its SFT and
reward-model stages shortened: they do not change the RL step; generating with
transformers) or the `large` preset (`--preset large`):

1. `relay profile --calls` measures the job's calls under every candidate layout
   (planner.measured); the plans below are made and estimated with that profile;
2. `relay train` runs `--steps` RL steps under plan=per_role, symmetric, heuristic,
   search and a hand-made mixed plan file (reallocations both ways), one after another;
   `--rounds` times, the order reversed every other round (this machine drifts by up to
   30% over minutes: alternating spreads the drift over the plans). The first run trains
   the SFT and reward models; every other run starts its RL stage from them
   (`model.path`, `reward.path`), so all plans train the same weights;
3. per plan: `plan/est_step_s` against the median `time/step_s` over steps 2.. of every
   round (step 1 pays first-call costs), their relative error |est - measured| /
   measured, the same per call, and `measured_best_hand_over_search`: the best measured
   step time of per_role, symmetric and heuristic over the searched plan's (above 1: the
   search won). Where the search ran a hand-made plan (`plan.min_gain`: nothing it found
   was estimated enough faster), `search_plan_is` names it, and the ratio uses the
   runs of that plan under both modes together (one plan, one measurement).

Writes `calibration` and `max_rel_error` (over every algorithm and plan) into
benchmarks/results/planner.json (its other keys are benchmarks/planner.py's).

    .venv/bin/python benchmarks/calibration.py [--steps 6] [--algos ppo,remax,grpo]
        [--preset default|large] [--profile-steps 3] [--profile-rounds 2] [--rounds 2]
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
sys.path.insert(0, str(REPO))  # before benchmarks/, whose planner.py shadows the package

from launch.profile_calls import pass_order  # noqa: E402

JOB = ("sft.steps=20", "reward.steps=20", "logger.wandb_mode=disabled", "logger.progress=false",
       "generate.backend=hf")  # fmt: skip
PRESETS = {"default": (), "large": ("model.preset=large",)}
HAND = ("per_role", "symmetric", "heuristic")
# a plan no mode makes, with reallocations both ways: (mesh, dp, tp) by call, or else by
# role and kind (ReMax's greedy calls follow their sampled twins)
MIXED = {
    "actor_gen": ("d0-1", 1, 2),
    "actor_greedy_gen": ("d0-1", 1, 2),
    "ref_inf": ("d3", 1, 1),
    "reward_inf": ("d2", 1, 1),
    "reward_greedy_inf": ("d2", 1, 1),
    "critic_inf": ("d0-1", 2, 1),
    "actor_train": ("d2-3", 2, 1),
    "critic_train": ("d0-3", 2, 2),
}


def cli(*args: str) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    print("+ relay", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env, check=True)


def train(out: str, name: str, steps: int, job: tuple[str, ...], *plan: str) -> Path:
    cli("train", *job, *plan, f"train.steps={steps}", f"run.output_dir={out}", f"run.name={name}")
    return Path(out) / name


def mixed_plan_file(folder: Path, template: Path) -> Path:
    data = json.loads(template.read_text())
    data["mode"] = "file"
    for call in data["calls"]:
        mesh, dp, tp = MIXED[call]
        data["calls"][call].update(mesh=mesh, dp=dp, tp=tp, pp=1, micro_batches=1)
    path = folder / "mixed.json"
    path.write_text(json.dumps(data))
    return path


def step_rows(folder: Path) -> list[dict]:
    """The RL steps of a run that time a plain step: from step 2 on, evaluations left out."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "rl" and r.get("step", 0) > 1
            and "time/step_s" in r and not any(k.startswith("eval/") for k in r)]  # fmt: skip


def measure(folders: list[Path]) -> dict:
    """A plan's estimate against the median of its runs' step times (each run a round)."""
    runs = [step_rows(f) for f in folders]
    rows = [r for run in runs for r in run]
    plan = json.loads((folders[0] / "plan.json").read_text())
    est = rows[0]["plan/est_step_s"]
    measured = statistics.median(r["time/step_s"] for r in rows)
    calls = {}
    for call in plan["calls"]:
        e = rows[0][f"plan/est_{call}_s"]
        m = statistics.median(r[f"time/{call}_s"] for r in rows)
        calls[call] = {"estimated_s": e, "measured_s": m, "rel_error": abs(e - m) / m}
    return {
        "plan": {
            n: f"{c['mesh']} dp{c['dp']} tp{c['tp']} mb{c['micro_batches']}"
            for n, c in plan["calls"].items()
        },  # fmt: skip
        "estimated_step_s": est,
        "measured_step_s": measured,
        "rel_error": abs(est - measured) / measured,
        "steps_measured": len(rows),
        "round_medians_s": [statistics.median(r["time/step_s"] for r in run) for run in runs],
        "calls": calls,
    }


def calibrate(
    algo: str,
    preset: str,
    steps: int,
    profile_steps: int,
    profile_rounds: int,
    rounds: int,
    out: str,
) -> dict:
    job = (*JOB, f"algo={algo}", *PRESETS[preset])
    profile = Path(out) / f"calls-{algo}-{preset}.json"
    cli("profile", "--calls", "--steps", str(profile_steps), "--rounds", str(profile_rounds),
        "--out", str(profile), *job)  # fmt: skip
    job = (*job, f"cluster.calls_profile={profile}")
    modes = [*HAND, "search", "mixed"]
    folders: dict[str, list[Path]] = {m: [] for m in modes}
    models: tuple[str, ...] = ()  # after the first run: its SFT and reward models
    for n, i in enumerate(pass_order(len(modes), rounds)):  # every other round backwards
        mode = modes[i]
        name = f"{algo}-{mode}-{n // len(modes) + 1}"
        if mode == "mixed":  # round 1's symmetric plan (run before it), placed by MIXED
            mixed = mixed_plan_file(Path(out), folders["symmetric"][0] / "plan.json")
            plan: tuple[str, ...] = ("plan=file", f"plan.path={mixed}")
        else:
            plan = (f"plan={mode}",)
        folders[mode].append(train(out, name, steps, (*job, *models), *plan))
        if not models:
            first = folders[mode][0] / "models"
            models = ("sft.enabled=false", f"model.path={first / 'sft'}",
                      f"reward.path={first / 'reward'}")  # fmt: skip
    results = {("mixed (file)" if m == "mixed" else m): measure(folders[m]) for m in modes}
    # plan.min_gain: a search that finds no plan estimated enough faster runs the best
    # hand-made plan. Runs of one plan measure one thing: they are pooled for the ratio.
    same = [m for m in HAND if results[m]["plan"] == results["search"]["plan"]]
    one = measure([f for m in ("search", *same) for f in folders[m]])["measured_step_s"]
    pooled = {m: one if m == "search" or m in same else results[m]["measured_step_s"]
              for m in (*HAND, "search")}  # fmt: skip
    best_hand = min(pooled[m] for m in HAND)
    return {
        "job": list(job[:-1]),
        "profile": json.loads(profile.read_text()),
        "plans": results,
        "max_rel_error": max(r["rel_error"] for r in results.values()),
        "search_plan_is": same,
        "measured_best_hand_over_search": best_hand / pooled["search"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-rounds", type=int, default=2, help="relay profile --calls --rounds")
    ap.add_argument("--algos", default="ppo,remax,grpo")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each plan, order alternating")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "planner.json"))
    args = ap.parse_args()
    by_algo = {}
    with tempfile.TemporaryDirectory() as out:
        for algo in args.algos.split(","):
            by_algo[algo] = calibrate(algo, args.preset, args.steps, args.profile_steps,
                                      args.profile_rounds, args.rounds, out)  # fmt: skip
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["calibration"] = {
        "command": "python " + " ".join(sys.argv),
        "preset": args.preset,
        "rl_steps": args.steps,
        "rounds": args.rounds,
        "algorithms": by_algo,
    }
    data["max_rel_error"] = max(a["max_rel_error"] for a in by_algo.values())
    path.write_text(json.dumps(data, indent=1) + "\n")
    for algo, a in by_algo.items():
        for name, r in a["plans"].items():
            print(f"{algo:6s} {name:14s} estimated {r['estimated_step_s']:.4f} s  measured "
                  f"{r['measured_step_s']:.4f} s  rel error {r['rel_error']:.2f}")  # fmt: skip
        print(f"{algo:6s} measured_best_hand_over_search "
              f"{a['measured_best_hand_over_search']:.3f}")  # fmt: skip
    print(f"max_rel_error {data['max_rel_error']:.2f} -> {path}")


if __name__ == "__main__":
    main()
