"""SFT and preference rows from a user's files: prompt + response, conversations (loss on
assistant tokens only), preference pairs of text or messages; tokenized as the
tokenizer's own chat template does; each problem with its row number; the config check
refuses bad files with exit-2 problems; the built-in task's rows are the old tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.data.prompts import Encoder
from orchestrator.data.train_rows import (
    preference_batch,
    preference_rows,
    sft_batch,
    sft_rows,
)
from tests.qwen_like import qwen_folder, qwen_tokenizer

KEYS = {"prompt": "prompt", "response": "response", "messages": "messages", "chosen": "chosen",
        "rejected": "rejected"}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


def test_a_chat_prompt_and_response_are_the_templates_conversation(tok) -> None:
    """prompt ids + response ids = apply_chat_template of the whole conversation, up to and
    including the assistant turn's eos (<|im_end|>); the loss mask covers only the response."""
    msgs = [{"role": "user", "content": "What is 12 plus 30?"}]
    rep = sft_rows([{"prompt": msgs, "response": "The answer is 42."}], KEYS,
                   Encoder(tok, "auto", None), 256, None, "error")  # fmt: skip
    assert not rep.problems
    (row,) = rep.rows
    conversation = [*msgs, {"role": "assistant", "content": "The answer is 42."}]
    whole = tok.apply_chat_template(conversation)["input_ids"]
    prompt = tok(row.prompt, add_special_tokens=False)["input_ids"]
    assert prompt + row.response_ids == whole[: whole.index(tok.eos_token_id, len(prompt)) + 1]
    assert row.response_ids[-1] == tok.eos_token_id and row.templated
    batch = sft_batch(tok, rep.rows)
    assert batch["response_mask"].sum() == len(row.response_ids)


def test_a_conversation_trains_every_assistant_turn_once(tok) -> None:
    conv = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 5 times 6?"},
        {"role": "assistant", "content": "30"},
        {"role": "user", "content": "Plus 12?"},
        {"role": "assistant", "content": "42"},
    ]
    rep = sft_rows([{"messages": conv}], KEYS, Encoder(tok, "auto", None), 256, None, "error")
    assert not rep.problems and len(rep.rows) == 2
    answers = [tok.decode(r.response_ids) for r in rep.rows]
    assert answers == ["30<|im_end|>", "42<|im_end|>"]
    # the second row's prompt holds the first exchange, user and assistant, untrained
    assert "30<|im_end|>" in rep.rows[1].prompt and rep.rows[1].prompt.endswith("assistant\n")


def test_text_rows_without_a_template_end_in_eos_and_a_bos_less_tokenizer_adds_none(tok) -> None:
    rep = sft_rows([{"prompt": "What is 12 plus 30?", "response": " 42"}], KEYS,
                   Encoder(tok, "never", None), 256, None, "error")  # fmt: skip
    (row,) = rep.rows
    assert not row.templated and row.response_ids == [*tok(" 42")["input_ids"], tok.eos_token_id]
    batch = sft_batch(tok, rep.rows)
    assert batch["prompt_ids"][0].tolist() == tok("What is 12 plus 30?")["input_ids"]


def test_preference_rows_of_text_messages_and_whole_conversations(tok) -> None:
    user = [{"role": "user", "content": "What is 12 plus 30?"}]
    rows = [
        {"prompt": user, "chosen": "42", "rejected": "41"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "42"}],
         "rejected": [{"role": "assistant", "content": "The answer is 7."}]},
        {"chosen": [*user, {"role": "assistant", "content": "42"}],
         "rejected": [*user, {"role": "assistant", "content": "40"}]},
    ]  # fmt: skip
    rep = preference_rows(rows, KEYS, Encoder(tok, "auto", None), 256, None, "error")
    assert not rep.problems and len(rep.rows) == 3
    assert len({r.prompt for r in rep.rows}) == 1
    batch = preference_batch(tok, rep.rows)
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape
    assert tok.decode(rep.rows[1].rejected_ids) == "The answer is 7.<|im_end|>"


def test_row_problems_are_numbered_and_too_long_rows_filtered_or_refused(tok) -> None:
    rows = [
        {"prompt": "a", "response": "b"},
        {"prompt": "a"},  # no response
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"prompt": "a", "response": "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"},  # long
    ]
    enc = Encoder(tok, "never", None)
    rep = sft_rows(rows, KEYS, enc, 256, 8, "error")
    text = " | ".join(rule for rule, _ in rep.problems)
    assert "row 2 (fields ['prompt'])" in text
    assert "row 3" in text and "no assistant turn" in text
    assert "row 4: 1 + " in text and "data.max_response_tokens" in text
    ok = sft_rows([rows[0], rows[3]], KEYS, enc, 256, 8, "filter")
    assert not ok.problems and ok.too_long == 1 and len(ok.rows) == 1
    bad = preference_rows([{"prompt": "a", "chosen": "b"}], KEYS, enc, 256, None, "error")
    assert "lack 'chosen' or 'rejected': row 1" in bad.problems[0][0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_config_check_refuses_bad_training_files_with_row_numbers(tmp_path: Path) -> None:
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError

    model = qwen_folder(tmp_path / "model", context=64)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    base = [f"model.path={model}", "generate.max_new_tokens=16", "train.rollout_batch_prompts=1"]
    with pytest.raises(ConfigError) as e:
        load_config([*base, f"data.sft_files=[{sft}]", f"data.preference_files=[{prefs}]"])
    text = str(e.value)
    assert "data.sft_files" in text and "row 2 (fields ['prompt'])" in text
    assert "data.preference_files" not in text  # it reads cleanly
    with pytest.raises(ConfigError, match="only the SFT stage reads them"):
        load_config([*base, f"data.sft_files=[{prefs}]", "sft.enabled=false"])
    with pytest.raises(ConfigError, match="needs demonstrations of your own"):
        load_config([*base, f"data.train_files=[{sft}]", "reward=function",
                     "reward.function=math"])  # fmt: skip


def test_the_task_rows_through_files_are_the_tensors_they_always_were(tmp_path: Path) -> None:
    """The built-in task's demonstrations and pairs, written as files and read back through
    the user's path, give the batches the task gave before: prompts with bos, answers
    padded to the task's width with eos."""
    from transformers import AutoTokenizer

    from orchestrator.config.data_rules import read_training_rows
    from orchestrator.config.schema import RelayConfig
    from orchestrator.data.prompts import write_jsonl as write
    from orchestrator.data.tasks import build_task_data, make_task
    from orchestrator.models.hf import train_tokenizer

    task = make_task("add", 8)
    data = build_task_data(task, num_demos=64, num_rl_prompts=4, num_eval_prompts=4,
                           demo_noise=0.3, seed=1, num_pairs=64, num_eval_pairs=4,
                           label_noise=0.1)  # fmt: skip
    train_tokenizer(task.alphabet(), tmp_path / "tok", [p + r for p, r in data.sft_pairs])
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    write(tmp_path / "s.jsonl", [{"prompt": p, "response": r} for p, r in data.sft_pairs])
    cfg = RelayConfig()
    rows = read_training_rows(cfg, tok, "sft", [str(tmp_path / "s.jsonl")], task).rows
    batch = sft_batch(tok, rows, task.answer_tokens)
    width = task.answer_tokens
    for i, (prompt, answer) in enumerate(data.sft_pairs):
        ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        assert batch["prompt_ids"][i, -len(ids) :].tolist() == ids
        want = [*tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert batch["response_ids"][i, : len(want)].tolist() == want
        assert batch["response_mask"][i].sum() == len(want)
    assert batch["response_ids"].shape[1] == width
    assert torch.all(batch["prompt_mask"].sum(1) > 1)


def test_a_tokenizer_whose_pad_is_its_eos(tok) -> None:
    """pad = eos (as many instruct models ship): the masks, not the ids, say where a
    response ends, and decoding stops at its eos."""
    from orchestrator.data.text import decode_responses

    same = qwen_tokenizer()
    same.pad_token = same.eos_token
    rows = [{"prompt": "a", "response": "0 1 2 3"}, {"prompt": "a", "response": "7"}]
    rep = sft_rows(rows, KEYS, Encoder(same, "never", None), 256, None, "error")
    batch = sft_batch(same, rep.rows)
    lengths = [len(r.response_ids) for r in rep.rows]
    assert batch["response_mask"].sum(1).tolist() == lengths  # the eos counted once, in
    assert (batch["response_ids"][1, lengths[1] :] == same.eos_token_id).all()
    assert decode_responses(same, batch["response_ids"]) == ["0 1 2 3", "7"]
