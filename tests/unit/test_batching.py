"""Batch plumbing: the step's data slice, prompt/response encodings, eos masking."""

from __future__ import annotations

import pytest
import torch

from orchestrator.data.tasks import make_task
from orchestrator.data.text import decode_responses, encode_prompts, encode_responses, take
from orchestrator.models.batch import finish_responses
from orchestrator.models.hf import train_tokenizer


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


def test_reward_scores_read_the_last_valid_token_whatever_the_padding(tmp_path) -> None:
    """A padded batch scores each pair as that pair alone, unpadded, scores at its last
    token (the last prompt token for an empty response)."""
    from orchestrator.interfaces.inference import sequence_scores
    from orchestrator.models.hf import build_model_folder, load_value_model

    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "m", seed=0, max_position_embeddings=32)
    torch.manual_seed(0)
    model = load_value_model(folder, init_std=0.5)
    prompts, responses = ["S12=", "S4321="], ["123", ""]
    pids, pmask = encode_prompts(tok, prompts)
    rids, rmask = encode_responses(tok, responses, 6)
    rmask[1] = 0  # an empty response: no token, not even eos
    batch = {"prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids,
             "response_mask": rmask}  # fmt: skip
    with torch.no_grad():
        scores = sequence_scores(model, batch)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = [tok.bos_token_id, *tok.encode(p, add_special_tokens=False)]
            if r:
                ids += [*tok.encode(r, add_special_tokens=False), tok.eos_token_id]
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1, 0]
            torch.testing.assert_close(scores[i], alone, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def no_bos_tokenizer():
    """A byte-level BPE tokenizer as Qwen2 ships one: no bos token, pad = eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["What is 12 plus 30? The answer is 42.", "Sort 3 1 2: 1 2 3."] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def test_a_tokenizer_without_bos_and_with_pad_equal_to_eos(no_bos_tokenizer) -> None:
    """Qwen2's tokenizers have no bos token: prompts start with their own first token,
    padding takes the pad (= eos) id, and responses still end at their first eos."""
    tok = no_bos_tokenizer
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id
    prompts = ["What is 12 plus 30?", "Sort 3 1 2:"]
    ids, mask = encode_prompts(tok, prompts)
    for row, m, p in zip(ids, mask, prompts):
        own = tok.encode(p, add_special_tokens=False)
        assert row[m.bool()].tolist() == own  # no bos, nothing else added
        assert (row[~m.bool()] == tok.eos_token_id).all()
    rids, rmask = encode_responses(tok, [" The answer is 42.", " 1 2 3."], width=12)
    assert decode_responses(tok, rids) == [" The answer is 42.", " 1 2 3."]
    with pytest.raises(ValueError, match="no bos token"):
        encode_prompts(tok, ["", "x"])


def test_token_budget_micro_batches_cover_each_share_alike_on_every_rank() -> None:
    from orchestrator.models.batch import token_micro_batches, trim_padding

    g = torch.Generator().manual_seed(0)
    prompt_len = torch.randint(2, 10, (24,), generator=g)
    response_len = torch.randint(1, 30, (24,), generator=g)
    mini = {
        "prompt_mask": (torch.arange(10) >= 10 - prompt_len[:, None]).long(),
        "response_mask": (torch.arange(30) < response_len[:, None]).long(),
        "advantages": torch.randn(24, 30, generator=g),
        "prompt_ids": torch.randint(0, 5, (24, 10), generator=g),
    }
    budget = 80
    per_rank = [token_micro_batches(mini, 3, r, budget) for r in range(3)]
    assert len({len(m) for m in per_rank}) == 1  # the same count on every rank
    for rank, micros in enumerate(per_rank):
        got = sorted(i for m in micros for i in m.tolist())
        assert got == list(range(rank * 8, rank * 8 + 8))  # its share, each row once
        for m in micros:
            cut = trim_padding({k: v[m] for k, v in mini.items()})
            if len(m) > 1:  # padded cost within the budget (a lone long row may exceed it)
                assert (
                    len(m) * (cut["prompt_mask"].shape[1] + cut["response_mask"].shape[1]) <= budget
                )
            assert cut["advantages"].shape == cut["response_mask"].shape
            # only all-padding columns are cut
            assert cut["response_mask"].sum() == mini["response_mask"][m].sum()
            assert cut["prompt_mask"].sum() == mini["prompt_mask"][m].sum()
            assert torch.equal(
                cut["prompt_ids"], mini["prompt_ids"][m][:, 10 - cut["prompt_ids"].shape[1] :]
            )


def test_join_rows_pads_prompts_left_and_responses_right() -> None:
    import torch

    from orchestrator.models.batch import full_sequence, join_rows

    a = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.tensor([[1, 1, 1]]),
         "response_ids": torch.tensor([[8]]), "response_mask": torch.tensor([[1]])}  # fmt: skip
    b = {"prompt_ids": torch.tensor([[9]]), "prompt_mask": torch.tensor([[1]]),
         "response_ids": torch.tensor([[1, 2, 3]]), "response_mask": torch.tensor([[1, 1, 0]])}  # fmt: skip
    j = join_rows([a, b], pad=0)
    assert j["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert j["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert j["response_ids"].tolist() == [[8, 0, 0], [1, 2, 3]]
    assert j["response_mask"].tolist() == [[1, 0, 0], [1, 1, 0]]
    # positions count real tokens only: the joined row's are the lone row's, shifted
    _, _, pos = full_sequence(j)
    assert pos[1, 2:5].tolist() == [0, 1, 2]
