"""PMOE policies (Ren et al. 2021, arXiv 2104.09122) for a token policy, as pure functions.

A mixture of K experts, pi(a|s) = sum_k psi_k(s) pi_k(a|s), with a router psi reading
detached features. The frequency approximate gradient picks each state's best expert k*
(here by the expected Q under each expert), regresses the router on onehot(k*), and lets
the policy gradient flow only through expert k*.

Shape legend: ... = any leading dims (e.g. B, T), K = experts, V = vocabulary (actions),
N = states. `mask` [...] is float or bool, 1 (True) on valid positions; padded positions
never reach a result or a gradient, even when they hold NaN, inf or an out-of-range index.
"""

from __future__ import annotations

import torch


def mixture_log_probs(expert_log_probs: torch.Tensor, log_router: torch.Tensor) -> torch.Tensor:
    """log pi_mix [..., V] = logsumexp_k(log psi_k + log pi_k).

    expert_log_probs [..., K, V]: log pi_k, each normalised over V.
    log_router [..., K]: log psi, normalised over K.
    The result is a normalised log-distribution over V (exact, no sampling)."""
    return torch.logsumexp(log_router.unsqueeze(-1) + expert_log_probs, dim=-2)


def best_only_mixture_log_probs(
    expert_log_probs: torch.Tensor, log_router: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """The mixture's value [..., V], with gradient only through expert `best`.

    expert_log_probs [..., K, V], log_router [..., K], best [...] (long, in [0, K)).
    Every other expert's log-probs and the router are detached, so a loss on the result
    updates only expert k* at each position (the frequency approximate gradient)."""
    onehot = torch.nn.functional.one_hot(best.long(), expert_log_probs.shape[-2])
    onehot = onehot.to(expert_log_probs).unsqueeze(-1)  # [..., K, 1]
    mixed = onehot * expert_log_probs + (1 - onehot) * expert_log_probs.detach()
    return mixture_log_probs(mixed, log_router.detach())


def two_stage_sample(
    expert_log_probs: torch.Tensor,
    log_router: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Acting: k ~ Cat(psi), then a ~ pi_k; the pair is a draw from pi_mix.

    expert_log_probs [N, K, V], log_router [N, K]; generator None uses the global RNG of
    the tensors' device. Returns (actions [N], experts [N]), both long."""
    experts = torch.multinomial(log_router.float().exp(), 1, generator=generator).squeeze(-1)
    rows = torch.arange(experts.shape[0], device=experts.device)
    chosen = expert_log_probs[rows, experts]  # [N, V]
    actions = torch.multinomial(chosen.float().exp(), 1, generator=generator).squeeze(-1)
    return actions, experts


def best_expert_from_q(expert_log_probs: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """k* [...] (long) = argmax_k sum_a pi_k(a) Q(a): the expert with the highest expected Q.

    expert_log_probs [..., K, V], q_values [..., V]. Ties go to the lowest k."""
    expected = (expert_log_probs.exp() * q_values.unsqueeze(-2)).sum(-1)  # [..., K]
    return expected.argmax(-1)


def router_loss(router_probs: torch.Tensor, best: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-d: masked mean over positions of mean_k (psi_k - onehot(k*)_k)^2.

    router_probs [..., K]: psi. best [...] (long): k*. mask [...].
    Minimised in expectation by psi_k = P(k* = k), so psi learns how often each expert is
    best. A mask with no valid position gives 0."""
    valid = mask.bool()
    k = router_probs.shape[-1]
    best = torch.where(valid, best.long(), torch.zeros_like(best, dtype=torch.long))
    target = torch.nn.functional.one_hot(best, k).to(router_probs)  # [..., K]
    probs = torch.where(valid.unsqueeze(-1), router_probs, target)  # padding: error 0
    per_pos = ((probs - target) ** 2).mean(-1)  # [...]
    return per_pos.sum() / valid.sum().clamp(min=1)


def q_loss(
    q_values: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """0-d: 0.5 x masked mean over positions of (Q(s, a_taken) - target)^2.

    q_values [..., V], actions [...] (long), targets [...] (treated as constants), mask [...].
    A mask with no valid position gives 0."""
    valid = mask.bool()
    actions = torch.where(valid, actions.long(), torch.zeros_like(actions, dtype=torch.long))
    taken = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [...]
    targets = targets.detach().to(taken.dtype)
    err = torch.where(valid, taken - targets, torch.zeros_like(taken))
    return 0.5 * (err**2).sum() / valid.sum().clamp(min=1)
