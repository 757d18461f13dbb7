"""The single-token bandit of ALGORITHMS.md through the real graph, controller and
workers: V = 8 tokens, a uniform reference (zero LM head), reward 1 for one token, KL
coefficient 0.5 (k1, in the reward). The KL-regularised optimum is
p* = e^2 / (e^2 + 7) = 7.389 / 14.389 = 0.5135; every algorithm must settle within 0.03."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator.config.load import load_config
from orchestrator.data.tasks import BanditTask
from orchestrator.models.hf import load_causal_lm
from orchestrator.run.controller import Controller
from orchestrator.run.tracking import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 80


def action_probability(model_dir: Path) -> float:
    """p("0" | empty prompt) of the saved actor, exactly (softmax over the vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id]])).logits[0, -1]
    assert logits.shape[0] == 8, "the bandit's vocabulary is 4 digits + 4 special tokens"
    return float(torch.softmax(logits, -1)[tok.convert_tokens_to_ids("0")])


def test_optimum_is_the_documented_number() -> None:
    # e^(1/0.5) = e^2 = 7.389056; 7.389056 / (7.389056 + 8 - 1) = 0.513519
    assert math.isclose(BanditTask(4).optimum(0.5), 0.513519, abs_tol=1e-6)


@pytest.mark.parametrize("algo", ["ppo", "remax", "grpo", "rloo"])
def test_bandit_settles_at_the_kl_regularised_optimum(
    ray_cluster, tmp_path: Path, algo: str
) -> None:
    overrides = [
        f"algo={algo}",
        "task=bandit",
        f"run.output_dir={tmp_path}",
        f"run.name=bandit-{algo}",
        f"train.steps={STEPS}",
        f"run.save_every_steps={STEPS}",
        "train.eval_every_steps=1000",
        "train.actor_lr=4.5e-4",
        "train.warmup_steps=0",
        # with a constant lr the final iterate, which the test reads, keeps moving around
        # the optimum (by up to 0.06 in p(a*) at lr 3e-4); the cosine decay lets it settle.
        # 80 steps at 4.5e-4 (was 120 at 3e-4): the same lr sum, 40 s less per algorithm
        "train.lr_schedule=cosine",
        # one token from transformers' sampler: the algorithms are under test here, and a
        # vLLM engine's start costs more than the 80 steps (test_vllm tests the engine)
        "generate.backend=hf",
        "logger.wandb_mode=disabled",
        "logger.progress=false",
    ]
    if algo in ("ppo", "remax"):  # one sample per prompt: 64 samples per step
        overrides += ["train.rollout_batch_prompts=64", "train.samples_per_prompt=1"]
    else:  # groups of 4: 16 x 4 = 64 samples per step
        overrides += ["train.rollout_batch_prompts=16", "train.samples_per_prompt=4"]
    cfg = load_config(overrides)
    assert cfg.algo.kl_coef == 0.5 and cfg.algo.kl_estimator == "k1" and not cfg.algo.kl_in_loss
    summary = Controller(cfg).run()
    ckpt = Path(summary["run_dir"]) / "checkpoints" / f"step_{STEPS}"
    p = action_probability(ckpt / "actor")
    optimum = BanditTask(4).optimum(0.5)
    rows = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["step"] > 0]
    sampled = sum(r["rollout/task_accuracy"] for r in rows[-40:]) / 40  # share of a* sampled
    print(f"bandit {algo}: p(a*) = {p:.4f}, sampled share over the last 40 steps {sampled:.4f}")
    assert abs(p - optimum) < 0.03, f"{algo}: p(a*) = {p:.4f}, optimum {optimum:.4f}"
    assert abs(sampled - optimum) < 0.03, f"{algo}: sampled share {sampled:.4f}"
