"""Advantage estimators: one registry, one signature.

Every estimator takes an `AdvantageInput` and returns (advantages [B, T], returns [B, T]),
zero on padding. Dispatch goes only through `get_estimator(name)`.
Shape legend: B = sequences, T = response tokens (right padded); `mask` is 1 on valid
tokens. Estimators do not whiten; callers whiten with `algos.losses.masked_whiten`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdvantageInput:
    """Everything any advantage estimator may read; shapes are checked on construction.

    token_rewards: [B, T] shaped per-token rewards (see `algos.rewards.shaped_token_rewards`).
    mask: [B, T] float or bool, 1 on valid response tokens.
    values: [B, T] critic values, or None for critic-free estimators.
    scores: [B] the sequence reward an outcome estimator reads, or None: for the group
        baselines (GRPO, RLOO) each sample's whole return, for ReMax the outcome
        r(x, y) - r(x, y_greedy) (already clipped) that token_rewards holds on the last token.
    group_ids: [B] long, the prompt group of each sample, or None.
    gamma, lam: discount and GAE lambda, each in [0, 1].
    """

    token_rewards: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        shape = tuple(self.token_rewards.shape)
        if len(shape) != 2:
            problems.append(f"token_rewards has shape {shape}; it must be [B, T]")
        per_token = {"mask": self.mask, "values": self.values}
        for name, x in per_token.items():
            if x is not None and tuple(x.shape) != shape:
                problems.append(f"{name} has shape {tuple(x.shape)}; it must match token_rewards")
        per_sample = {"scores": self.scores, "group_ids": self.group_ids}
        for name, x in per_sample.items():
            if x is not None and tuple(x.shape) != shape[:1]:
                problems.append(f"{name} has shape {tuple(x.shape)}; it must be [B] = {shape[:1]}")
        for name, v in (("gamma", self.gamma), ("lam", self.lam)):
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name}={v!r} must lie in [0, 1]")
        if problems:
            raise ValueError("invalid AdvantageInput: " + "; ".join(problems))


Estimator = Callable[[AdvantageInput], tuple[torch.Tensor, torch.Tensor]]
_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator adding an estimator under `name`; a name already taken raises ValueError."""

    def wrap(fn: Estimator) -> Estimator:
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator '{name}' is already registered")
        _ESTIMATORS[name] = fn
        return fn

    return wrap


def unregister_estimator(name: str) -> None:
    """Remove `name` from the registry (no error if absent); for tests that register one."""
    _ESTIMATORS.pop(name, None)


def get_estimator(name: str) -> Estimator:
    """The estimator registered as `name`; an unknown name raises ValueError listing all."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator '{name}'; registered: {list_estimators()}")
    return _ESTIMATORS[name]


def list_estimators() -> list[str]:
    """The registered estimator names, sorted."""
    return sorted(_ESTIMATORS)


@register_estimator("gae")
@torch.no_grad()
def gae(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response (Schulman et al. 2016).

    Reverse loop over T, vectorised over B, with V after the last valid token = 0:
    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; R_t = A_t + V_t.
    Padded tokens hold no reward and no value and are skipped: t+1 means the next valid
    token, so a masked token inside a response does not cut the recursion. Reads
    token_rewards [B, T], values [B, T], mask [B, T]; returns (advantages, returns), both
    [B, T] in at least fp32, zero on padding, without gradient."""
    if inp.values is None:
        raise ValueError(
            "the 'gae' estimator needs values from a critic (AdvantageInput.values is None)"
        )
    valid = inp.mask.bool()
    dtype = torch.promote_types(
        torch.promote_types(inp.token_rewards.dtype, inp.values.dtype), torch.float32
    )
    zero = torch.zeros((), dtype=dtype, device=inp.token_rewards.device)
    r = torch.where(valid, inp.token_rewards.to(dtype), zero)  # NaN/inf in padding stays out
    v = torch.where(valid, inp.values.to(dtype), zero)
    next_adv = torch.zeros_like(r[:, 0])  # [B] A at the next valid token
    next_v = torch.zeros_like(r[:, 0])  # [B] V at the next valid token
    columns = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + inp.gamma * next_v - v[:, t]
        adv_t = delta + inp.gamma * inp.lam * next_adv
        columns.append(torch.where(valid[:, t], adv_t, zero))
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        next_v = torch.where(valid[:, t], v[:, t], next_v)
    advantages = torch.stack(columns[::-1], dim=1) if columns else torch.zeros_like(r)
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns


def gae_reference(
    token_rewards: list[list[float]],
    values: list[list[float]],
    mask: list[list[int]],
    gamma: float,
    lam: float,
) -> tuple[list[list[float]], list[list[float]]]:
    """Plain-Python GAE, sample by sample and token by token: the test reference for `gae`.

    Lists of B rows of T numbers each; padded tokens (mask 0) are skipped and get 0."""
    advs, rets = [], []
    for r_row, v_row, m_row in zip(token_rewards, values, mask):
        n = len(r_row)
        a_row, ret_row = [0.0] * n, [0.0] * n
        next_adv, next_v = 0.0, 0.0  # at the next valid token; 0 after the last one
        for t in range(n - 1, -1, -1):
            if not m_row[t]:
                continue
            delta = r_row[t] + gamma * next_v - v_row[t]
            next_adv = delta + gamma * lam * next_adv
            next_v = v_row[t]
            a_row[t] = next_adv
            ret_row[t] = next_adv + v_row[t]
        advs.append(a_row)
        rets.append(ret_row)
    return advs, rets


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample group size n [B], group sum [B] and the group's sum of squared
    deviations from its mean [B], in two passes (the mean first: a one-pass sum of
    squares minus n mean^2 loses the spread of a group whose scores are close to each
    other against their size, 9.7 and 9.700001 say)."""
    groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    s = scores.double()

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(groups, dtype=torch.float64, device=s.device).index_add_(
            0, group_ids, values
        )

    n, total = per_group(torch.ones_like(s)), per_group(s)
    mean = (total / n.clamp(min=1))[group_ids]
    squares = per_group((s - mean) ** 2)
    return n[group_ids], total[group_ids], squares[group_ids]


def _outcome(inp: AdvantageInput, name: str) -> tuple[torch.Tensor, ...]:
    """Scores [B] and, per sample, its group's size, sum and squared deviations [B]."""
    if inp.scores is None or inp.group_ids is None:
        raise ValueError(
            f"the '{name}' estimator needs scores and group_ids (one group per prompt)"
        )
    return (inp.scores.double(), *_group_stats(inp.scores, inp.group_ids.long()))


def _per_token(adv: torch.Tensor, inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a per-sample advantage [B] to every valid token; returns = advantages."""
    out = adv.to(torch.float32)[:, None] * inp.mask.to(torch.float32)
    return out, out.clone()


@register_estimator("grpo")
def grpo(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6), unbiased std, on every
    token of response i; a group of one gets A = 0."""
    r, n, total, squares = _outcome(inp, "grpo")
    mean = total / n
    var = squares / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, (r - mean) / (var.sqrt() + 1e-6), torch.zeros_like(r))
    return _per_token(adv, inp)


@register_estimator("dr_grpo")
def dr_grpo(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO: A_i = r_i - mean(r_group) (no division by the std)."""
    r, n, total, _ = _outcome(inp, "dr_grpo")
    adv = torch.where(n > 1, r - total / n, torch.zeros_like(r))
    return _per_token(adv, inp)


@register_estimator("rloo")
def rloo(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: A_i = r_i - mean_{j != i} r_j within the group; a group of one gets A = 0."""
    r, n, total, _ = _outcome(inp, "rloo")
    adv = torch.where(n > 1, r - (total - r) / (n - 1).clamp(min=1), torch.zeros_like(r))
    return _per_token(adv, inp)


@register_estimator("remax")
def remax(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax return per token, the reward to go: G_t = sum_{k >= t} gamma^(k - t) rt_k,
    where rt = token_rewards [B, T] holds the per-token KL penalty plus the clipped
    outcome s = r(x, y) - r(x, y_greedy) on the last valid token. By the policy gradient
    of a per-token KL reward, each token's return holds the KL of the tokens after it
    (r = 1, beta 0.1, k1 [0.5, 0.5]: G = [0.90, 0.95]). advantages = returns = G, zero on
    padding. `remax_reference` is the reference code's form."""
    _remax_needs_scores(inp)
    valid = inp.mask.bool()
    dtype = torch.promote_types(inp.token_rewards.dtype, torch.float32)
    rt = torch.where(valid, inp.token_rewards.to(dtype), torch.zeros((), dtype=dtype))
    g = torch.zeros_like(rt)
    running = torch.zeros(rt.shape[0], dtype=dtype, device=rt.device)
    for t in reversed(range(rt.shape[1])):
        running = rt[:, t] + inp.gamma * running
        g[:, t] = running
    g = torch.where(valid, g, torch.zeros((), dtype=dtype))
    return g, g.clone()


def _remax_needs_scores(inp: AdvantageInput) -> None:
    if inp.scores is None:
        raise ValueError("the 'remax' estimator needs scores (reward minus the greedy baseline)")


@register_estimator("remax_reference")
def remax_reference(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax return per token, as in the reference code (Li et al. 2024, liziniu/ReMax):
    G_t = gamma^(last - t) * s + (rt_t - [t == last] * s), where s = scores [B] is the
    clipped outcome r(x, y) - r(x, y_greedy) and rt = token_rewards [B, T] holds the
    per-token KL penalty plus s on the last valid token. So each token gets the discounted
    outcome and only its own KL penalty (no KL return-to-go). advantages = returns = G,
    zero on padding."""
    _remax_needs_scores(inp)
    valid = inp.mask.bool()
    dtype = torch.promote_types(inp.token_rewards.dtype, torch.float32)
    rt = torch.where(valid, inp.token_rewards.to(dtype), torch.zeros((), dtype=dtype))
    s = inp.scores.to(dtype)
    t = torch.arange(rt.shape[1], device=rt.device)
    last = torch.where(valid, t, torch.zeros_like(t)).amax(-1, keepdim=True)  # [B, 1]
    is_last = (t == last) & valid
    kl_part = rt - torch.where(is_last, s[:, None], torch.zeros((), dtype=dtype))
    discount = torch.pow(torch.full((), inp.gamma, dtype=dtype), (last - t).clamp(min=0).to(dtype))
    g = torch.where(valid, kl_part + discount * s[:, None], torch.zeros((), dtype=dtype))
    return g, g.clone()
