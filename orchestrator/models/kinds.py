"""The kinds of model a role holds, built, loaded, named and saved the same way wherever a
replica of it lives:

- `causal`: a causal LM (actor, reference);
- `value`: a one-label token-classification model (critic, reward model); a causal LM
  folder gets a zero scalar head (orchestrator.models.hf.load_value_model);
- `pmoe`: a causal LM with a PMOE head (expert deltas, router, Q head), whose state-dict
  names are the LM's with a `base.` prefix plus the head's own;
- `none`: no model (a verifier or a user's reward function).

Reallocation, tensor parallelism and checkpoints speak the LM's Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, ...); `to_plan_names` and `to_module_names`
translate a PMOE module's names to them and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from planner.catalogue import ModelShape, shape_from_hf_config

KINDS = ("causal", "value", "pmoe", "none")
PMOE_PREFIX = "base."


@dataclass(frozen=True)
class ModelKind:
    name: str  # causal | value | pmoe | none
    experts: int = 1  # pmoe: K
    expert_rank: int = 8  # pmoe: R
    seed: int = 0  # pmoe: the head's initialisation

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"model kind {self.name!r}: use one of {list(KINDS)}")

    @property
    def has_model(self) -> bool:
        return self.name != "none"


def model_config(kind: ModelKind, folder: str | Path) -> dict[str, Any]:
    """The Hugging Face config (a dict) a replica of `kind` is built from; a value
    replica of a causal folder gets a one-label head."""
    from transformers import AutoConfig

    from orchestrator.models.hf import is_value_model

    config = AutoConfig.from_pretrained(str(folder))
    if kind.name == "value" and not is_value_model(config):
        config.num_labels = 1
        config.classifier_dropout = 0.0
    return config.to_dict()


def load_model(kind: ModelKind, folder: str | Path) -> torch.nn.Module:
    """A role's whole model from a Hugging Face folder (fp32, eval mode)."""
    from orchestrator.models.hf import load_causal_lm, load_value_model

    if kind.name == "value":
        return load_value_model(folder)
    if kind.name == "pmoe":
        from orchestrator.models.pmoe import load_pmoe

        return load_pmoe(folder, kind.experts, rank=kind.expert_rank, seed=kind.seed)
    if kind.name == "causal":
        return load_causal_lm(folder)
    raise ValueError(f"a '{kind.name}' role has no model to load")


def build_model(kind: ModelKind, config: Mapping[str, Any]) -> torch.nn.Module:
    """A float32 model of `kind` from its config, its values to be overwritten (the global
    torch RNG is left as it was)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    d = dict(config)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    cls = AutoModelForTokenClassification if kind.name == "value" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        model = cls.from_config(hf, dtype=torch.float32)
    if kind.name == "pmoe":
        from orchestrator.models.pmoe import PMOECausalLM

        model = PMOECausalLM(model, kind.experts, rank=kind.expert_rank, seed=kind.seed)
    return model


def shape_of(kind: ModelKind, role: str, config: Mapping[str, Any]) -> ModelShape:
    """The planner's shape of a replica: the decoder, a scalar head for value models, the
    PMOE head's tensors (held whole by every rank) for PMOE policies."""
    shape = replace(shape_from_hf_config(role, dict(config)), value_head=kind.name == "value")
    if kind.name != "pmoe" or kind.experts == 1:
        return shape
    k, r, h, v = kind.experts, kind.expert_rank, shape.hidden, shape.vocab
    extra = (("expert_a", (k - 1, r, h)), ("expert_b", (k - 1, v, r)),
             ("router.weight", (k, h)), ("router.bias", (k,)),
             ("q_head.weight", (v, h)), ("q_head.bias", (v,)))  # fmt: skip
    return replace(shape, extra=extra)


def trunk(kind: ModelKind, module: torch.nn.Module) -> torch.nn.Module:
    """The Llama model inside `module` (what tensor parallelism shards)."""
    return module.base if kind.name == "pmoe" else module


def to_plan_names(kind: ModelKind, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state (its own names) under the names reallocation and checkpoints use."""
    if kind.name != "pmoe":
        return dict(tensors)
    return {k.removeprefix(PMOE_PREFIX): v for k, v in tensors.items()}


def to_module_names(
    kind: ModelKind, tensors: Mapping[str, torch.Tensor], module: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """The inverse of `to_plan_names` for `module`'s own state-dict names."""
    if kind.name != "pmoe":
        return dict(tensors)
    own = {k.removeprefix(PMOE_PREFIX): k for k in module.state_dict()}
    return {own.get(k, k): v for k, v in tensors.items()}


def save_model(kind: ModelKind, module: torch.nn.Module, out: Path) -> None:
    """A Hugging Face folder of the module (plus pmoe.safetensors for a PMOE head), written
    by this process whatever its rank (transformers writes only on torch.distributed rank
    0, and a plan's device worker that holds the whole model may have any rank)."""
    from orchestrator.models.hf import no_progress_bars

    lm = trunk(kind, module)
    lm.should_save_on_this_rank = lambda is_main_process: True  # type: ignore[method-assign]
    with no_progress_bars():
        module.save_pretrained(out)
