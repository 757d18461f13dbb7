"""PPO (InstructGPT style) and SFT declared as dataflow graphs, plus the rollout math
that both PPO train calls share (shaped reward -> advantage estimator -> whitening).

Shape legend: B = sequences, T = response tokens.
"""

from __future__ import annotations

import torch

from algos.advantages import AdvantageInput, get_estimator
from algos.graph import MFC, CallKind, DataflowGraph
from algos.losses import masked_mean, masked_whiten
from algos.rewards import kl_estimate, shaped_token_rewards

PROMPT = ("prompt_ids", "prompt_mask")
RESPONSE = ("response_ids", "response_mask")


def _rollout_calls() -> list[MFC]:
    """The calls every RL graph starts with: sample, then reference log-probs and reward."""
    return [
        MFC("actor_gen", "actor", CallKind.GENERATE, "generate", PROMPT, (*RESPONSE, "logprobs")),
        MFC(
            "ref_inf",
            "ref",
            CallKind.INFERENCE,
            "logprobs",
            (*PROMPT, *RESPONSE),
            ("ref_logprobs",),
        ),
        MFC(
            "reward_inf",
            "reward",
            CallKind.INFERENCE,
            "verifier_reward",
            (*PROMPT, *RESPONSE),
            ("scores", "task_correct"),
        ),
    ]


def ppo_graph() -> DataflowGraph:
    """actor_gen -> {ref_inf, reward_inf, critic_inf} -> {actor_train, critic_train}."""
    rollout = (*PROMPT, *RESPONSE, "logprobs", "ref_logprobs", "values", "scores")
    return DataflowGraph(
        "ppo",
        [
            *_rollout_calls(),
            MFC(
                "critic_inf",
                "critic",
                CallKind.INFERENCE,
                "values",
                (*PROMPT, *RESPONSE),
                ("values",),
            ),
            MFC("actor_train", "actor", CallKind.TRAIN, "ppo_actor_train", rollout),
            MFC("critic_train", "critic", CallKind.TRAIN, "ppo_critic_train", rollout),
        ],
        dataset_keys=PROMPT,
    )


def sft_graph() -> DataflowGraph:
    """One call: supervised fine-tuning of the actor on demonstrations."""
    return DataflowGraph(
        "sft",
        [MFC("actor_sft", "actor", CallKind.TRAIN, "sft_train", (*PROMPT, *RESPONSE))],
        dataset_keys=(*PROMPT, *RESPONSE),
    )


def group_baseline_graph(name: str) -> DataflowGraph:
    """Critic-free (GRPO, RLOO): actor_gen -> {ref_inf, reward_inf} -> actor_train, with n
    responses per prompt and the advantage from each prompt's group of rewards."""
    rollout = (*PROMPT, *RESPONSE, "logprobs", "ref_logprobs", "scores")
    return DataflowGraph(
        name,
        [
            *_rollout_calls(),
            MFC("actor_train", "actor", CallKind.TRAIN, "ppo_actor_train", rollout),
        ],
        dataset_keys=PROMPT,
    )


ALGORITHM_GRAPHS = {
    "ppo": ppo_graph,
    "grpo": lambda: group_baseline_graph("grpo"),
    "rloo": lambda: group_baseline_graph("rloo"),
}
"""RL algorithms selectable with `algo.name=<name>`."""


def ppo_rollout_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str,
    reward_clip: float,
    estimator: str,
    gamma: float,
    lam: float,
    whiten: bool,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Shaped per-token reward, advantages and returns of one rollout batch.

    logprobs, ref_logprobs, values, mask: [B, T]; scores: [B].
    Returns (advantages [B, T], returns [B, T], metrics). Returns are the estimator's
    (before whitening); advantages are whitened over all valid tokens if `whiten`.
    """
    mask = mask.to(torch.float32)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    token_rewards = shaped_token_rewards(scores, kl, mask, kl_coef, reward_clip)
    inp = AdvantageInput(
        token_rewards=token_rewards,
        mask=mask,
        values=values * mask,
        scores=scores,
        group_ids=group_ids,
        gamma=gamma,
        lam=lam,
    )
    advantages, returns = get_estimator(estimator)(inp)
    raw_adv_mean = float(masked_mean(advantages, mask))
    if whiten:
        advantages = masked_whiten(advantages, mask)
    metrics = {
        "rollout/kl_to_ref_token_mean": float(masked_mean(kl, mask)),
        "rollout/kl_to_ref_seq_sum": float((kl * mask).sum(-1).mean()),
        "rollout/advantage_mean_raw": raw_adv_mean,
        "rollout/return_mean": float(masked_mean(returns, mask)),
        "rollout/value_mean": float(masked_mean(values, mask)),
    }
    return advantages, returns, metrics
