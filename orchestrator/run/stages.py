"""The pipeline's stages before RL, each a one-call graph on one device of the same
runtime: SFT on demonstrations (result: models/sft) and the Bradley-Terry reward model
on preference pairs (result: models/reward), each from the user's files (data.sft_files,
data.preference_files) or else the task's own, written to the run folder's data/ and
read through the same path (orchestrator/data/train_rows.py). A finished stage is
skipped; a stopped one restarts on resume (these stages are short and keep no
checkpoints).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from algos.graph import MFC, CallKind, DataflowGraph
from algos.ppo import PAIR, PROMPT, reward_model_graph, sft_graph
from orchestrator.data.text import take
from orchestrator.data.train_rows import preference_batch, sft_batch
from orchestrator.run.assets import stage_rows
from orchestrator.run.checkpoint import write_atomic
from orchestrator.run.context import Run, call_seed
from orchestrator.run.evaluation import evaluate_policy
from orchestrator.run.specs import optim_spec, role_spec
from orchestrator.runtime.graph_runner import run_graph
from orchestrator.runtime.metrics import without_spans
from orchestrator.runtime.plan_runtime import PlanRuntime, one_device_plan
from orchestrator.workers.spec import RoleSpec

Batches = Callable[[int], dict[str, torch.Tensor]]
Evaluation = Callable[[PlanRuntime, int], dict[str, float]]


def run_sft(run: Run) -> dict[str, float]:
    """SFT as a one-call graph; its result is a Hugging Face folder, models/sft."""
    cfg, s = run.cfg, run.cfg.sft
    optim = optim_spec(run, s.lr, s.warmup_steps, s.batch_samples, s.micro_batch_samples_per_device)
    optim = replace(optim, micro_batch_tokens=s.micro_batch_tokens_per_device)
    spec = role_spec(run, "actor", "causal", run.assets.base, optim, generates=True)
    rows = functools.cache(lambda: stage_rows(cfg, run.paths, run.assets, "sft", "train"))
    width = None if cfg.data.sft_files else run.assets.task.answer_tokens

    def batch(step: int) -> dict[str, torch.Tensor]:
        chosen = take(rows(), s.batch_samples, step - 1, cfg.run.seed)
        return sft_batch(run.assets.tokenizer, chosen, width)

    def evaluate(runtime: PlanRuntime, step: int) -> dict[str, float]:
        return evaluate_policy(run, runtime, step)

    return run_stage(run, "sft", sft_graph(), spec, s.steps, batch, evaluate, run.paths.sft_model)


REWARD_EVAL = DataflowGraph(
    "reward_model_eval",
    [MFC("reward_eval", "reward", CallKind.INFERENCE, "pair_accuracy", (*PROMPT, *PAIR))],
    dataset_keys=(*PROMPT, *PAIR),
)


def run_reward_model(run: Run) -> dict[str, float]:
    """Bradley-Terry reward model on preference pairs (data.preference_files, else the
    task's), as a one-call graph,
    initialised from the SFT model (a scalar head on its last valid token); its result
    is a Hugging Face folder, models/reward. Held-out pair accuracy is logged."""
    cfg, r = run.cfg, run.cfg.reward
    optim = optim_spec(run, r.lr, r.warmup_steps, r.batch_pairs, r.micro_batch_pairs_per_device)
    spec = role_spec(run, "reward", "value", run.policy_init, optim)

    rows = functools.cache(lambda: stage_rows(cfg, run.paths, run.assets, "preference", "train"))
    width = None if cfg.data.preference_files else run.assets.task.answer_tokens
    tok = run.assets.tokenizer

    def batch(step: int) -> dict[str, torch.Tensor]:
        return preference_batch(tok, take(rows(), r.batch_pairs, step - 1, cfg.run.seed), width)

    def evaluate(runtime: PlanRuntime, step: int) -> dict[str, float]:
        held_out = stage_rows(cfg, run.paths, run.assets, "preference", "eval")
        if not held_out:
            return {}
        data = preference_batch(tok, held_out, width)
        # on the trained replica itself (a call outside the plan runs on its role's)
        return without_spans(run_graph(REWARD_EVAL, runtime, data, {})["reward_eval"])

    return run_stage(run, "reward_model", reward_model_graph(), spec, r.steps, batch, evaluate,
                     run.paths.reward_model)  # fmt: skip


def run_stage(
    run: Run,
    stage: str,
    graph: DataflowGraph,
    spec: RoleSpec,
    steps: int,
    batch: Batches,
    evaluate: Evaluation,
    out: Path,
) -> dict[str, float]:
    """A one-call training stage: `steps` calls of the graph on `batch(step)`,
    `evaluate(runtime, step)` at the end, the trained role saved as a Hugging Face folder
    `out` with a DONE marker holding the evaluation."""
    done_marker = out / "DONE"
    if done_marker.is_file():
        return json.loads(done_marker.read_text())
    cfg = run.cfg
    (call,) = graph.calls
    c = cfg.cluster
    runtime = PlanRuntime(graph, one_device_plan(graph), [spec], 1, 1, c.threads_per_device,
                          c.device)  # fmt: skip
    run.paths.write_workers(stage, runtime.processes())
    tracker = run.tracker(stage, steps, 0)
    m: dict[str, Any] = {}
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            options = {
                "seed": call_seed(cfg.run.seed, step, call.name),
                "step": step - 1,
                "reweight": cfg.reweight,
            }
            m = without_spans(
                run_graph(graph, runtime, batch(step), {call.name: options})[call.name]
            )
            m["time/step_s"] = time.perf_counter() - t0
            if step == steps:
                m.update(evaluate(runtime, step))
            tracker.log(step, m)
            if run.stop_requested and step < steps:
                print(f"relay: stopped during {stage} (step {step}); it restarts on resume")
                run.stopped_early = True
                return {}
        result = {k: v for k, v in m.items() if k.startswith("eval/")}
        tmp = out.with_name(f".{out.name}_tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        runtime.write_model(spec.name, tmp)
        shutil.rmtree(out, ignore_errors=True)
        (tmp / spec.name).rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        write_atomic(done_marker, json.dumps(result))
    finally:
        tracker.close()
        runtime.stop()
    return result
