"""The RL algorithms (PPO, ReMax, GRPO, RLOO) and the one-call stages (SFT, reward model)
declared as dataflow graphs, plus the rollout math every actor and critic train call
shares (shaped reward -> advantage estimator -> whitening).

Shape legend: B = sequences, U = distinct prompts, T = response tokens.
"""

from __future__ import annotations

import torch

from algos.advantages import AdvantageInput, get_estimator
from algos.graph import MFC, CallKind, DataflowGraph
from algos.losses import masked_mean, masked_sum, masked_whiten
from algos.rewards import kl_estimate, shaped_token_rewards

PROMPT = ("prompt_ids", "prompt_mask")
RESPONSE = ("response_ids", "response_mask")
UNIQUE_PROMPT = ("unique_prompt_ids", "unique_prompt_mask")
# the prompts' rows in the RL dataset: the reward reads their labels and other fields
INDEX, UNIQUE_INDEX = ("prompt_index",), ("unique_prompt_index",)
GREEDY_RESPONSE = ("greedy_response_ids", "greedy_response_mask")
PAIR = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


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
            "reward",
            (*PROMPT, *RESPONSE, *INDEX),
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
        dataset_keys=(*PROMPT, *INDEX),
    )


def sft_graph() -> DataflowGraph:
    """One call: supervised fine-tuning of the actor on demonstrations."""
    return DataflowGraph(
        "sft",
        [MFC("actor_sft", "actor", CallKind.TRAIN, "sft_train", (*PROMPT, *RESPONSE))],
        dataset_keys=(*PROMPT, *RESPONSE),
    )


def reward_model_graph() -> DataflowGraph:
    """One call: Bradley-Terry training of the reward model on preference pairs."""
    return DataflowGraph(
        "reward_model",
        [MFC("reward_train", "reward", CallKind.TRAIN, "reward_model_train", (*PROMPT, *PAIR))],
        dataset_keys=(*PROMPT, *PAIR),
    )


def remax_graph() -> DataflowGraph:
    """ReMax (Li et al. 2024): {actor_gen, actor_greedy_gen} -> {reward_inf,
    reward_greedy_inf, ref_inf} -> actor_train; no critic. The greedy response to each
    distinct prompt (decoded once, before the prompts are repeated) is the baseline."""
    rollout = (*PROMPT, *RESPONSE, "logprobs", "ref_logprobs", "scores", "baseline_scores")
    return DataflowGraph(
        "remax",
        [
            *_rollout_calls(),
            MFC(
                "actor_greedy_gen",
                "actor",
                CallKind.GENERATE,
                "generate",
                UNIQUE_PROMPT,
                GREEDY_RESPONSE,
                options={"greedy": True, "metric_prefix": "rollout/greedy_"},
            ),
            MFC(
                "reward_greedy_inf",
                "reward",
                CallKind.INFERENCE,
                "reward",
                (*UNIQUE_PROMPT, *GREEDY_RESPONSE, *UNIQUE_INDEX),
                ("baseline_scores", "greedy_task_correct"),
                options={"metric_prefix": "rollout/greedy_"},
            ),
            MFC("actor_train", "actor", CallKind.TRAIN, "ppo_actor_train", rollout),
        ],
        dataset_keys=(*PROMPT, *INDEX, *UNIQUE_PROMPT, *UNIQUE_INDEX),
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
        dataset_keys=(*PROMPT, *INDEX),
    )


ALGORITHM_GRAPHS = {
    "ppo": ppo_graph,
    "remax": remax_graph,
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
    baseline_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Shaped per-token reward, advantages and returns of one rollout batch.

    logprobs, ref_logprobs, values, mask: [B, T]; scores, baseline_scores: [B].
    The outcome is clip(scores, -c, c), or with a baseline (ReMax)
    clip(scores - baseline_scores, -c, c); the shaped reward rt [B, T] is -kl_coef x KL per
    token plus the outcome on the last valid token. Outcome estimators read, as `scores`,
    the baseline-corrected outcome (ReMax) or each sample's whole return sum_t rt (GRPO,
    RLOO), so a KL penalty in the reward reaches them too.
    Returns (advantages [B, T], returns [B, T], metrics). Returns are the estimator's
    (before whitening); advantages are whitened over all valid tokens if `whiten`.
    """
    mask = mask.to(torch.float32)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    if baseline_scores is not None:
        outcome = torch.clamp(scores - baseline_scores, -reward_clip, reward_clip)
    else:
        outcome = torch.clamp(scores, -reward_clip, reward_clip)
    token_rewards = shaped_token_rewards(outcome, kl, mask, kl_coef, reward_clip)
    inp = AdvantageInput(
        token_rewards=token_rewards,
        mask=mask,
        values=values * mask,
        scores=outcome if baseline_scores is not None else masked_sum(token_rewards, mask, -1),
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
