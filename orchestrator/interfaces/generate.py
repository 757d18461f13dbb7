"""The generate interface: sample (or decode greedily) responses with the replica's
generation engine, and the trainer's log-probs of them when the call asks.

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from orchestrator.engines.generate import Generation, SamplingParams, generate_many
from orchestrator.interfaces.common import canonical, module_of, outputs_as
from orchestrator.interfaces.registry import Metrics, WorkerContext, fused_interface, interface
from orchestrator.models.batch import (
    Batch,
    is_stop,
    response_logprobs,
)


@interface("generate")
def generate(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Sample (or, with option greedy, decode greedily) responses. A call that declares a
    third output also gets the log-probs from the same forward pass the trainer uses."""
    return generate_fused(ctx, [batch], [options])[0]


@fused_interface("generate")
def generate_fused(
    ctx: WorkerContext, batches: list[Batch], options: list[Mapping[str, Any]]
) -> list[tuple[Batch, Metrics]]:
    """`generate` of several calls of one replica (each its own prompts and sampling
    parameters, ReMax's sampled and greedy responses) as one engine batch."""
    if ctx.generator is None:
        raise RuntimeError(f"role '{ctx.role}' has no generation engine")
    prompts, params = [], []
    for batch, opts in zip(batches, options):
        p: SamplingParams = opts["sampling"]
        params.append(replace(p, greedy=True) if opts.get("greedy") else p)
        prompts.append(canonical(batch, opts, ("prompt_ids", "prompt_mask")))
    parts = [(pr["prompt_ids"], pr["prompt_mask"], p) for pr, p in zip(prompts, params)]
    gens = generate_many(ctx.generator, parts)
    return [_finish(ctx, *args) for args in zip(prompts, gens, params, options)]


def _finish(
    ctx: WorkerContext,
    prompts: Batch,
    gen: Generation,
    params: SamplingParams,
    options: Mapping[str, Any],
) -> tuple[Batch, Metrics]:
    """A generate call's outputs (the trainer's log-probs too, if it declares them) and
    its metrics, from its responses."""
    response_ids, response_mask = gen.response_ids, gen.response_mask
    out = [response_ids, response_mask]
    prefix = options.get("metric_prefix", "rollout/")
    metrics: Metrics = {}
    if len(options["outputs"]) > 2:
        full = {**prompts, "response_ids": response_ids, "response_mask": response_mask}
        module = module_of(ctx)
        module.eval()
        with torch.no_grad():
            trainer = response_logprobs(module, full, params.temperature)
        out.append(trainer)
        if gen.logprobs is not None:  # the sampler is another engine: how far apart?
            diff = (gen.logprobs - trainer).abs() * response_mask
            tokens = response_mask.sum().clamp(min=1)
            metrics[f"{prefix}logprob_diff"] = float(diff.sum() / tokens)
            metrics[f"{prefix}logprob_diff_max"] = float(diff.max())
    lengths = response_mask.sum(-1).float()
    # a response stopped if it is shorter than max_new_tokens (eos, a stop token or a stop
    # string ended it) or its last token is eos or a stop token (else it was cut)
    last = response_ids.gather(1, (response_mask.sum(-1, keepdim=True) - 1).clamp(min=0))
    stopped = is_stop(last.squeeze(1), (ctx.tokenizer.eos_token_id, *params.stop_token_ids))
    stopped |= lengths < params.max_new_tokens
    metrics[f"{prefix}response_length_mean"] = float(lengths.mean())
    metrics[f"{prefix}truncated_frac"] = float(1 - stopped.float().mean())
    return outputs_as(options, out), metrics
