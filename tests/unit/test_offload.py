"""Offloading a frozen model's weights to host memory and back (orchestrator.models.offload)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.models.offload import offload, reload, resident_bytes


def test_offload_frees_the_weights_and_reload_restores_them_exactly() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    held = resident_bytes(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    assert held >= params

    for _ in range(2):  # a second round trip works on the refilled storages
        parked = offload(model)
        assert resident_bytes(model) == 0
        assert parked.nbytes == held
        assert reload(parked) == held
        assert resident_bytes(model) == held
        assert reload(parked) == 0  # resident already: nothing to do
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
