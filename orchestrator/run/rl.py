"""The RL stage: the algorithm's graph, one step after another, on the plan's workers.

A step reads top to bottom: take the step's prompts, give every call its options (seeds
from (run seed, step, call), the KL coefficient), run the graph (calls whose inputs are
ready run at once, on their own meshes), gather the calls' metrics, update the KL
controller, log, evaluate now and then, checkpoint. A resumed run first restores the
newest checkpoint (weights, optimizer states, KL controller, random states) and goes on
as if it had never stopped.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algos.graph import CallKind, DataflowGraph
from algos.ppo import ALGORITHM_GRAPHS
from algos.rewards import make_kl_controller
from orchestrator.config.schema import to_dict
from orchestrator.data.text import data_position, encode_prompts, take
from orchestrator.data.user_data import RewardError
from orchestrator.run.checkpoint import write_atomic
from orchestrator.run.context import Run, call_seed
from orchestrator.run.evaluation import evaluate_policy
from orchestrator.run.folder import RunError
from orchestrator.run.specs import rl_specs, sampling
from orchestrator.run.tracking import plot_learning_curves, read_metrics
from orchestrator.runtime.graph_runner import Launched, finish, launch, rollout_calls
from orchestrator.runtime.metrics import busy_seconds, without_spans
from orchestrator.runtime.plan_runtime import PlanRuntime
from planner.plan import offloaded_roles
from planner.plan import to_dict as plan_to_dict


def run_rl(run: Run, after_fault: bool = False) -> dict[str, float]:
    """The RL stage from its start or its newest checkpoint (after a dead worker: the
    newest checkpoint of this very run, whatever run.resume says)."""
    cfg, t = run.cfg, run.cfg.train
    graph = ALGORITHM_GRAPHS[cfg.algo.name]()
    a = cfg.algo
    kl_ctl = make_kl_controller(a.kl_controller, a.kl_coef, a.kl_target_per_token,
                                a.kl_horizon_samples)  # fmt: skip
    run.ckpt.recover()
    resume_from = run.ckpt.newest_valid() if after_fault else resume_point(run)
    if resume_from is not None:
        check_plan(run, resume_from)
        done = json.loads((resume_from / "controller.json").read_text())["step"]
        if done >= t.steps:  # before any worker starts: there is nothing for them to do
            print(f"relay: run {run.paths.root} already finished at step {done} of "
                  f"{t.steps}; nothing to do (raise train.steps to continue it).")  # fmt: skip
            return final_metrics(run)
    runtime = rl_runtime(run, graph)
    trainable = list(graph.trainable_roles)
    start_step = skipped = 0  # skipped: steps without an update (reward.on_error=skip)
    if resume_from is not None:
        start_step, skipped = restore(run, resume_from, runtime, trainable, kl_ctl)
    tracker = run.tracker("rl", t.steps, start_step)
    n_samples = t.rollout_batch_prompts * t.samples_per_prompt
    last: dict[str, float] = {}
    try:
        if start_step == 0:
            tracker.record(0, evaluate_policy(run, runtime, 0))
        ahead: Launched | None = None  # the next step's rollout, launched during this one
        trains = {c.name for c in graph.calls} - rollout_calls(graph)
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.perf_counter()
            rollout, ahead = ahead, None
            off_policy = rollout is not None
            try:
                if rollout is None:
                    rollout = launch_rollout(run, graph, runtime, step, kl_ctl)
                if t.overlap_generation and step < t.steps and not saves_at(run, step):
                    # sampled from the weights before this step's update: one step off-policy
                    ahead = launch_rollout(run, graph, runtime, step + 1, kl_ctl)
                opts = step_options(run, graph, step, kl_ctl)
                per_call = finish(runtime, launch(graph, runtime, opts, trains, rollout).running)
            except RewardError as e:
                reason = str(getattr(e, "cause", None) or e).strip()
                if cfg.reward.on_error == "stop":
                    stop_on_reward_error(run, step, reason, runtime, trainable, kl_ctl, skipped)
                skipped += 1
                print(f"relay: step {step} skipped, no update (reward.on_error=skip): {reason}",
                      flush=True)  # fmt: skip
                per_call = {}
            m: dict[str, float] = {k: v for call in per_call.values() for k, v in call.items()}
            m["rollout/skipped_steps"] = skipped
            m["rollout/off_policy_steps"] = float(off_policy)  # sampled one update behind
            if per_call:
                kl_ctl.update(m.get("rollout/kl_to_ref_token_mean", 0.0), n_samples)
            m["time/step_s"] = time.perf_counter() - t0
            m["perf/samples_per_s"] = n_samples / m["time/step_s"]
            if per_call:
                m.update(plan_metrics(run, m))
            m = without_spans(m)
            tokens = m.get("rollout/response_length_mean", 0.0) * n_samples
            m["perf/response_tokens_per_s"] = tokens / m["time/step_s"]
            if step % t.eval_every_steps == 0 or step == t.steps:
                m.update(evaluate_policy(run, runtime, step))
            tracker.log(step, m)
            last = m
            stop = run.stop_requested  # read once: a signal may land at any point
            if saves_at(run, step) or stop:
                save_checkpoint(run, step, runtime, trainable, kl_ctl, skipped)
            if stop and step < t.steps:
                run.stopped_early = True
                print(f"relay: stopped at step {step} with a checkpoint; the same command resumes")
                break
            if step % cfg.logger.plot_every_steps == 0:
                plot_learning_curves(run.paths.root)
    finally:
        tracker.close()
        runtime.stop()
    return {k: v for k, v in last.items() if k.startswith(("eval/", "rollout/"))}


def saves_at(run: Run, step: int) -> bool:
    """Whether the run writes a checkpoint after `step` (a signal aside). No rollout is
    launched ahead across one, so a run resumed there goes on as if never stopped."""
    return step % run.cfg.run.save_every_steps == 0 or step == run.cfg.train.steps


def launch_rollout(
    run: Run, graph: DataflowGraph, runtime: PlanRuntime, step: int, kl_ctl: Any
) -> Launched:
    """Dispatch the step's rollout (every call but the train calls) on its prompts."""
    opts = step_options(run, graph, step, kl_ctl)
    return launch(graph, runtime, opts, rollout_calls(graph), step_batch(run, graph, step))


def rl_runtime(run: Run, graph: DataflowGraph) -> PlanRuntime:
    """The RL graph's workers: one per device of the plan's cluster."""
    c, p = run.cfg.cluster, run.plan
    specs = [s for s in rl_specs(run) if s.name in graph.roles]
    plan = {name: (a.mesh, a.layout) for name, a in p.plan.items()}
    runtime = PlanRuntime(graph, plan, specs, c.num_nodes, c.devices_per_node,
                          c.threads_per_device, c.device, offloaded_roles(p.ctx, p.plan),
                          call_threads=c.call_threads == "auto",
                          fuse=run.cfg.plan.fuse_calls,
                          overlap=run.cfg.train.overlap_generation)  # fmt: skip
    run.paths.write_workers("rl", runtime.processes())
    if run.cfg.train.overlap_generation:
        shared = shared_devices(graph, runtime.sharding)
        if shared:
            print(f"relay: train.overlap_generation: the plan runs {shared}; there a "
                  "step's training waits behind the next step's rollout calls (still one "
                  "step off-policy, with less overlap). A plan that puts the train calls on "
                  "devices of their own overlaps them (docs/configuration.md).",
                  flush=True)  # fmt: skip
    return runtime


def shared_devices(graph: DataflowGraph, sharding: dict[str, Any]) -> str:
    """Where a rollout call and a train call share a device (they cannot overlap there),
    as 'actor_gen and actor_train on device 0, ...'; empty if nowhere."""
    trains = [c for c in graph.calls if c.kind is CallKind.TRAIN]
    found = []
    for r in graph.calls:
        if r.kind is CallKind.TRAIN:
            continue
        for tr in trains:
            both = sorted(set(sharding[r.name][0].devices) & set(sharding[tr.name][0].devices))
            if both:
                where = ", ".join(str(d) for d in both)
                found.append(f"{r.name} and {tr.name} on device{'s' * (len(both) > 1)} {where}")
    return "; ".join(found)


def step_batch(run: Run, graph: DataflowGraph, step: int) -> dict[str, torch.Tensor]:
    """The step's prompts, each repeated samples_per_prompt times in place (and once each
    for graphs that decode every prompt once, as ReMax's greedy baseline)."""
    t, tok, rows = run.cfg.train, run.assets.tokenizer, run.assets.rl_rows
    unique = take(list(range(len(rows))), t.rollout_batch_prompts, step - 1, run.cfg.run.seed)
    repeated = [i for i in unique for _ in range(t.samples_per_prompt)]
    bos = not rows[0].templated  # a chat template's text brings its own special tokens
    ids, mask = encode_prompts(tok, [rows[i].text for i in repeated], add_bos=bos)
    dataset = {"prompt_ids": ids, "prompt_mask": mask, "prompt_index": torch.tensor(repeated)}
    if "unique_prompt_ids" in graph.dataset_keys:
        uids, umask = encode_prompts(tok, [rows[i].text for i in unique], add_bos=bos)
        dataset.update(unique_prompt_ids=uids, unique_prompt_mask=umask,
                       unique_prompt_index=torch.tensor(unique))  # fmt: skip
    return dataset


def step_options(
    run: Run, graph: DataflowGraph, step: int, kl_ctl: Any
) -> dict[str, dict[str, Any]]:
    """Every call's options for the step: its seed, the algorithm's settings, the KL
    coefficient, and for a generating role's train call that its new weights go to the
    generator at once (the next step samples from them)."""
    cfg = run.cfg
    generating = {c.role for c in graph.calls if c.kind is CallKind.GENERATE}
    options = {}
    for call in graph.calls:
        seed = call_seed(cfg.run.seed, step, call.name)
        options[call.name] = {
            "seed": seed,
            "step": step - 1,
            "sampling": sampling(run, seed),
            "algo": cfg.algo,
            "policy": cfg.policy,
            "reweight": cfg.reweight,
            "kl_coef": kl_ctl.value,
            "temperature": cfg.generate.temperature,
            "samples_per_prompt": cfg.train.samples_per_prompt,
            "push_weights": call.kind is CallKind.TRAIN and call.role in generating,
            **call.options,
        }
    return options


def plan_metrics(run: Run, m: dict[str, float]) -> dict[str, float]:
    """The planner's estimates beside the measured times (plan/ next to time/), and the
    step's orchestration overhead: its wall time minus the time during which some call or
    reallocation computed (the union of their spans)."""
    busy, computing = busy_seconds(m), busy_seconds(m, reallocations=False)
    step = m["time/step_s"]
    realloc = sum(v for k, v in m.items() if k.startswith("time/realloc_"))
    out: dict[str, float] = {
        "time/busy_s": busy,
        "time/reallocation_s": realloc,
        "time/overhead_s": step - busy,
        "perf/overhead_share": max(step - busy, 0.0) / step,  # orchestration alone
        "perf/realloc_share": realloc / step,
        "perf/non_compute_share": max(step - computing, 0.0) / step,  # both
    }
    est = run.plan.estimate
    out["plan/est_step_s"] = est.time_per_iteration_s
    for name, sec in est.call_s.items():
        out[f"plan/est_{name}_s"] = sec
    for name, sec in est.realloc_s.items():
        if sec > 0:
            out[f"plan/est_realloc_{name}_s"] = sec
    return out


# ---------------------------------------------------------------------------- resume


def resume_point(run: Run) -> Path | None:
    r = run.cfg.run.resume
    if r == "never":
        return None
    if r == "auto":
        return run.ckpt.newest_valid()
    problems = run.ckpt.verify(Path(r))
    if problems:
        raise RunError(f"run.resume = {r!r} is not a complete checkpoint: {'; '.join(problems)}")
    return Path(r)


def check_plan(run: Run, checkpoint: Path) -> None:
    """A checkpoint resumes only under the plan it was written with (its optimizer state
    is split as that plan's layouts split it), and on the RL rows it read (its data
    position counts in them)."""
    state = json.loads((checkpoint / "controller.json").read_text())
    position = state.get("data_position")
    rows = len(run.assets.rl_rows) if run.assets is not None else None
    if position is not None and rows is not None and position["rows"] != rows:
        raise RunError(
            f"the checkpoint {checkpoint} read an RL dataset of {position['rows']} rows; this "
            f"run has {rows} (a changed file, or other prompts filtered for length), so its "
            "data position would not continue where it stopped. Fix: resume with the data "
            "and settings it used, or start a new run.name"
        )
    p = run.plan
    now = plan_to_dict(p.ctx, p.plan, p.mode, None)["calls"]
    if "plan" in state and state["plan"] != now:
        changed = sorted(k for k in now if now[k] != state["plan"].get(k))
        raise RunError(
            f"the checkpoint {checkpoint} was written under another plan (calls "
            f"{changed} differ from plan={p.mode}). Fix: resume with the plan it used, "
            f"plan=file plan.path={run.paths.root / 'plan.json'}, or start a new run.name"
        )


def restore(
    run: Run, folder: Path, runtime: PlanRuntime, trainable: list[str], kl_ctl: Any
) -> tuple[int, int]:
    """Load a checkpoint into the runtime and this process; returns (step, skipped)."""
    state = json.loads((folder / "controller.json").read_text())
    runtime.load(folder, trainable)
    kl_ctl.load_state_dict(state["kl_controller"])
    rng = torch.load(folder / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    run.saved_step = state["step"]
    return state["step"], state.get("skipped_steps", 0)


def final_metrics(run: Run) -> dict[str, float]:
    last: dict[str, float] = {}
    for row in read_metrics(run.paths.root / "metrics.jsonl"):
        if row.get("stage") == "rl":
            last.update({k: v for k, v in row.items() if k.startswith(("eval/", "rollout/"))})
    return last


def save_checkpoint(
    run: Run,
    step: int,
    runtime: PlanRuntime,
    trainable: list[str],
    kl_ctl: Any,
    skipped: int = 0,
) -> Path:
    """checkpoints/step_<step>: the trained roles, controller.json (step, data position,
    KL controller, wandb id, config, plan) and rng.pt, committed atomically."""
    tmp = run.ckpt.begin(step)
    runtime.save(tmp, trainable)
    p = run.plan
    state = {
        "step": step,
        "skipped_steps": skipped,
        "data_position_prompts": step * run.cfg.train.rollout_batch_prompts,
        "data_position": data_position(
            len(run.assets.rl_rows), run.cfg.train.rollout_batch_prompts, step, run.cfg.run.seed
        ),  # fmt: skip
        "kl_controller": kl_ctl.state_dict(),
        "wandb_id": run.wandb_id,
        "config": to_dict(run.cfg),
        "plan": plan_to_dict(p.ctx, p.plan, p.mode, None)["calls"],
    }
    write_atomic(tmp / "controller.json", json.dumps(state, indent=1))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, tmp / "rng.pt")  # fmt: skip
    committed = run.ckpt.commit(tmp, step)
    run.saved_step = step
    return committed


def stop_on_reward_error(
    run: Run,
    step: int,
    reason: str,
    runtime: PlanRuntime,
    trainable: list[str],
    kl_ctl: Any,
    skipped: int,
) -> None:
    """reward.on_error=stop: checkpoint the state before this step (nothing of the step
    was applied), then raise RunError naming the cause and the fixes."""
    newest = run.ckpt.newest_valid()
    if run.saved_step != step - 1 or newest is None:
        newest = save_checkpoint(run, step - 1, runtime, trainable, kl_ctl, skipped)
    raise RunError(
        f"step {step}: {reason}. reward.on_error = 'stop': the run stopped with its "
        f"checkpoint {newest} (step {step - 1}). Fix: correct the reward, then run the same "
        "command (resume=auto continues from that checkpoint), or pass reward.on_error=skip "
        "to skip such steps"
    )
