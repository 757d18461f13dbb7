"""Pipeline-stage interfaces: SFT on demonstrations, Bradley-Terry reward-model training
and its held-out pair accuracy.

Shape legend: B = sequences, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from algos.losses import (
    bradley_terry_loss,
    logprobs_from_logits,
    masked_mean,
)
from algos.reweight import (
    per_sample_token_mean,
)
from orchestrator.interfaces.common import (
    SliceWeights,
    mean_metrics,
    module_of,
    reweighting_of,
    train_loop,
)
from orchestrator.interfaces.inference import sequence_scores
from orchestrator.interfaces.registry import Metrics, WorkerContext, interface
from orchestrator.models.batch import (
    Batch,
    response_logits,
)


def _sft_token_losses(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T] of the demonstration's response, and the logits [B, T, V]."""
    logits = response_logits(module, mb)
    return -logprobs_from_logits(logits, mb["response_ids"]), logits


@interface("sft_train")
def sft_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Negative log-likelihood of the demonstration's response tokens (token mean), or its
    loss-based reweighting over the mini-batch's samples."""

    def difficulty(module: torch.nn.Module, mb: Batch) -> torch.Tensor:
        return per_sample_token_mean(_sft_token_losses(module, mb)[0], mb["response_mask"])[0]

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        nll, logits = _sft_token_losses(module, mb)
        plain = masked_mean(nll, mask)
        loss = plain if w is None else w.loss(*per_sample_token_mean(nll, mask))
        acc = masked_mean((logits.argmax(-1) == mb["response_ids"]).float(), mask)
        return loss, {"loss/sft": float(plain.detach()), "train/sft_token_accuracy": float(acc)}

    rows = train_loop(ctx, batch, options, 1, loss_fn, True, reweighting_of(options, difficulty))
    return {}, mean_metrics(rows)


def _pair_losses(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss per pair -log sigmoid(r_chosen - r_rejected) [B], and the margin."""
    prompt = {"prompt_ids": mb["prompt_ids"], "prompt_mask": mb["prompt_mask"]}
    chosen = sequence_scores(
        module, {**prompt, "response_ids": mb["chosen_ids"], "response_mask": mb["chosen_mask"]}
    )
    rejected = sequence_scores(
        module,
        {**prompt, "response_ids": mb["rejected_ids"], "response_mask": mb["rejected_mask"]},
    )
    return bradley_terry_loss(chosen, rejected)


@interface("reward_model_train")
def reward_model_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Bradley-Terry training of a scalar reward head on the last valid token (mean over
    pairs, or its loss-based reweighting)."""

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        losses, margin = _pair_losses(module, mb)
        plain = losses.mean()
        loss = plain if w is None else w.loss(losses, torch.ones_like(losses))
        return loss, {
            "loss/reward_model": float(plain.detach()),
            "train/reward_accuracy": float((margin > 0).float().mean()),
            "train/reward_margin": float(margin.detach().mean()),
        }

    reweighting = reweighting_of(options, lambda module, mb: _pair_losses(module, mb)[0])
    rows = train_loop(ctx, batch, options, 1, loss_fn, False, reweighting)
    return {}, mean_metrics(rows)


@interface("pair_accuracy")
def pair_accuracy(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Held-out preference accuracy of the reward model (share with r_chosen > r_rejected)."""
    module = module_of(ctx)
    module.eval()
    with torch.no_grad():
        losses, margin = _pair_losses(module, batch)
    return {}, {
        "eval/reward_model_accuracy": float((margin > 0).float().mean()),
        "eval/reward_model_loss": float(losses.mean()),
    }
