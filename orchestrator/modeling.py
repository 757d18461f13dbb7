"""Tokenizers and tiny Llama-architecture models built locally (no downloads), saved in
Hugging Face format so transformers (and vLLM) load them like any other model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

# head_dim = hidden / heads is 64 everywhere: vLLM's CPU attention refuses smaller heads.
MODEL_PRESETS: dict[str, dict[str, int]] = {
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
}


def train_tokenizer(alphabet: str, out_dir: str | Path) -> Any:
    """A character-level tokenizer trained with `tokenizers` on the task's alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1)
    tok.train_from_iterator([alphabet, *alphabet], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(preset: str, tokenizer: Any, max_position_embeddings: int = 128) -> Any:
    from transformers import LlamaConfig

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; presets: {sorted(MODEL_PRESETS)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_PRESETS[preset],
    )


def build_model_folder(
    preset: str, tokenizer: Any, out_dir: str | Path, seed: int, max_position_embeddings: int = 128
) -> Path:
    """A randomly initialised LlamaForCausalLM (seeded) saved with its tokenizer."""
    from transformers import LlamaForCausalLM

    config = llama_config(preset, tokenizer, max_position_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_causal_lm(path: str | Path | None) -> Any:
    from transformers import AutoModelForCausalLM

    if path is None:
        raise ValueError("a causal LM role needs a model folder")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()


def load_value_model(path: str | Path | None, init_std: float = 0.0) -> Any:
    """A LlamaForTokenClassification (one label = the value) whose backbone is the causal
    LM's at `path`; the value head starts at zero (or N(0, init_std))."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if path is None:
        raise ValueError("a value model needs a model folder")
    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "num_labels", None) == 1 and "TokenClassification" in str(
        config.architectures
    ):
        return AutoModelForTokenClassification.from_pretrained(str(path), dtype=torch.float32)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    config.architectures = ["LlamaForTokenClassification"]
    model = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    lm = load_causal_lm(path)
    missing, unexpected = model.model.load_state_dict(lm.model.state_dict(), strict=True), None
    del missing, unexpected
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


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] with bos first, and the attention mask [B, P]."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def decode_responses(tokenizer: Any, response_ids: torch.Tensor) -> list[str]:
    """Response strings cut at the first eos (excluded), padding ignored."""
    out = []
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id}
    for row in response_ids.tolist():
        toks = []
        for t in row:
            if t == tokenizer.eos_token_id:
                break
            if t not in specials:
                toks.append(t)
        out.append(tokenizer.decode(toks, skip_special_tokens=True).replace(" ", ""))
    return out
