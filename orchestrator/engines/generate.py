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
    stop_strings: tuple[str, ...] = ()  # end a response at the token completing one (kept)
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


Part = tuple[torch.Tensor, torch.Tensor, SamplingParams]  # prompt ids, mask, params


def generate_many(engine: Any, parts: list[Part]) -> list[Generation]:
    """Several prompt batches, each with its own sampling parameters (a ReMax step's
    sampled and greedy responses): in one engine batch where the engine takes one
    (`generate_many`: vLLM, per-request parameters), else one after another."""
    many = getattr(engine, "generate_many", None)
    return many(parts) if many is not None else [engine.generate(*p) for p in parts]


class HFGenerateEngine:
    """transformers' generate on the replica's current module (no copy of the weights).

    fixed_length: decode max_new_tokens steps even when every row has stopped (rows still
    end at their first stop token): replicas whose forward pass is a collective (ZeRO-3
    over several ranks) must all take the same number of steps."""

    def __init__(
        self,
        module: torch.nn.Module,
        eos_id: int,
        pad_id: int,
        fixed_length: bool = False,
        tokenizer: Any = None,  # for stop strings: generate stops at them early
    ) -> None:
        self.module = module
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.fixed_length = fixed_length
        self.tokenizer = tokenizer

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
        if params.stop_strings and self.tokenizer is not None and not self.fixed_length:
            kwargs.update(stop_strings=list(params.stop_strings), tokenizer=self.tokenizer)
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


def cut_at_strings(
    tokenizer: Any, gen: Generation, strings: tuple[str, ...], pad_id: int
) -> Generation:
    """Each response cut after the token whose text completes its first stop string (that
    token kept, as a stop token is): whatever the backend, the same cut. Rows without one
    are left as they are."""
    if not strings:
        return gen
    ids, mask = gen.response_ids.clone(), gen.response_mask.clone()

    def has(row: list[int]) -> bool:
        text = tokenizer.decode(row, skip_special_tokens=False)
        return any(s in text for s in strings)

    for i in range(ids.shape[0]):
        row = ids[i, : int(mask[i].sum())].tolist()
        if not has(row):
            continue
        lo, hi = 1, len(row)  # the shortest prefix holding a stop string (binary search)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has(row[:mid]) else (mid + 1, hi)
        mask[i, lo:] = 0
        ids[i, lo:] = pad_id
    logprobs = None if gen.logprobs is None else gen.logprobs * mask
    return Generation(ids, mask, logprobs)


class StopStrings:
    """A generation engine whose responses end at `params.stop_strings` (cut_at_strings)."""

    def __init__(self, inner: Any, tokenizer: Any, pad_id: int) -> None:
        self.inner, self.tokenizer, self.pad_id = inner, tokenizer, pad_id

    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        gen = self.inner.generate(prompt_ids, prompt_mask, params)
        return cut_at_strings(self.tokenizer, gen, params.stop_strings, self.pad_id)

    def generate_many(self, parts: list[Part]) -> list[Generation]:
        gens = generate_many(self.inner, parts)
        return [cut_at_strings(self.tokenizer, g, p[2].stop_strings, self.pad_id)
                for g, p in zip(gens, parts)]  # fmt: skip

    def __getattr__(self, name: str) -> Any:  # sequence_logprobs, engine, ...
        if name == "inner":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.inner, name)
