"""Inference interfaces: log-probs (reference, actor), per-token values (critic) and
rewards (a reward model, the task's verifier or the user's function).

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from orchestrator.data.text import pad_id
from orchestrator.data.user_data import check_finite
from orchestrator.interfaces.common import canonical, module_of, outputs_as
from orchestrator.interfaces.registry import Metrics, WorkerContext, fused_interface, interface
from orchestrator.models.batch import (
    Batch,
    full_sequence,
    join_rows,
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


def sequence_scores(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Reward-model scores [B]: the scalar head's output at the last valid token of
    prompt + response (the last prompt token if the response is empty)."""
    ids, attn, pos = full_sequence(batch)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos)
    last = batch["prompt_ids"].shape[1] - 1 + batch["response_mask"].sum(-1)
    return out.logits[:, :, 0].float().gather(1, last.long()[:, None]).squeeze(1)


@interface("reward")
def reward(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Scores from the role's reward function, its reward model, or else the task's
    verifier; the verifier's exact-match flags (or the function's "correct") are returned
    as task_correct, NaN where neither says."""
    return reward_fused(ctx, [batch], [options])[0]


@fused_interface("reward")
def reward_fused(
    ctx: WorkerContext, batches: list[Batch], options: list[Mapping[str, Any]]
) -> list[tuple[Batch, Metrics]]:
    """`reward` of several calls of one replica (ReMax's sampled and greedy responses):
    the reward model scores all their rows in one forward pass."""
    from orchestrator.data.scoring import score_rows
    from orchestrator.data.text import decode_responses

    names = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "prompt_index")
    parts = []
    for batch, opts in zip(batches, options):
        b = canonical(batch, opts, names)
        rows = ctx.rows.at("train", b["prompt_index"].tolist())
        responses = decode_responses(ctx.tokenizer, b["response_ids"])
        parts.append((b, rows, responses, score_rows(ctx.task, ctx.task_rows, ctx.reward, rows,
                                                     responses)))  # fmt: skip
    modelled = [i for i, p in enumerate(parts) if p[3].scores is None and ctx.module is not None]
    by_model: dict[int, torch.Tensor] = {}
    if modelled:
        joined = join_rows([parts[i][0] for i in modelled], pad_id(ctx.tokenizer))
        ctx.module.eval()
        with torch.no_grad():
            scores = sequence_scores(ctx.module, joined)
        sizes = [parts[i][0]["prompt_ids"].shape[0] for i in modelled]
        by_model = dict(zip(modelled, scores.split(sizes)))
    return [_reward_outputs(ctx, *p, by_model.get(i), o) for i, (p, o) in
            enumerate(zip(parts, options))]  # fmt: skip


def _reward_outputs(
    ctx: WorkerContext,
    b: Batch,
    rows: list[Any],
    responses: list[str],
    scored: Any,
    model_scores: torch.Tensor | None,
    options: Mapping[str, Any],
) -> tuple[Batch, Metrics]:
    """One reward call's scores, task_correct and metrics."""
    device = b["response_ids"].device
    if scored.scores is not None:
        scores = torch.tensor(scored.scores, device=device, dtype=torch.float32)
        source = f"reward.function {ctx.reward.mix.label}"
    elif model_scores is None:
        if scored.verifier is None:
            raise RuntimeError("no reward: the rows are not the task's and no function is given")
        scores, source = torch.tensor(scored.verifier, device=device).float(), "the task's verifier"
    else:
        scores, source = model_scores, "the reward model"
    pairs = [(str(r.prompt), s) for r, s in zip(rows, responses)]
    check_finite(scores.tolist(), pairs, source)
    correct = torch.tensor(scored.correct if scored.correct is not None else [math.nan] * len(rows),
                           device=device, dtype=torch.float32)  # fmt: skip
    prefix = options.get("metric_prefix", "rollout/")
    metrics = {
        f"{prefix}reward_mean": float(scores.mean()),
        f"{prefix}reward_min": float(scores.min()),
        f"{prefix}reward_max": float(scores.max()),
        **scored.metrics(prefix),
    }
    return outputs_as(options, [scores, correct]), metrics
