"""A PMOE policy head around a Hugging Face causal LM (see algos/pmoe.py for the math).

Expert 0 is the LM head itself; experts 1..K-1 add a low-rank delta to it, so every
expert starts close to the LM. The router and the Q head read the final hidden state
detached, so their losses never reach the trunk. With K = 1 the module adds nothing and
returns the LM's own outputs, so a one-expert PMOE policy is the plain policy exactly.

Shape legend: B = sequences, L = positions, H = hidden size, K = experts, V = vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from algos.pmoe import mixture_log_probs, two_stage_sample

PMOE_WEIGHTS, PMOE_CONFIG = "pmoe.safetensors", "pmoe.json"


@dataclass
class PMOEOutputs:
    expert_log_probs: torch.Tensor  # [B, L, K, V]
    log_router: torch.Tensor  # [B, L, K] (router on the detached hidden state)
    router_probs: torch.Tensor  # [B, L, K]
    q_values: torch.Tensor | None  # [B, L, V] (None for K = 1)


class PMOECausalLM(torch.nn.Module):
    def __init__(
        self, base: Any, num_experts: int, rank: int = 8, init_std: float = 0.02, seed: int = 0
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"policy.num_experts = {num_experts}: must be >= 1")
        self.base = base
        self.num_experts, self.rank = num_experts, rank
        if num_experts > 1:
            h, v = base.config.hidden_size, base.config.vocab_size
            g = torch.Generator().manual_seed(seed)
            self.expert_a = torch.nn.Parameter(
                torch.randn(num_experts - 1, rank, h, generator=g) * init_std
            )
            self.expert_b = torch.nn.Parameter(
                torch.randn(num_experts - 1, v, rank, generator=g) * init_std * 0.1
            )
            self.router = torch.nn.Linear(h, num_experts)
            self.q_head = torch.nn.Linear(h, v)
            for layer in (self.router, self.q_head):
                torch.nn.init.zeros_(layer.weight)
                torch.nn.init.zeros_(layer.bias)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    def expert_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., K, V] of every expert from final hidden states h [..., H]."""
        logits = self.base.lm_head(h)
        if self.num_experts == 1:
            return logits.unsqueeze(-2)
        low = torch.einsum("...h,krh->...kr", h, self.expert_a)
        delta = torch.einsum("...kr,kvr->...kv", low, self.expert_b)
        return torch.cat([logits.unsqueeze(-2), logits.unsqueeze(-2) + delta], dim=-2)

    def pmoe_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> PMOEOutputs:
        h = self.base.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # normed, as lm_head reads it
        elp = torch.log_softmax(self.expert_logits(h).float(), dim=-1)
        if self.num_experts == 1:
            ones = torch.ones(elp.shape[:-1], dtype=elp.dtype, device=elp.device)
            return PMOEOutputs(elp, torch.zeros_like(ones), ones, None)
        router_logits = self.router(h.detach()).float()
        return PMOEOutputs(
            elp,
            torch.log_softmax(router_logits, -1),
            torch.softmax(router_logits, -1),
            self.q_head(h.detach()).float(),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The LM's output for K = 1; otherwise `.logits` [B, L, V] = the mixture's
        log-probs (normalised, so log_softmax of them is themselves)."""
        if self.num_experts == 1:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
        out = self.pmoe_outputs(input_ids, attention_mask, position_ids)
        return SimpleNamespace(logits=mixture_log_probs(out.expert_log_probs, out.log_router))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        **ignored: Any,
    ) -> torch.Tensor:
        """Prompt + response ids [B, P + T]: two-stage sampling (expert, then token) or
        greedy decoding of the mixture, with the LM's KV cache; pad after eos."""
        if self.num_experts == 1:
            return self.base.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                top_p=top_p, top_k=top_k, use_cache=use_cache,
            )  # fmt: skip
        if do_sample and (temperature != 1.0 or top_p != 1.0 or top_k not in (None, 0)):
            raise ValueError(
                f"PMOE sampling with temperature={temperature}, top_p={top_p}, top_k={top_k}: "
                "two-stage sampling is the mixture only at temperature 1 without truncation"
            )
        mask = attention_mask.clone()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, step_pos, past = input_ids, positions, None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = []
        for _ in range(max_new_tokens):
            out = self.base.model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                past_key_values=past, use_cache=True,
            )  # fmt: skip
            past = out.past_key_values
            h = out.last_hidden_state[:, -1]
            elp = torch.log_softmax(self.expert_logits(h).float(), -1)  # [B, K, V]
            log_router = torch.log_softmax(self.router(h).float(), -1)  # [B, K]
            if do_sample:
                tok, _ = two_stage_sample(elp, log_router)
            else:
                tok = mixture_log_probs(elp, log_router).argmax(-1)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            tokens.append(tok)
            finished |= tok == eos_token_id
            if bool(finished.all()):
                break
            step_ids = tok[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)

    def save_pretrained(
        self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kw: Any
    ) -> None:
        """The LM as a Hugging Face folder (AutoModelForCausalLM loads it), plus the expert
        deltas, router and Q head in pmoe.safetensors and K in pmoe.json (K > 1)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        sd = state_dict if state_dict is not None else self.state_dict()
        base = {k[len("base.") :]: v for k, v in sd.items() if k.startswith("base.")}
        self.base.save_pretrained(out, state_dict=base, **kw)
        if self.num_experts > 1:
            extra = {k: v.detach().cpu().contiguous() for k, v in sd.items()
                     if not k.startswith("base.")}  # fmt: skip
            save_file(extra, str(out / PMOE_WEIGHTS))
            config = {"num_experts": self.num_experts, "rank": self.rank}
            (out / PMOE_CONFIG).write_text(json.dumps(config))


def load_pmoe(
    path: str | Path | None, num_experts: int, rank: int = 8, seed: int = 0
) -> PMOECausalLM:
    """The LM at `path` with a PMOE head: the saved one if the folder has pmoe.json (its
    K must equal num_experts), else a fresh one."""
    from orchestrator.modeling import load_causal_lm

    model = PMOECausalLM(load_causal_lm(path), num_experts, rank=rank, seed=seed)
    config_path = Path(str(path)) / PMOE_CONFIG
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved["num_experts"] != num_experts or saved["rank"] != rank:
            raise ValueError(
                f"the PMOE policy in {path} has num_experts={saved['num_experts']}, "
                f"rank={saved['rank']}; the config asks for policy.num_experts={num_experts}, "
                f"policy.expert_rank={rank}. Fix: use the saved values or a new run"
            )
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(
            load_file(str(Path(str(path)) / PMOE_WEIGHTS)), strict=False
        )
        if unexpected or any(not k.startswith("base.") for k in missing):
            raise ValueError(f"{path}/{PMOE_WEIGHTS} does not match the PMOE head: {unexpected}")
    return model.eval()
