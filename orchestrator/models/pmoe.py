"""A PMOE policy head around a Hugging Face causal LM (see algos/pmoe.py for the math).

Expert 0 is the LM head itself; experts 1..K-1 add a low-rank delta to it,
logits_k = lm_head(h) + (h @ A_k^T) @ B_k^T, so every expert starts close to the LM but
not tied to it. The router and the Q head read the final hidden state detached, so their
losses never reach the trunk. With K = 1 the module adds no parameter and returns the
LM's own outputs, so a one-expert PMOE policy is the plain policy bit for bit.

h is the base model's `last_hidden_state`, which is after the final norm: lm_head(h) is
the LM's logits exactly. (In transformers 5.x `hidden_states[-1]` is the same tensor only
because `capture_outputs` overwrites the last decoder layer's output with it, which a
config's `tie_last_hidden_states=False` turns off; so it is not read here.)

Shape legend: B = sequences, L = positions, P = prompt tokens, T = generated tokens,
H = hidden size, K = experts, R = rank of each delta, V = vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from algos.pmoe import mixture_log_probs, two_stage_sample
from orchestrator.models.batch import is_stop

PMOE_WEIGHTS, PMOE_CONFIG = "pmoe.safetensors", "pmoe.json"


@dataclass
class PMOEOutputs:
    expert_log_probs: torch.Tensor  # [B, L, K, V] fp32, log_softmax of each expert's logits
    log_router: torch.Tensor  # [B, L, K] fp32, router on the detached hidden state
    router_probs: torch.Tensor  # [B, L, K] fp32
    q_values: torch.Tensor | None  # [B, L, V] fp32 on the detached hidden state; None if K = 1


@dataclass
class MixtureLMOutput:
    logits: torch.Tensor  # [B, L, V] fp32: log pi_mix, normalised over V


class PMOECausalLM(torch.nn.Module):
    """K experts on a causal LM's final hidden state, a router and a Q head (K > 1)."""

    def __init__(
        self, base: Any, num_experts: int, rank: int = 8, init_std: float = 0.02, seed: int = 0
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"policy.num_experts = {num_experts}: must be >= 1 (1 = plain)")
        if num_experts > 1 and rank < 1:
            raise ValueError(f"policy.expert_rank = {rank}: must be >= 1 (e.g. 8)")
        self.base = base
        self.num_experts, self.rank = num_experts, rank
        if num_experts == 1:
            return
        h, v = base.config.hidden_size, base.config.vocab_size
        ref = base.get_output_embeddings().weight
        like = dict(dtype=ref.dtype, device=ref.device)
        g = torch.Generator().manual_seed(seed)  # CPU, so the init is the same everywhere
        a = torch.randn(num_experts - 1, rank, h, generator=g) * init_std  # A_k [R, H]
        b = torch.randn(num_experts - 1, v, rank, generator=g) * (init_std * 0.1)  # B_k [V, R]
        self.expert_a = torch.nn.Parameter(a.to(**like))  # [K-1, R, H]
        self.expert_b = torch.nn.Parameter(b.to(**like))  # [K-1, V, R]
        self.router = torch.nn.Linear(h, num_experts, device="meta")
        self.q_head = torch.nn.Linear(h, v, device="meta")
        for layer in (self.router, self.q_head):  # zero init: uniform psi, Q = 0
            layer.to_empty(device=ref.device).to(ref.dtype)
            with torch.no_grad():
                layer.weight.zero_()
                layer.bias.zero_()

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    def _hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        **kw: Any,
    ) -> Any:
        """The base model's output; `.last_hidden_state` [B, L, H] is after the final norm."""
        return self.base.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw
        )

    def expert_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., K, V] of every expert from final hidden states h [..., H]."""
        logits = self.base.get_output_embeddings()(h).unsqueeze(-2)  # [..., 1, V]
        if self.num_experts == 1:
            return logits
        low = torch.einsum("...h,krh->...kr", h, self.expert_a)  # h @ A_k^T
        delta = torch.einsum("...kr,kvr->...kv", low, self.expert_b)  # @ B_k^T
        return torch.cat([logits, logits + delta], dim=-2)

    def _log_router(self, h: torch.Tensor) -> torch.Tensor:
        """log psi [..., K] (fp32) from h [..., H], detached from the trunk."""
        return torch.log_softmax(self.router(h.detach()).float(), dim=-1)

    def pmoe_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> PMOEOutputs:
        """Every expert's log-probs, the router and the Q head at every position, for a
        training step; input_ids, attention_mask, position_ids [B, L]."""
        h = self._hidden(input_ids, attention_mask, position_ids).last_hidden_state
        elp = torch.log_softmax(self.expert_logits(h).float(), dim=-1)
        if self.num_experts == 1:
            ones = torch.ones(elp.shape[:-1], dtype=elp.dtype, device=elp.device)
            return PMOEOutputs(elp, torch.zeros_like(ones), ones, None)
        log_router = self._log_router(h)
        return PMOEOutputs(elp, log_router, log_router.exp(), self.q_head(h.detach()).float())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        **kw: Any,
    ) -> Any:
        """K = 1: the LM's own output. K > 1: a MixtureLMOutput whose `.logits` [B, L, V]
        are the mixture's log-probs (fp32, normalised, so log_softmax of them is themselves
        up to rounding); the router is not detached (its parameters get gradients, the
        trunk does not). For K > 1, use_cache and the other keywords are not used."""
        if self.num_experts == 1:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kw,
            )
        h = self._hidden(input_ids, attention_mask, position_ids).last_hidden_state
        elp = torch.log_softmax(self.expert_logits(h).float(), dim=-1)
        return MixtureLMOutput(mixture_log_probs(elp, self._log_router(h)))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        **ignored: Any,
    ) -> torch.Tensor:
        """Prompt + generated ids [B, P + T], T <= max_new_tokens, from left-padded
        input_ids and attention_mask [B, P].

        K = 1: the LM's own `generate` with the same arguments. K > 1: two-stage sampling
        (expert ~ psi, then token ~ that expert; global torch RNG) or, without do_sample,
        the mixture's argmax, decoded with the LM's KV cache (use_cache=False recomputes
        the whole sequence each step instead). eos_token_id may be a list of stop ids.
        After a row's stop token it gets pad_token_id;
        decoding stops when every row has finished. Sampling takes temperature 1 without
        top-p/top-k only (else ValueError): only then is it the mixture."""
        if self.num_experts == 1:
            return self.base.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                top_p=top_p, top_k=top_k, use_cache=use_cache, **ignored,
            )  # fmt: skip
        if do_sample and (temperature != 1.0 or top_p != 1.0 or top_k not in (None, 0)):
            raise ValueError(
                f"PMOE sampling with temperature={temperature}, top_p={top_p}, top_k={top_k}: "
                "two-stage sampling (expert, then token) draws from the mixture only at "
                "temperature=1.0, top_p=1.0, top_k=None; set those, or do_sample=False"
            )
        ids, mask = input_ids, attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: first token at 0
        stops = tuple(eos_token_id) if isinstance(eos_token_id, list) else eos_token_id
        step_ids, step_pos, past = ids, positions, None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            if use_cache:
                out = self._hidden(step_ids, mask, step_pos, past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:
                out = self._hidden(ids, mask, positions, use_cache=False)
            h = out.last_hidden_state[:, -1]  # [B, H]
            elp = torch.log_softmax(self.expert_logits(h).float(), dim=-1)  # [B, K, V]
            log_router = self._log_router(h)  # [B, K]
            if do_sample:
                tok, _ = two_stage_sample(elp, log_router)
            else:
                tok = mixture_log_probs(elp, log_router).argmax(-1)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)  # [B]
            ids = torch.cat([ids, tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, step_pos], dim=1)
            step_ids = tok[:, None]
            finished |= is_stop(tok, stops)
            if bool(finished.all()):
                break
        return ids

    def save_pretrained(
        self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kw: Any
    ) -> None:
        """The LM as a Hugging Face folder (AutoModelForCausalLM loads it), plus for K > 1
        the expert deltas, router and Q head in pmoe.safetensors and K and R in pmoe.json.

        state_dict: this module's full state dict (keys `base.*`, `router.*`, ...), e.g.
        gathered under ZeRO-3; default self.state_dict(). kw goes to the LM's
        save_pretrained. A K = 1 save removes pmoe files left in out_dir by an earlier one."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        sd = state_dict if state_dict is not None else self.state_dict()
        base = {k[len("base.") :]: v for k, v in sd.items() if k.startswith("base.")}
        self.base.save_pretrained(out, state_dict=base, **kw)
        if self.num_experts == 1:
            for name in (PMOE_WEIGHTS, PMOE_CONFIG):
                (out / name).unlink(missing_ok=True)
            return
        extra = {
            k: v.detach().cpu().contiguous() for k, v in sd.items() if not k.startswith("base.")
        }
        save_file(extra, str(out / PMOE_WEIGHTS))
        config = {"num_experts": self.num_experts, "rank": self.rank}
        (out / PMOE_CONFIG).write_text(json.dumps(config))


def load_pmoe(
    path: str | Path | None, num_experts: int, rank: int = 8, seed: int = 0
) -> PMOECausalLM:
    """The LM at `path` (fp32, eval mode) with a PMOE head: the saved one if the folder has
    pmoe.json (its K and R must equal num_experts and rank, else ValueError), else a fresh
    one initialised from `seed` (the global torch RNG is not used)."""
    from orchestrator.models.hf import load_causal_lm

    model = PMOECausalLM(load_causal_lm(path), num_experts, rank=rank, seed=seed)
    folder = Path(str(path))
    if not (folder / PMOE_CONFIG).is_file():
        return model.eval()
    saved = json.loads((folder / PMOE_CONFIG).read_text())
    if saved["num_experts"] != num_experts or (num_experts > 1 and saved["rank"] != rank):
        raise ValueError(
            f"the PMOE policy saved in {folder} has num_experts={saved['num_experts']}, "
            f"rank={saved['rank']}; the config asks for policy.num_experts={num_experts}, "
            f"policy.expert_rank={rank}. Fix: set policy.num_experts={saved['num_experts']} "
            f"and policy.expert_rank={saved['rank']} to continue it, or start from a folder "
            f"without {PMOE_CONFIG}"
        )
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(folder / PMOE_WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise ValueError(
            f"{folder / PMOE_WEIGHTS} does not match a PMOE head with K={num_experts}, "
            f"R={rank}: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()
