"""Generation engines: the protocol every backend implements and transformers' generate.

- `GenerationEngine`: what a generate call needs of a backend;
- `HFGenerateEngine`: transformers' generate on the replica's own module (no copy);
- `orchestrator.engines.vllm_engine.VLLMEngine`: vLLM behind the same protocol.

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from orchestrator.models.batch import finish_responses


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end a response, like eos (kept, masked in)
    min_new_tokens: int = 0  # no stop before this many tokens (benchmarks: fixed lengths)


class Generation(NamedTuple):
    response_ids: torch.Tensor  # [B, T], pad after the first stop token
    response_mask: torch.Tensor  # [B, T], 1 up to and including the first stop token
    logprobs: torch.Tensor | None  # [B, T] the sampler's log-probs (None: not reported)


class GenerationEngine(Protocol):
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        """Responses of T = params.max_new_tokens tokens; eos and params.stop_token_ids
        end a response."""
        ...


class HFGenerateEngine:
    """transformers' generate on the replica's current module (no copy of the weights).

    fixed_length: decode max_new_tokens steps even when every row has stopped (rows still
    end at their first stop token): replicas whose forward pass is a collective (ZeRO-3
    over several ranks) must all take the same number of steps."""

    def __init__(
        self, module: torch.nn.Module, eos_id: int, pad_id: int, fixed_length: bool = False
    ) -> None:
        self.module = module
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.fixed_length = fixed_length

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        """The sampler is the trainer's module itself, so no separate log-probs."""
        torch.manual_seed(params.seed)
        was_training = self.module.training
        self.module.eval()
        stops = (self.eos_id, *params.stop_token_ids)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            # no stop token: every step runs (finish_responses cuts rows at their first)
            eos_token_id=None
            if self.fixed_length
            else stops[0]
            if len(stops) == 1
            else list(stops),
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        if params.min_new_tokens:
            kwargs.update(min_new_tokens=params.min_new_tokens)
        if params.greedy or params.temperature == 0:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else None,
            )
        out = self.module.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        if was_training:
            self.module.train()
        response = out[:, prompt_ids.shape[1] :]
        ids, mask = finish_responses(response, stops, self.pad_id, params.max_new_tokens)
        return Generation(ids, mask, None)
