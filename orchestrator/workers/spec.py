"""What a worker needs to know of a role to host its replicas."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.data.reward_fns import RewardMix
from orchestrator.engines.train import OptimSpec
from orchestrator.engines.vllm_engine import VLLMSpec
from orchestrator.models.kinds import ModelKind


@dataclass(frozen=True)
class RoleSpec:
    name: str
    model_kind: str  # causal | value (critic or reward model) | verifier (no model)
    init_path: str | None  # Hugging Face folder the weights start from
    tokenizer_path: str
    task_name: str
    task_digits: int
    optim: OptimSpec | None = None  # set for trainable roles
    generation_backend: str | None = None  # hf | vllm, set for roles that generate
    vllm: VLLMSpec | None = None  # set with generation_backend vllm
    seed: int = 0
    policy_experts: int | None = None  # a PMOE policy head with this many experts
    expert_rank: int = 8
    reward: RewardMix | None = None  # a verifier role: the user's reward functions instead
    rows_folder: str | None = None  # the run's RL rows (data/rl_<split>.jsonl)
    task_rows: bool = True  # the rows are the task's prompts: its verifier scores them
    eval_reward: RewardMix | None = None  # a generating role: what scores evaluation responses
    dtype: str = "float32"  # a frozen role's weights (model.frozen_dtype): float32 | bfloat16

    def kind(self) -> ModelKind:
        """The model this role holds (orchestrator.models.kinds)."""
        if self.model_kind == "verifier":
            return ModelKind("none")
        if self.model_kind == "causal" and self.policy_experts is not None:
            return ModelKind("pmoe", self.policy_experts, self.expert_rank, self.seed)
        return ModelKind(self.model_kind, seed=self.seed)
