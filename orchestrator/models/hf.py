"""A character-level tokenizer and tiny Llama-architecture models built locally (no
downloads), saved in Hugging Face format so transformers (and vLLM) load them like any
other model folder; plus the value model built from a causal LM and the batch helpers
that turn prompt strings into ids and response ids back into strings.

Shapes: B = batch size, P = prompt tokens (bos included), T = response tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3

# head_dim = hidden_size / num_attention_heads = 64 in every preset: vLLM's CPU attention
# refuses smaller heads.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=768,
    ),
    "medium": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1536,
    ),
    "large": dict(  # about 60M parameters: model states dominate a worker's memory
        hidden_size=640,
        num_hidden_layers=12,
        num_attention_heads=10,
        num_key_value_heads=10,
        intermediate_size=1728,
    ),
}


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(alphabet: str, out_dir: str | Path, corpus: Iterable[str] = ()) -> Any:
    """A character-level `PreTrainedTokenizerFast` trained with `tokenizers`' WordLevel
    trainer on `corpus` (the task's texts) plus `alphabet`, saved to `out_dir`.

    Ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then every alphabet character (more frequent
    in the corpus first; the same corpus gives the same ids). Every character is one token
    (any other character is <unk>); encoding adds no bos/eos, decoding joins tokens without
    spaces, padding is on the left.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    bad = [c for c in chars if c.isspace()]
    if not chars or bad:
        raise ValueError(
            f"tokenizer alphabet {alphabet!r}: must be non-empty without whitespace "
            f"(found {bad!r}); pass the task's alphabet()"
        )
    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    core.train_from_iterator(["".join(chars), *corpus], trainer=trainer)
    missing = [c for c in chars if core.token_to_id(c) is None]
    if missing:
        raise RuntimeError(f"the trained vocabulary lacks {missing!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ---------------------------------------------------------------- models


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' per-load "Loading weights" bars off, restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def llama_config(preset: str, tokenizer: Any, max_position_embeddings: int = 128) -> Any:
    """The `LlamaConfig` of a preset, with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig

    if preset not in MODEL_PRESETS:
        raise ValueError(
            f"model.preset = {preset!r}: unknown preset; presets: {sorted(MODEL_PRESETS)}"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_PRESETS[preset],
    )


def build_model_folder(
    preset: str,
    tokenizer: Any,
    out_dir: str | Path,
    seed: int,
    max_position_embeddings: int = 128,
    zero_head: bool = False,
) -> Path:
    """A randomly initialised LlamaForCausalLM saved (safetensors) with its tokenizer.

    The weights depend only on `seed` (torch.manual_seed inside a forked RNG, so the
    caller's global torch RNG is left as it was). With `zero_head` the (untied) LM head
    starts at zero, so every next-token distribution starts uniform."""
    from transformers import LlamaForCausalLM

    config = llama_config(preset, tokenizer, max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    with no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Copy every parameter and buffer into memory of its own.

    from_pretrained leaves tensors mapped onto the safetensors file, at offsets with no
    particular alignment: a file rewritten in place would change them under the model,
    and misaligned weights take other CPU matmul kernels, so a reloaded model's outputs
    can differ from the saved one's in the last bit. Tied weights stay tied (one Parameter).
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for name, b in module.named_buffers(recurse=False):
                if b is not None:
                    setattr(module, name, b.clone())
    return model


def load_causal_lm(path: str | Path | None) -> Any:
    """The causal LM at `path` in float32, in eval mode, in memory of its own."""
    from transformers import AutoModelForCausalLM

    if path is None:
        raise ValueError("a causal LM role needs a model folder (path is None)")
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.pad_token_id = model.config.pad_token_id
    return _own_memory(model).eval()


def is_value_model(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return config.num_labels == 1 and any(a.endswith("ForTokenClassification") for a in archs)


def load_value_model(path: str | Path | None, init_std: float = 0.0) -> Any:
    """A token-classification model with one label (`logits[..., 0]` = per-token value).

    If `path` holds a value model saved earlier, it is loaded as it is. Otherwise `path`
    is a causal LM: the backbone weights are copied from it and the score head starts at
    zero (init_std = 0) or N(0, init_std^2) drawn from the global torch RNG, with bias 0.
    Dropout before the head is 0 (classifier_dropout = 0.0). float32, eval mode.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    if path is None:
        raise ValueError("a value model role needs a model folder (path is None)")
    if init_std < 0:
        raise ValueError(f"value head init_std = {init_std}: must be >= 0")
    config = AutoConfig.from_pretrained(str(path))
    if is_value_model(config):
        with no_progress_bars():
            model = AutoModelForTokenClassification.from_pretrained(str(path), dtype=torch.float32)
        return _own_memory(model).eval()
    config.num_labels = 1
    config.classifier_dropout = 0.0
    with torch.random.fork_rng(devices=[]):  # the backbone's random init is overwritten
        model = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    lm = load_causal_lm(path)
    backbone = getattr(model, model.base_model_prefix)
    backbone.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict(), strict=True)
    with torch.no_grad():
        if init_std > 0:
            model.score.weight.normal_(0.0, init_std)
        else:
            model.score.weight.zero_()
        if model.score.bias is not None:
            model.score.bias.zero_()
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
