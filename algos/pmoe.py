"""PMOE policies (Ren et al. 2021, arXiv 2104.09122) for a token policy, as pure functions.

A mixture of K experts, pi(a|s) = sum_k psi_k(s) pi_k(a|s), with a router psi reading
detached features. The frequency approximate gradient picks each state's best expert k*
(here by the expected Q under each expert), regresses the router on onehot(k*), and lets
the policy gradient flow only through expert k*.

Shape legend: ... = any leading dims (e.g. B, T), K = experts, V = vocabulary, N = states.
"""

from __future__ import annotations

import torch


def mixture_log_probs(expert_log_probs: torch.Tensor, log_router: torch.Tensor) -> torch.Tensor:
    """log pi_mix [..., V] = logsumexp_k(log psi_k + log pi_k) of expert_log_probs
    [..., K, V] and log_router [..., K]; a normalised log-distribution over V."""
    return torch.logsumexp(log_router.unsqueeze(-1) + expert_log_probs, dim=-2)


def best_only_mixture_log_probs(
    expert_log_probs: torch.Tensor, log_router: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """The mixture's value [..., V], with gradient only through expert `best` [...] (long):
    the other experts' log-probs and the router are detached."""
    onehot = torch.nn.functional.one_hot(best, expert_log_probs.shape[-2]).to(expert_log_probs)
    onehot = onehot.unsqueeze(-1)  # [..., K, 1]
    mixed = onehot * expert_log_probs + (1 - onehot) * expert_log_probs.detach()
    return mixture_log_probs(mixed, log_router.detach())


def two_stage_sample(
    expert_log_probs: torch.Tensor,
    log_router: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Acting: k ~ Cat(psi), then a ~ pi_k. expert_log_probs [N, K, V], log_router [N, K].
    Returns (actions [N], experts [N]), both long."""
    experts = torch.multinomial(log_router.float().exp(), 1, generator=generator).squeeze(-1)
    chosen = expert_log_probs[torch.arange(experts.shape[0], device=experts.device), experts]
    actions = torch.multinomial(chosen.float().exp(), 1, generator=generator).squeeze(-1)
    return actions, experts


def best_expert_from_q(expert_log_probs: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """k* [...] (long) = argmax_k sum_a pi_k(a) Q(a): the expert with the highest expected
    Q. expert_log_probs [..., K, V], q_values [..., V]."""
    expected = (expert_log_probs.exp() * q_values.unsqueeze(-2)).sum(-1)  # [..., K]
    return expected.argmax(-1)


def router_loss(router_probs: torch.Tensor, best: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of psi [..., K] to onehot(best [...]), mean over K, masked mean over the valid
    positions (mask [...]); so psi_k learns how often expert k is best. 0-d."""
    target = torch.nn.functional.one_hot(best, router_probs.shape[-1]).to(router_probs)
    per_pos = ((router_probs - target) ** 2).mean(-1)
    valid = mask.bool()
    kept = torch.where(valid, per_pos, torch.zeros_like(per_pos))
    return kept.sum() / valid.sum().clamp(min=1)


def q_loss(
    q_values: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """0.5 x masked mean of (Q(s, a_taken) - target)^2. q_values [..., V], actions [...]
    (long), targets [...] (no gradient), mask [...]. 0-d."""
    taken = q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    err = (taken - targets.detach()) ** 2
    valid = mask.bool()
    kept = torch.where(valid, err, torch.zeros_like(err))
    return 0.5 * kept.sum() / valid.sum().clamp(min=1)
