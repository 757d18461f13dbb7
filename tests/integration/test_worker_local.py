"""The PPO graph through real ModelWorkers in one process, without Ray: the same worker
code on CPU here and on a CUDA GPU (DeepSpeed over NCCL) where one is present."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from algos.ppo import ppo_graph
from orchestrator.config import AlgoConfig
from orchestrator.engines import OptimSpec, SamplingParams
from orchestrator.modeling import build_model_folder, encode_prompts, train_tokenizer
from orchestrator.tasks import make_task
from orchestrator.worker import ModelWorker, RoleSpec

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def make_workers(folder: Path, device: str, zero_stage: int) -> dict[str, ModelWorker]:
    optim = OptimSpec(1e-3, 1, 0.0, 1.0, zero_stage, 8, 4)
    common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4, device=device)
    specs = [
        RoleSpec("actor", "causal", str(folder), optim=optim, generation_backend="hf", **common),
        RoleSpec("ref", "causal", str(folder), **common),
        RoleSpec("critic", "value", str(folder), optim=optim, **common),
        RoleSpec("reward", "verifier", None, **common),
    ]
    return {s.name: ModelWorker(s) for s in specs}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_ppo_graph_on_workers(tmp_path: Path, device: str, zero_stage: int) -> None:
    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "base", seed=0, max_position_embeddings=32)
    workers = make_workers(folder, device, zero_stage)
    graph = ppo_graph()
    before = {k: v.clone() for k, v in workers["actor"].state_dict().items()}
    rng = random.Random(0)
    for step in range(2):
        ids, mask = encode_prompts(tok, [task.sample_prompt(rng) for _ in range(16)])
        dataset = {"prompt_ids": ids, "prompt_mask": mask}
        outputs: dict[str, dict] = {}
        metrics: dict[str, float] = {}
        for call in graph.order:
            opts = {
                "seed": step,
                "sampling": SamplingParams(6, seed=step),
                "kl_coef": 0.02,
                "output": call.outputs[0] if call.outputs else None,
                "algo": AlgoConfig(),
            }
            inputs = [dataset] + [outputs[p] for p in graph.parents(call)]
            outputs[call.name], m = workers[call.role].run(call, opts, *inputs)
            metrics.update(m)
        for key in ("loss/policy", "loss/value", "rollout/reward_mean", "train/grad_norm_actor"):
            assert math.isfinite(metrics[key]), key
        assert all(v.device.type == "cpu" for v in outputs["actor_gen"].values())
    after = workers["actor"].state_dict()
    assert any(not torch.equal(before[k].cpu(), after[k].cpu()) for k in before)
    # save, then restore into fresh workers: identical weights
    workers["actor"].save(str(tmp_path / "ckpt"))
    fresh = make_workers(folder, device, zero_stage)
    fresh["actor"].load(str(tmp_path / "ckpt"))
    restored = fresh["actor"].state_dict()
    for k in after:
        assert torch.equal(after[k].cpu(), restored[k].cpu()), k
    acc = fresh["actor"].evaluate(
        [task.sample_prompt(rng) for _ in range(8)], SamplingParams(6, greedy=True)
    )
    assert 0.0 <= acc["accuracy"] <= 1.0
