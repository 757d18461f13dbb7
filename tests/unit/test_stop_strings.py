"""Responses end at configured stop strings (the token completing one kept, as a stop
token is) and at every eos id a model folder's generation_config lists."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from orchestrator.engines.generate import (
    Generation,
    HFGenerateEngine,
    SamplingParams,
    StopStrings,
    cut_at_strings,
)
from tests.qwen_like import qwen_folder, qwen_tokenizer


def test_a_response_is_cut_after_the_token_completing_a_stop_string() -> None:
    tok = qwen_tokenizer()
    texts = ["The answer is 42. Tom has 7", "0 1 2 3", "#### 7 and 12"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    gen = cut_at_strings(tok, Generation(ids, mask, torch.ones(3, width)), ("42.", "7"), 0)
    kept = [tok.decode(gen.response_ids[i, : int(gen.response_mask[i].sum())]) for i in range(3)]
    assert kept[0] == "The answer is 42." and kept[1] == "0 1 2 3" and kept[2] == "#### 7"
    assert torch.equal(gen.logprobs, gen.response_mask.float())  # zero where cut
    assert (gen.response_ids[0, int(gen.response_mask[0].sum()) :] == 0).all()


def test_transformers_generate_stops_early_at_the_same_place(tmp_path: Path) -> None:
    """The engine stops decoding at a stop string, and the cut is the one cut_at_strings
    makes of an uncut generation."""
    from transformers import AutoModelForCausalLM

    folder = qwen_folder(tmp_path / "m", context=64)
    tok = qwen_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.tensor([tok("What is 12 plus 30?")["input_ids"]] * 2)
    mask = torch.ones_like(prompt)
    params = SamplingParams(24, seed=3)
    plain = HFGenerateEngine(model, tok.eos_token_id, tok.pad_token_id).generate(
        prompt, mask, params
    )
    text = tok.decode(plain.response_ids[0, 4:8])
    stop = text.strip()[:2] or text  # a piece of what is sampled anyway, past its start
    params = SamplingParams(24, seed=3, stop_strings=(stop,))
    early = StopStrings(HFGenerateEngine(model, tok.eos_token_id, tok.pad_token_id, False, tok),
                        tok, tok.pad_token_id).generate(prompt, mask, params)  # fmt: skip
    want = cut_at_strings(tok, plain, (stop,), tok.pad_token_id)
    assert torch.equal(early.response_mask, want.response_mask)
    assert torch.equal(early.response_ids, want.response_ids)
    assert int(early.response_mask[0].sum()) < 24


def test_every_eos_of_generation_config_ends_a_response(tmp_path: Path) -> None:
    from orchestrator.run.assets import model_stop_ids

    folder = qwen_folder(tmp_path / "m", context=64)
    tok = qwen_tokenizer()
    ids = [tok.eos_token_id, tok.pad_token_id]  # Qwen2.5: <|im_end|> and <|endoftext|>
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    assert model_stop_ids(folder, tok) == (tok.pad_token_id,)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids[0]}))
    assert model_stop_ids(folder, tok) == ()
