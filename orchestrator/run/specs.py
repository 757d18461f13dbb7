"""The roles of a run as workers see them (RoleSpecs), their optimizers and the sampling
parameters of each generate call, all from the config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from orchestrator.config.schema import generation_backend
from orchestrator.data.reward_fns import RewardMix
from orchestrator.engines.generate import SamplingParams
from orchestrator.engines.train import OptimSpec
from orchestrator.engines.vllm_engine import VLLMSpec, kv_cache_bytes_for
from orchestrator.run.context import Run
from orchestrator.workers.spec import RoleSpec


def role_spec(
    run: Run,
    name: str,
    kind: str,
    init: Path | None,
    optim: OptimSpec | None = None,
    generates: bool = False,
    policy_experts: int | None = None,
) -> RoleSpec:
    c = run.cfg
    generation = generation_backend(c) if generates else None
    return RoleSpec(
        name=name,
        model_kind=kind,
        init_path=str(init) if init else None,
        tokenizer_path=str(run.assets.tokenizer_path),
        task_name=c.task.name,
        task_digits=c.task.num_digits,
        optim=optim,
        generation_backend=generation,
        vllm=vllm_spec(run, init) if generation == "vllm" else None,
        seed=c.run.seed,
        policy_experts=policy_experts,
        expert_rank=c.policy.expert_rank,
        rows_folder=str(run.paths.data),
        task_rows=run.assets.task_rows,
        eval_reward=reward_mix(run) if generates else None,
        dtype=c.model.frozen_dtype if optim is None and not generates else "float32",
    )


def vllm_spec(run: Run, init: Path | None) -> VLLMSpec:
    """The engine of a generating role: a context for the run's longest prompt and
    generate.max_new_tokens (at most the model's), and a KV cache for the run's largest
    generate call (rollout or evaluation) at that length. (A model of 8,192 positions
    sized at its whole context for 200 evaluation prompts would ask for tens of GB.)"""
    from transformers import AutoConfig

    c, t = run.cfg, run.cfg.train
    config = AutoConfig.from_pretrained(str(init))
    sequences = max(t.rollout_batch_prompts * t.samples_per_prompt, len(run.assets.eval_rows))
    g = c.generate
    tok = run.assets.tokenizer
    texts = [r.text for r in (*run.assets.rl_rows, *run.assets.eval_rows)]
    longest = max((len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]),
                  default=0)  # fmt: skip
    context = min(config.max_position_embeddings, longest + 1 + g.max_new_tokens)  # + bos
    return VLLMSpec(
        max_model_len=context,
        kv_cache_bytes=kv_cache_bytes_for(config, sequences, context),
        gpu_memory_utilization=g.vllm_gpu_memory_utilization,
        sleep_between_calls=g.vllm_sleep,
        dtype=g.vllm_dtype,
        max_num_seqs=max(sequences, 1),
    )


def optim_spec(
    run: Run, lr: float, warmup_steps: int, batch: int, micro: int, weight_decay: float = 0.0
) -> OptimSpec:
    """A trainable role's optimizer: gradient clipping and ZeRO stage from train.*."""
    t = run.cfg.train
    return OptimSpec(lr, warmup_steps, weight_decay, t.grad_clip, t.zero_stage, batch, micro)


def sampling(run: Run, seed: int, greedy: bool = False) -> SamplingParams:
    g = run.cfg.generate
    return SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k, greedy, seed,
                          run.assets.stop_token_ids, tuple(g.stop),
                          min_new_tokens=g.min_new_tokens)  # fmt: skip


def reward_mix(run: Run) -> RewardMix | None:
    """reward.function (or reward.functions with reward.weights), each file made absolute
    (workers may run elsewhere), and reward.timeout_s."""
    r = run.cfg.reward
    specs = list(r.functions) or ([r.function] if r.function else [])
    if r.source != "function" or not specs:
        return None

    def absolute(spec: str) -> str:
        if ":" not in spec:  # a built-in
            return spec
        where, name = spec.split(":")
        return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else spec

    weights = tuple(float(w) for w in r.weights) if r.weights else (1.0,) * len(specs)
    return RewardMix(tuple(absolute(s) for s in specs), weights, r.timeout_s)


def rl_specs(run: Run) -> list[RoleSpec]:
    """The RL stage's roles: actor, reference, critic and the reward (a model, the task's
    verifier or the user's function)."""
    cfg, t = run.cfg, run.cfg.train
    init = run.policy_init
    # optimizer steps of the whole run: epochs x mini-batches per rollout x steps
    updates = (
        t.steps
        * cfg.algo.ppo_epochs
        * (t.rollout_batch_prompts * t.samples_per_prompt // t.mini_batch_samples)
    )
    decay = max(updates - t.warmup_steps, 1) if t.lr_schedule == "cosine" else 0

    def optim(lr: float) -> OptimSpec:
        spec = optim_spec(run, lr, t.warmup_steps, t.mini_batch_samples,
                          t.micro_batch_samples_per_device, t.weight_decay)  # fmt: skip
        return replace(spec, decay_steps=decay, min_lr_ratio=t.min_lr_ratio,
                       micro_batch_tokens=t.micro_batch_tokens_per_device)  # fmt: skip

    experts = cfg.policy.num_experts if cfg.policy.kind == "pmoe" else None
    if run.uses_reward_model:
        reward = role_spec(run, "reward", "value", Path(cfg.reward.path or run.paths.reward_model))
    else:
        reward = replace(role_spec(run, "reward", "verifier", None),
                         reward=reward_mix(run))  # fmt: skip
    return [
        role_spec(
            run, "actor", "causal", init, optim(t.actor_lr), generates=True, policy_experts=experts
        ),  # fmt: skip
        role_spec(run, "ref", "causal", init),
        role_spec(run, "critic", "value", init, optim(t.critic_lr)),
        reward,
    ]
