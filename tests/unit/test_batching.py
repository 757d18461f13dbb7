"""Batch plumbing: the step's data slice, prompt/response encodings, eos masking."""

from __future__ import annotations

import pytest
import torch

from orchestrator.controller import encode_responses, take
from orchestrator.engines import finish_responses
from orchestrator.modeling import decode_responses, encode_prompts, train_tokenizer
from orchestrator.tasks import make_task


def test_take_walks_epochs_without_repeats() -> None:
    items = list(range(10))
    first_epoch = take(items, 5, 0, seed=1) + take(items, 5, 1, seed=1)
    assert sorted(first_epoch) == items
    assert take(items, 5, 2, seed=1) != take(items, 5, 0, seed=1)  # a fresh order per epoch
    assert len(take(items, 4, 2, seed=1)) == 4  # 8..11 crosses the epoch boundary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(make_task("add", 3).alphabet(), tmp_path_factory.mktemp("tok"))


def test_prompt_and_response_encoding(tokenizer) -> None:
    ids, mask = encode_prompts(tokenizer, ["A1+2=", "A12+34="])
    assert ids.shape == (2, 8)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # left padded, bos first
    assert ids[0, 2].item() == tokenizer.bos_token_id
    rids, rmask = encode_responses(tokenizer, ["3", "64"], width=4)
    assert rmask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert decode_responses(tokenizer, rids) == ["3", "64"]


def test_finish_responses_masks_through_first_eos() -> None:
    eos, pad = 2, 0
    resp = torch.tensor([[5, 2, 7], [5, 6, 7]])
    ids, mask = finish_responses(resp, eos, pad, width=4)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
