"""The local tokenizer, the tiny models, the value model and the batch helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.data.tasks import make_task
from orchestrator.data.text import decode_responses, encode_prompts
from orchestrator.models.hf import (
    MODEL_PRESETS,
    build_model_folder,
    count_parameters,
    llama_config,
    load_causal_lm,
    load_value_model,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(make_task("add", 3).alphabet(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def lm_folder(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "tiny"
    return build_model_folder("tiny", tokenizer, out, seed=3, max_position_embeddings=32)


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(tokenizer, ["A1+2=", "A12+34=", "A999+001="])


def test_tokenizer_specials_and_character_round_trip(tokenizer) -> None:
    specials = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert specials + [tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(tokenizer) == 4 + len("0123456789A+=")
    assert tokenizer.padding_side == "left"
    text = "A123+045=8610"
    ids = tokenizer.encode(text)  # default add_special_tokens: still no bos/eos
    assert len(ids) == len(text) and 1 not in ids and 2 not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == list(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([1, *ids, 2, 0, 0], skip_special_tokens=True) == text
    assert tokenizer.encode("A1x") == [*tokenizer.encode("A1"), 3]  # unknown char -> <unk>


def test_tokenizer_reloads_with_auto_tokenizer(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    train_tokenizer(make_task("add", 3).alphabet(), folder)
    again = AutoTokenizer.from_pretrained(folder)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.padding_side == "left"
    assert (again.pad_token, again.bos_token, again.eos_token, again.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    ids = again.encode("A123+045=")
    assert ids == tokenizer.encode("A123+045=") and len(ids) == 9
    assert again.decode(ids) == "A123+045="
    with pytest.raises(ValueError, match="whitespace"):
        train_tokenizer("01 2", tmp_path / "bad")


def test_presets_have_head_dim_of_at_least_64(tokenizer) -> None:
    for name, preset in MODEL_PRESETS.items():
        assert preset["hidden_size"] % preset["num_attention_heads"] == 0, name
        assert preset["hidden_size"] // preset["num_attention_heads"] >= 64, name
        cfg = llama_config(name, tokenizer)
        assert cfg.head_dim >= 64 and cfg.tie_word_embeddings is False
        assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-6
        assert cfg.max_position_embeddings == 128 and cfg.vocab_size == len(tokenizer)
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)


def test_build_and_reload_give_identical_logits(tokenizer, lm_folder: Path, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (lm_folder / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(lm_folder).get_vocab() == tokenizer.get_vocab()
    ids, mask = batch(tokenizer)
    rng_before = torch.random.get_rng_state()
    twin = build_model_folder(
        "tiny", tokenizer, tmp_path / "twin", seed=3, max_position_embeddings=32
    )
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    other = build_model_folder(
        "tiny", tokenizer, tmp_path / "o", seed=4, max_position_embeddings=32
    )
    a = load_causal_lm(lm_folder)
    assert not a.training and a.dtype == torch.float32
    assert a.config.max_position_embeddings == 32
    b = AutoModelForCausalLM.from_pretrained(twin)
    c = load_causal_lm(other)
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
        lc = c(input_ids=ids, attention_mask=mask).logits
    assert la.shape == (3, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert not torch.equal(la, lc)  # another seed, other weights
    with pytest.raises(ValueError, match=r"presets: \['large', 'medium', 'small', 'tiny'\]"):
        build_model_folder("huge", tokenizer, tmp_path / "x", seed=0)


def test_value_model_copies_the_backbone_and_starts_at_zero(tokenizer, lm_folder) -> None:
    lm = load_causal_lm(lm_folder)
    critic = load_value_model(lm_folder)
    assert critic.config.num_labels == 1 and critic.dropout.p == 0.0 and not critic.training
    lm_state, critic_state = lm.model.state_dict(), critic.model.state_dict()
    assert lm_state.keys() == critic_state.keys()
    for k, v in lm_state.items():
        assert torch.equal(critic_state[k], v), k
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        values = critic(input_ids=ids, attention_mask=mask).logits
        hidden_lm = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden_critic = critic.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert values.shape == (3, ids.shape[1], 1) and torch.all(values == 0)
    torch.testing.assert_close(hidden_critic, hidden_lm, rtol=0, atol=0)
    torch.manual_seed(0)
    noisy = load_value_model(lm_folder, init_std=0.02)
    std = noisy.score.weight.std().item()
    assert 0.01 < std < 0.03 and torch.all(noisy.score.bias == 0)


def test_value_model_save_and_reload(tokenizer, lm_folder, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    critic = load_value_model(lm_folder)
    with torch.no_grad():
        critic.score.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
        critic.score.bias.fill_(0.5)
    critic.save_pretrained(tmp_path / "critic")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic").eval()
    via_loader = load_value_model(tmp_path / "critic")  # a saved value model loads as it is
    for model in (reloaded, via_loader):
        assert model.dropout.p == 0.0 and model.config.num_labels == 1
        want_state, got_state = critic.state_dict(), model.state_dict()
        assert want_state.keys() == got_state.keys()
        assert all(torch.equal(got_state[k], v) for k, v in want_state.items())
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        want = critic(input_ids=ids, attention_mask=mask).logits
        got = via_loader(input_ids=ids, attention_mask=mask).logits
        got_raw = reloaded(input_ids=ids, attention_mask=mask).logits
    assert not torch.all(want == 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Plain from_pretrained keeps the weights mapped onto the file at unaligned offsets,
    # where the CPU matmul may take another kernel: same weights, last-bit differences.
    torch.testing.assert_close(got_raw, want, rtol=1e-6, atol=1e-6)


def test_count_parameters_of_tiny(lm_folder) -> None:
    # vocab V = 17, hidden H = 128, intermediate I = 384, 2 layers, untied head:
    # embed V*H = 2176; per layer: q,k,v,o 4*H*H = 65536, mlp 3*H*I = 147456, 2 norms 2*H = 256
    # -> 213248 per layer; final norm H = 128; lm_head V*H = 2176
    # total = 2176 + 2 * 213248 + 128 + 2176 = 430976
    assert count_parameters(load_causal_lm(lm_folder)) == 430976


def test_encode_prompts_left_pads_after_bos(tokenizer) -> None:
    ids, mask = encode_prompts(tokenizer, ["A1+2=", "A12+34="])
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 8)  # bos + 7 characters
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert ids[0, :2].tolist() == [0, 0] and ids[0, 2].item() == 1 and ids[1, 0].item() == 1
    assert ids[0, 3:].tolist() == tokenizer.encode("A1+2=")
    assert tokenizer.decode(ids[1, 1:]) == "A12+34="


def test_decode_responses_cuts_at_first_eos_and_drops_pads(tokenizer) -> None:
    digit = {c: tokenizer.convert_tokens_to_ids(c) for c in "0123456789"}
    pad, bos, eos, unk = 0, 1, 2, 3
    rows = torch.tensor(
        [
            [digit["8"], digit["6"], digit["1"], eos, pad, pad],
            [digit["4"], eos, digit["9"], eos, digit["7"], pad],  # cut at the first eos
            [digit["1"], digit["2"], digit["3"], digit["4"], digit["5"], digit["6"]],  # no eos
            [eos, digit["5"], pad, pad, pad, pad],
            [digit["1"], pad, digit["2"], eos, pad, pad],  # pads ignored
            [digit["1"], unk, bos, eos, pad, pad],  # other specials stay visible
        ]
    )
    assert decode_responses(tokenizer, rows) == ["861", "4", "123456", "", "12", "1<unk><bos>"]


def test_a_frozen_model_in_bfloat16_reports_what_it_changed(tokenizer, lm_folder: Path) -> None:
    """models.precision.cast_frozen: the module ends in bfloat16 and the reported change
    is the log-probs' own, small but not zero; log-probs of the cast model through the
    trainer's path stay float32."""
    import random

    from orchestrator.models.batch import response_logprobs
    from orchestrator.models.precision import cast_frozen

    task = make_task("add", 3)
    ids, mask = encode_prompts(tokenizer, [task.sample_prompt(random.Random(i)) for i in range(4)])
    model = load_causal_lm(lm_folder)
    batch = {"prompt_ids": ids[:, :-2], "prompt_mask": mask[:, :-2],
             "response_ids": ids[:, -2:], "response_mask": mask[:, -2:]}  # fmt: skip
    with torch.no_grad():
        before = response_logprobs(model, batch)
    diff = cast_frozen(model, torch.bfloat16, ids, mask, value=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert 0 < diff["mean"] <= diff["max"] < 0.5
    with torch.no_grad():
        after = response_logprobs(model, batch)
    assert after.dtype == torch.float32
    assert float((after - before).abs().max()) <= diff["max"] * 2 + 1e-3
