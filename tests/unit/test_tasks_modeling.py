"""Embedded tasks, the local tokenizer and the tiny models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from orchestrator.controller import encode_responses, take
from orchestrator.engines import finish_responses
from orchestrator.modeling import (
    MODEL_PRESETS,
    build_model_folder,
    decode_responses,
    encode_prompts,
    load_causal_lm,
    load_value_model,
    train_tokenizer,
)
from orchestrator.tasks import build_task_data, make_task


def test_sort_and_add_answers_and_rewards() -> None:
    sort = make_task("sort", 4)
    assert sort.answer("S3120=") == "0123"
    assert sort.reward("S3120=", "0123") == 1.0
    # 3 of 4 positions match ("0132" vs "0123": 0,1 match, 3 != 2, 2 != 3 -> 2 of 4)
    assert sort.reward("S3120=", "0132") == pytest.approx(0.5 * 2 / 4)
    assert sort.reward("S3120=", "") == 0.0
    add = make_task("add", 3)
    # 123 + 045 = 168, written least significant digit first: "861"
    assert add.answer("A123+045=") == "861"
    # 999 + 999 = 1998 -> "8991"
    assert add.answer("A999+999=") == "8991"
    assert add.correct("A123+045=", "861") and not add.correct("A123+045=", "168")
    with pytest.raises(ValueError, match="tasks"):
        make_task("nope", 3)


def test_demonstration_noise_rate() -> None:
    task, rng = make_task("sort", 8), random.Random(0)
    prompts = [task.sample_prompt(rng) for _ in range(2000)]
    wrong = sum(task.demonstration(p, rng, 0.3) != task.answer(p) for p in prompts)
    assert abs(wrong / 2000 - 0.3) < 0.05


def test_task_data_is_deterministic_and_eval_is_held_out() -> None:
    task = make_task("sort", 6)
    a = build_task_data(task, 300, 300, 50, 0.3, seed=7)
    b = build_task_data(task, 300, 300, 50, 0.3, seed=7)
    assert a == b
    held = set(a.eval_prompts)
    assert len(held) == 50
    assert not held & {p for p, _ in a.sft_pairs} and not held & set(a.rl_prompts)


def test_take_walks_epochs_without_repeats() -> None:
    items = list(range(10))
    first_epoch = take(items, 5, 0, seed=1) + take(items, 5, 1, seed=1)
    assert sorted(first_epoch) == items
    assert take(items, 5, 2, seed=1) != take(items, 5, 0, seed=1)  # a fresh order per epoch
    assert len(take(items, 4, 2, seed=1)) == 4  # 8..11 crosses the epoch boundary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(make_task("add", 3).alphabet(), tmp_path_factory.mktemp("tok"))


def test_tokenizer_is_character_level(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    ids = tokenizer.encode("A123+045=", add_special_tokens=False)
    assert len(ids) == 9
    assert tokenizer.decode(ids) == "A123+045="
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode("A123+045=", add_special_tokens=False) == ids


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


def test_presets_have_head_dim_64() -> None:
    for preset in MODEL_PRESETS.values():
        assert preset["hidden_size"] // preset["num_attention_heads"] >= 64


def test_models_build_save_and_reload(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    folder = build_model_folder(
        "tiny", tokenizer, tmp_path / "m", seed=3, max_position_embeddings=32
    )
    again = build_model_folder(
        "tiny", tokenizer, tmp_path / "m2", seed=3, max_position_embeddings=32
    )
    a, b = load_causal_lm(folder), load_causal_lm(again)
    ids, mask = encode_prompts(tokenizer, ["A1+2=", "A12+34="])
    torch.testing.assert_close(
        a(input_ids=ids, attention_mask=mask).logits,
        b(input_ids=ids, attention_mask=mask).logits,
        rtol=0,
        atol=0,
    )
    critic = load_value_model(folder)
    for k, v in a.model.state_dict().items():
        assert torch.equal(critic.model.state_dict()[k], v)
    values = critic(input_ids=ids, attention_mask=mask).logits
    assert values.shape == (2, ids.shape[1], 1) and torch.all(values == 0)
    with torch.no_grad():
        critic.score.weight.normal_()
    critic.save_pretrained(tmp_path / "critic")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(
        reloaded(input_ids=ids, attention_mask=mask).logits,
        critic(input_ids=ids, attention_mask=mask).logits,
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="presets"):
        build_model_folder("huge", tokenizer, tmp_path / "x", seed=0)
