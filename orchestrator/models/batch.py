"""Sequence batches: prompt (left padded) + response (right padded) layouts, and the
forward passes every role shares (response log-probs, per-token values).

Shape legend: B = sequences, P = prompt tokens, T = response tokens, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from algos.losses import logprobs_from_logits

Batch = dict[str, torch.Tensor]


def full_sequence(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """ids [B, P+T], attention mask [B, P+T], position ids [B, P+T] of prompt+response."""
    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos


def join_rows(batches: list[Mapping[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """Prompt + response batches stacked into one: prompts left padded and responses right
    padded to the widest (prompt_ids, prompt_mask, response_ids, response_mask)."""
    p = max(b["prompt_ids"].shape[1] for b in batches)
    t = max(b["response_ids"].shape[1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in
                                          ("prompt_ids", "prompt_mask", "response_ids",
                                           "response_mask")}  # fmt: skip
    for b in batches:
        left, right = p - b["prompt_ids"].shape[1], t - b["response_ids"].shape[1]
        out["prompt_ids"].append(torch.nn.functional.pad(b["prompt_ids"], (left, 0), value=pad))
        out["prompt_mask"].append(torch.nn.functional.pad(b["prompt_mask"], (left, 0)))
        out["response_ids"].append(
            torch.nn.functional.pad(b["response_ids"], (0, right), value=pad)
        )
        out["response_mask"].append(torch.nn.functional.pad(b["response_mask"], (0, right)))
    return {k: torch.cat(v) for k, v in out.items()}


def response_logits(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """Logits [B, T, V] that predict each response token (positions P-1 .. P+T-2), divided
    by the sampling temperature so that log-probs are those of the sampling distribution
    (before any top-p/top-k filtering, as in verl and OpenRLHF)."""
    ids, attn, pos = full_sequence(batch)
    p, t = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    logits = out.logits[:, p - 1 : p + t - 1].float()
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs [B, T] of the response tokens (0 on padding)."""
    logits = response_logits(model, batch, temperature)
    lp = logprobs_from_logits(logits, batch["response_ids"])
    return lp * batch["response_mask"].float()


def response_values(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Values [B, T] from a token-classification value model: V before each response token."""
    ids, attn, pos = full_sequence(batch)
    p, t = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos)
    values = out.logits[:, p - 1 : p + t - 1, 0].float()
    return values * batch["response_mask"].float()


def select(batch: Mapping[str, torch.Tensor], index: torch.Tensor) -> Batch:
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def minibatches(
    batch: Mapping[str, torch.Tensor], size: int, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Shuffled (if a generator is given) mini-batches of `size` samples."""
    n = next(iter(batch.values())).shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, size):
        yield select(batch, order[start : start + size])


def token_micro_batches(
    mini: Mapping[str, torch.Tensor], dp: int, dp_rank: int, budget: int
) -> list[torch.Tensor]:
    """This rank's share of a mini-batch (rows chunked over `dp` ranks) as micro-batches
    of at most `budget` tokens each: rows sorted by length, packed while rows x (longest
    prompt + longest response) fits (a row over the budget alone is a micro-batch of
    its own). Every rank gets the same number of micro-batches (the most any rank
    needs; its largest ones split), as collectives run per micro-batch."""
    prompt = mini["prompt_mask"].sum(-1).tolist()
    response = mini["response_mask"].sum(-1).tolist()
    n = len(prompt)

    def pack(rows: list[int]) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        p = r = 0
        for i in sorted(rows, key=lambda i: (prompt[i] + response[i], i)):
            wp, wr = max(p, prompt[i]), max(r, response[i])
            if groups[-1] and (len(groups[-1]) + 1) * (wp + wr) > budget:
                groups.append([])
                wp, wr = prompt[i], response[i]
            groups[-1].append(i)
            p, r = wp, wr
        return groups

    shares = [s.tolist() for s in torch.arange(n).chunk(dp)]
    most = max(len(pack(s)) for s in shares)
    mine = pack(shares[dp_rank])
    while len(mine) < most:
        j = max(range(len(mine)), key=lambda g: len(mine[g]))
        g = mine.pop(j)
        mine[j:j] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [torch.tensor(g, dtype=torch.long) for g in mine]


def trim_padding(micro: Mapping[str, torch.Tensor]) -> Batch:
    """A micro-batch without the columns that are padding in every row: the left of the
    prompts (`prompt_*` tensors [B, P]) and the right of the responses (every other
    tensor [B, T, ...]). Positions come from the masks, so no valid token's result
    changes."""
    p_full, t_full = micro["prompt_mask"].shape[1], micro["response_mask"].shape[1]
    p = max(int(micro["prompt_mask"].sum(-1).max()), 1)
    t = max(int(micro["response_mask"].sum(-1).max()), 1)
    out: Batch = {}
    for k, v in micro.items():
        if k.startswith("prompt_") and v.ndim >= 2 and v.shape[1] == p_full:
            out[k] = v[:, p_full - p :]
        elif not k.startswith("prompt_") and v.ndim >= 2 and v.shape[1] == t_full:
            out[k] = v[:, :t]
        else:
            out[k] = v
    return out


def repeat_interleave(batch: Mapping[str, torch.Tensor], n: int) -> Batch:
    """Repeat every sample n times in place (a, a, b, b, ...)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}


def gather_inputs(parts: Iterable[Any]) -> Batch:
    """A call's input batch from its inputs: whole batches (dicts), and the parts of calls
    run data-parallel under a plan, (dp index, outputs) from each rank that returns some
    (None from the others), concatenated in dp order."""
    merged: Batch = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for part in parts:
        if part is None:
            continue
        if isinstance(part, tuple):
            dp_i, outputs = part
            for k, v in outputs.items():
                pieces.setdefault(k, []).append((dp_i, v))
        else:
            merged.update(part)
    for k, ranked in pieces.items():
        merged[k] = torch.cat([v for _, v in sorted(ranked, key=lambda p: p[0])])
    return merged


def is_stop(tokens: torch.Tensor, stop_ids: int | tuple[int, ...]) -> torch.Tensor:
    """Where tokens (any shape) are eos or another stop token (bool, same shape)."""
    stops = torch.tensor(stop_ids if isinstance(stop_ids, tuple) else (stop_ids,))
    return torch.isin(tokens, stops.to(tokens.device))


def finish_responses(
    response: torch.Tensor, stop_ids: int | tuple[int, ...], pad_id: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad responses to `width`, mask up to and including the first stop token (eos or
    another), pad after it."""
    b, t = response.shape
    if t < width:
        response = torch.cat([response, response.new_full((b, width - t), pad_id)], dim=1)
    is_eos = is_stop(response, stop_ids)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    response = torch.where(after_eos, torch.full_like(response, pad_id), response)
    return response.contiguous(), mask
