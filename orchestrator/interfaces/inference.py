"""Inference interfaces: log-probs (reference, actor), per-token values (critic) and
rewards (a reward model, the task's verifier or the user's function).

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from orchestrator.data.user_data import call_reward_function, check_finite
from orchestrator.interfaces.common import canonical, module_of, outputs_as
from orchestrator.interfaces.registry import Metrics, WorkerContext, interface
from orchestrator.models.batch import (
    Batch,
    full_sequence,
    response_logprobs,
    response_values,
)


@interface("logprobs")
def logprobs(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = module_of(ctx)
    module.eval()
    with torch.no_grad():
        lp = response_logprobs(module, batch, options.get("temperature", 1.0))
    return outputs_as(options, [lp]), {}


@interface("values")
def values(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = module_of(ctx)
    module.eval()
    with torch.no_grad():
        v = response_values(module, batch)
    return {"values": v}, {}


def decode_pairs(tokenizer: Any, batch: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    from orchestrator.data.text import decode_responses

    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    responses = decode_responses(tokenizer, batch["response_ids"])
    return [p.replace(" ", "") for p in prompts], responses


def sequence_scores(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Reward-model scores [B]: the scalar head's output at the last valid token of
    prompt + response (the last prompt token if the response is empty)."""
    ids, attn, pos = full_sequence(batch)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos)
    last = batch["prompt_ids"].shape[1] - 1 + batch["response_mask"].sum(-1)
    return out.logits[:, :, 0].float().gather(1, last.long()[:, None]).squeeze(1)


@interface("reward")
def reward(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Scores from the role's reward model, or from the task's verifier if the role holds
    no model; the verifier's exact-match flags (task accuracy) are returned either way."""
    b = canonical(batch, options, ("prompt_ids", "prompt_mask", "response_ids", "response_mask"))
    prompts, responses = decode_pairs(ctx.tokenizer, b)
    device = b["response_ids"].device
    pairs = list(zip(prompts, responses))
    verifier = torch.tensor([ctx.task.reward(p, r) for p, r in pairs], device=device).float()
    correct = torch.tensor([float(ctx.task.correct(p, r)) for p, r in pairs], device=device)
    if ctx.reward_fn is not None:
        spec = str(ctx.reward_function)
        values = call_reward_function(ctx.reward_fn, spec, pairs)
        scores = torch.tensor(values, device=device, dtype=torch.float32)
        source = f"reward.function {spec}"
    elif ctx.module is None:
        scores, source = verifier, "the task's verifier"
    else:
        ctx.module.eval()
        with torch.no_grad():
            scores = sequence_scores(ctx.module, b)
        source = "the reward model"
    check_finite(scores.tolist(), pairs, source)
    prefix = options.get("metric_prefix", "rollout/")
    metrics = {
        f"{prefix}reward_mean": float(scores.mean()),
        f"{prefix}reward_min": float(scores.min()),
        f"{prefix}reward_max": float(scores.max()),
        f"{prefix}task_accuracy": float(correct.mean()),
        f"{prefix}verifier_reward_mean": float(verifier.mean()),
    }
    return outputs_as(options, [scores, correct.float()]), metrics
