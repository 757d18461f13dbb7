"""Frozen models (the reference, a reward model) held in a narrower dtype than the
trainer's float32 (`model.frozen_dtype`), and what that costs in accuracy.

`cast_frozen` measures the cost once, when the replica is built: the module's outputs on a
probe batch (the run's first RL prompts) in float32, then in the new dtype, compared
token by token (log-probs of each next token for a language model, the scalar score of
each sequence for a reward model). Every call of the role logs the two figures.
"""

from __future__ import annotations

import torch


def _outputs(
    module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, value: bool
) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = module(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    if value:  # the score at each sequence's last token
        return logits[:, -1, 0]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp[mask[:, 1:].bool() & mask[:, :-1].bool()]


def cast_frozen(
    module: torch.nn.Module, dtype: torch.dtype, ids: torch.Tensor, mask: torch.Tensor, value: bool
) -> dict[str, float]:
    """Cast `module` to `dtype` in place; returns the mean and largest absolute change of
    its outputs on the probe batch (ids, mask: left padded)."""
    before = _outputs(module, ids, mask, value) if ids.numel() else torch.zeros(0)
    module.to(dtype)
    if not ids.numel():
        return {}
    diff = (_outputs(module, ids, mask, value) - before).abs()
    return {"mean": float(diff.mean()), "max": float(diff.max())}
