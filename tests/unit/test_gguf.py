"""`relay convert`: a GGUF file (written here as llama.cpp writes a Llama model) becomes a
model folder whose model gives the same logits, whose tokenizer encodes the same and
keeps its chat template, and whose config.json has no quantization_config (vLLM rejects
one). Bad input exits 2 and leaves the target alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.gguf_file import write_llama_gguf
from tests.qwen_like import qwen_tokenizer


def convert(*args: str) -> subprocess.CompletedProcess:
    """`relay convert ARGS` in this process (the command's own code, without the start-up
    of a new interpreter): its exit code and what it printed."""
    import contextlib
    import io

    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = qwen_tokenizer()
    tok.bos_token = "<|im_start|>"
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = write_llama_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, tok, path


def test_a_gguf_file_becomes_the_same_model_folder(tmp_path: Path, llama) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, path = llama
    out = convert(str(path), str(tmp_path / "folder"))
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "folder"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok2 = AutoTokenizer.from_pretrained(folder)
    text = "What is 12 plus 30?"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok2.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, converted(torch.tensor([ids])).logits)
    chat = [{"role": "user", "content": text}]
    assert tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )


def test_bad_input_exits_2_and_leaves_the_target_alone(tmp_path: Path, llama) -> None:
    _, _, path = llama
    missing = convert(str(tmp_path / "none.gguf"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    busy = convert(str(path), str(kept))
    assert busy.returncode == 2 and "--force" in busy.stderr
    assert (kept / "mine.txt").read_text() == "keep me"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    junk = convert(str(tmp_path / "junk.gguf"), str(tmp_path / "out"))
    assert junk.returncode == 2 and "could not read" in junk.stderr
    assert "Traceback" not in missing.stderr + busy.stderr + junk.stderr
