"""Text to token ids and back, and the step's batch of a dataset.

Prompts are left-padded with bos first (where the tokenizer has one: Qwen2's has none),
responses right-padded ending in eos; padding takes the tokenizer's pad id, or its eos id
where it has no pad token. A dataset is read in a fresh permutation per epoch, so a
step's batch is a function of (seed, step).

Shapes: B = batch size, P = prompt tokens (bos included), T = response tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def pad_id(tokenizer: Any) -> int:
    """The id padding takes: the pad token's, else eos's (padding is masked out, and a
    response is cut at its first eos before padding matters)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "the tokenizer has neither a pad nor an eos token; Relay needs eos to end responses "
        "(set eos_token in the model folder's tokenizer_config.json)"
    )


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos id] where the tokenizer has a bos token, else [] (as Qwen2's tokenizers)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def encode_prompts(
    tokenizer: Any, prompts: list[str], add_bos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, P] (long), bos first where the tokenizer has one (and `add_bos`:
    a chat template's text brings its own special tokens), LEFT-padded with `pad_id`, and
    the attention mask [B, P] (long, 1 on bos and prompt tokens, 0 on padding)."""
    if not prompts:
        raise ValueError("encode_prompts: no prompts given")
    prefix, pad = bos_prefix(tokenizer) if add_bos else [], pad_id(tokenizer)
    rows = [
        [*prefix, *ids] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(
            f"prompt {empty[0]} encodes to no tokens and the tokenizer has no bos token to "
            "start it; give every prompt some text"
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def decode_responses(tokenizer: Any, response_ids: torch.Tensor) -> list[str]:
    """Response strings from ids [B, T]: each row is cut at its first eos (excluded) and
    pad tokens are dropped. Other special tokens (bos, unk) stay visible as "<bos>",
    "<unk>", so a response cannot become correct by hiding them."""
    ids = response_ids.detach().to("cpu", torch.long)
    before_eos = torch.cumsum(ids == tokenizer.eos_token_id, dim=1) == 0
    keep = before_eos & (ids != pad_id(tokenizer))
    rows = [row[k].tolist() for row, k in zip(ids, keep)]
    return [tokenizer.decode(r, skip_special_tokens=False) for r in rows]


def pad_right(
    tokenizer: Any, seqs: list[list[int]], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, width] (width: the longest, or at least `width`) and mask."""
    w = max(width or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), w), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_responses(
    tokenizer: Any, responses: list[str], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids [B, width] ending in eos, and their mask."""
    eos = tokenizer.eos_token_id
    seqs = [tokenizer.encode(r, add_special_tokens=False)[: width - 1] + [eos] for r in responses]
    return pad_right(tokenizer, seqs, width)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def take(items: list[Any], batch_size: int, step: int, seed: int) -> list[Any]:
    """The step's batch: consecutive slices of a fresh permutation per epoch."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, len(items))
        order = epoch_order(len(items), seed, epoch)
        n = min(batch_size - len(out), len(items) - offset)
        out.extend(items[i] for i in order[offset : offset + n])
        pos += n
    return out


def data_position(n: int, batch_size: int, steps_done: int, seed: int) -> dict[str, int]:
    """Where reading stands after `steps_done` steps of `take`: the epoch, the index in
    that epoch's permutation, the permutation's seed, and the dataset's size."""
    epoch, index = divmod(steps_done * batch_size, n)
    return {"epoch": epoch, "index": index, "seed": seed, "rows": n}
