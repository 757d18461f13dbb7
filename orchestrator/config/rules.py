"""The rules a composed config must satisfy. Each rule appends a Problem (field, value,
rule, fix); `validate` collects them all. The stages' rules (reward, policy, reweighting)
are in orchestrator.config.stage_rules, the rules of running on this machine in
orchestrator.config.run_rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config.data_rules import data_file_rules, data_setting_rules
from orchestrator.config.run_rules import local_run_rules, prompt_file_rules
from orchestrator.config.schema import (
    GENERATION_BACKENDS,
    LR_SCHEDULES,
    VLLM_DTYPES,
    AlgoConfig,
    GenerateConfig,
    Problem,
    RelayConfig,
    check_choice,
    positive,
)
from orchestrator.config.stage_rules import pipeline_rules


def validate(cfg: RelayConfig, for_run: bool = True) -> list[Problem]:
    """Every rule a composed config must satisfy; returns the problems found. Planning
    (for_run=False) skips the rules of running here (devices, nodes, model context)."""
    from algos.losses import LOSS_AGG_MODES
    from algos.ppo import ALGORITHM_GRAPHS
    from algos.rewards import KL_CONTROLLERS, KL_ESTIMATORS
    from orchestrator.data.tasks import TASKS
    from orchestrator.models.hf import MODEL_PRESETS

    p: list[Problem] = []
    a, t, s, g, c = cfg.algo, cfg.train, cfg.sft, cfg.generate, cfg.cluster

    def choice(path: str, value: Any, options: Any, what: str) -> None:
        check_choice(p, path, value, options, what)

    choice("algo.name", a.name, ALGORITHM_GRAPHS, "algorithm")
    from algos.advantages import list_estimators

    choice(
        "algo.advantage_estimator", a.advantage_estimator, list_estimators(), "advantage estimator"
    )
    choice("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS, "KL estimator")
    choice("algo.kl_controller", a.kl_controller, KL_CONTROLLERS, "KL controller")
    choice("algo.loss_agg", a.loss_agg, LOSS_AGG_MODES, "loss aggregation")
    choice("task.name", cfg.task.name, TASKS, "task")
    choice("generate.backend", g.backend, GENERATION_BACKENDS, "generation backend")
    choice("cluster.device", c.device, ("cpu", "cuda"), "device kind")
    _plan_rules(p, cfg)
    choice(
        "logger.wandb_mode", cfg.logger.wandb_mode, ("offline", "online", "disabled"), "wandb mode"
    )
    choice("train.zero_stage", t.zero_stage, (0, 1, 2, 3), "ZeRO stage")
    choice("generate.vllm_dtype", g.vllm_dtype, VLLM_DTYPES, "vLLM weight precision")
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES, "learning-rate schedule")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(Problem("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]", "use 0.1"))
    if cfg.model.path is None:
        choice("model.preset", cfg.model.preset, MODEL_PRESETS, "model preset")
    else:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            p.append(
                Problem(
                    "model.path",
                    cfg.model.path,
                    "must be a folder with a Hugging Face config.json (and tokenizer)",
                    "point it at a saved model folder, or unset it to build `model.preset`",
                )
            )
        elif not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            p.append(
                Problem(
                    "model.path",
                    cfg.model.path,
                    "the folder has no tokenizer files",
                    "save the tokenizer into the same folder (tokenizer.save_pretrained)",
                )
            )

    positive(
        p,
        t,
        "train",
        [
            "steps",
            "rollout_batch_prompts",
            "samples_per_prompt",
            "mini_batch_samples",
            "micro_batch_samples_per_device",
            "actor_lr",
            "critic_lr",
            "eval_every_steps",
        ],
    )
    positive(p, s, "sft", ["batch_samples", "micro_batch_samples_per_device", "lr"])
    for section, value in (("train", t.micro_batch_tokens_per_device),
                           ("sft", s.micro_batch_tokens_per_device)):  # fmt: skip
        if not isinstance(value, int) or value < 0:
            p.append(Problem(f"{section}.micro_batch_tokens_per_device", value,
                             "must be a whole number of tokens, 0 or more",
                             "0 forms micro-batches by samples; try 4096"))  # fmt: skip
    positive(p, g, "generate", ["max_new_tokens"])
    positive(p, a, "algo", ["ppo_epochs"])
    positive(p, cfg.run, "run", ["save_every_steps", "keep_checkpoints"])
    if cfg.run.max_restarts < 0:
        p.append(Problem("run.max_restarts", cfg.run.max_restarts, "must be >= 0",
                         "use 0 to stop at the first dead worker, or 3"))  # fmt: skip
    positive(p, c, "cluster", ["num_nodes", "devices_per_node", "threads_per_device"])
    choice("model.frozen_dtype", cfg.model.frozen_dtype, ["float32", "bfloat16"], "dtype")
    if c.call_threads not in ("auto", "device"):
        p.append(Problem("cluster.call_threads", c.call_threads, "must be auto or device",
                         "auto lets a call that runs alone use every core; device keeps "
                         "threads_per_device"))  # fmt: skip
    if not 0 <= a.gamma <= 1:
        p.append(Problem("algo.gamma", a.gamma, "must be in [0, 1]", "use 1.0 for RLHF"))
    if not 0 <= a.lam <= 1:
        p.append(Problem("algo.lam", a.lam, "must be in [0, 1]", "use 0.95 or 1.0"))
    if not 0 <= cfg.task.demo_noise <= 1:
        p.append(
            Problem("task.demo_noise", cfg.task.demo_noise, "must be in [0, 1]", "use e.g. 0.3")
        )

    _algo_ranges(p, a)
    _generate_ranges(p, g)
    _task_ranges(p, cfg)
    if s.enabled and s.steps < 1:
        p.append(
            Problem(
                "sft.steps",
                s.steps,
                "must be >= 1 when sft.enabled",
                "set sft.steps >= 1, or sft.enabled=false",
            )
        )
    if cfg.logger.plot_every_steps < 1:
        p.append(
            Problem(
                "logger.plot_every_steps",
                cfg.logger.plot_every_steps,
                "must be >= 1",
                "use e.g. 10",
            )
        )

    rollout = t.rollout_batch_prompts * t.samples_per_prompt
    if t.mini_batch_samples > 0 and rollout > 0 and rollout % t.mini_batch_samples:
        p.append(
            Problem(
                "train.mini_batch_samples",
                t.mini_batch_samples,
                f"must divide the rollout batch (rollout_batch_prompts x samples_per_prompt "
                f"= {rollout} samples)",
                f"use a divisor of {rollout}, e.g. {_divisor_near(rollout, t.mini_batch_samples)}",
            )
        )
    if (
        t.micro_batch_samples_per_device > 0
        and t.mini_batch_samples % t.micro_batch_samples_per_device
    ):
        p.append(
            Problem(
                "train.micro_batch_samples_per_device",
                t.micro_batch_samples_per_device,
                f"must divide train.mini_batch_samples ({t.mini_batch_samples})",
                f"use a divisor of {t.mini_batch_samples}",
            )
        )
    if s.micro_batch_samples_per_device > 0 and s.batch_samples % s.micro_batch_samples_per_device:
        p.append(
            Problem(
                "sft.micro_batch_samples_per_device",
                s.micro_batch_samples_per_device,
                f"must divide sft.batch_samples ({s.batch_samples})",
                f"use a divisor of {s.batch_samples}",
            )
        )
    own_prompts = cfg.task.prompt_file is not None or cfg.data.train_files
    if not own_prompts and cfg.task.num_rl_prompts < t.rollout_batch_prompts:
        p.append(
            Problem(
                "task.num_rl_prompts",
                cfg.task.num_rl_prompts,
                f"must be at least train.rollout_batch_prompts ({t.rollout_batch_prompts})",
                "raise task.num_rl_prompts or lower the rollout batch",
            )
        )

    if a.name in ALGORITHM_GRAPHS:
        has_critic = "critic" in ALGORITHM_GRAPHS[a.name]().roles
        if a.advantage_estimator == "gae" and not has_critic:
            p.append(
                Problem(
                    "algo.advantage_estimator",
                    a.advantage_estimator,
                    f"'gae' needs a critic; algorithm '{a.name}' has none",
                    "use algo=grpo or algo=rloo (they set their estimator), or grpo|rloo",
                )
            )
        if a.advantage_estimator in ("grpo", "dr_grpo", "rloo") and t.samples_per_prompt < 2:
            p.append(
                Problem(
                    "train.samples_per_prompt",
                    t.samples_per_prompt,
                    f"the '{a.advantage_estimator}' estimator compares responses within "
                    "a prompt's group, so it needs at least 2",
                    "use e.g. train.samples_per_prompt=4",
                )
            )

    pipeline_rules(p, cfg)
    data_setting_rules(p, cfg)
    if for_run:
        local_run_rules(p, cfg)
        prompt_file_rules(p, cfg)
        data_file_rules(p, cfg)
    resume = cfg.run.resume
    if resume not in ("never", "auto") and not Path(resume).is_dir():
        p.append(
            Problem(
                "run.resume",
                resume,
                "must be never, auto or an existing checkpoint folder",
                "use resume=auto to continue from the newest complete checkpoint",
            )
        )
    return p


PLAN_MODES = ("auto", "per_role", "search", "symmetric", "heuristic", "file")


OFFLOAD_MODES = ("auto", "always", "never")


PLAN_GRAPHS = ("sft", "reward_model")


def _plan_rules(p: list[Problem], cfg: RelayConfig) -> None:
    from planner.catalogue import DEVICE_KINDS, MODEL_SHAPES

    pl, c = cfg.plan, cfg.cluster
    check_choice(p, "plan.mode", pl.mode, PLAN_MODES, "plan mode")
    check_choice(p, "plan.offload", pl.offload, OFFLOAD_MODES, "offload rule")
    if pl.graph is not None:
        check_choice(p, "plan.graph", pl.graph, PLAN_GRAPHS, "graph to plan (null: the RL graph)")
    if c.device_kind is not None:
        check_choice(p, "cluster.device_kind", c.device_kind, DEVICE_KINDS, "device kind")
    for key in ("actor_shape", "critic_shape"):
        if getattr(pl, key) is not None:
            check_choice(p, f"plan.{key}", getattr(pl, key), MODEL_SHAPES, "model shape")
    if pl.path is not None and not Path(pl.path).is_file():
        p.append(Problem("plan.path", pl.path, "the plan file does not exist",
                         "write one with `relay plan ... plan.out=<file>`"))  # fmt: skip
    elif pl.mode == "file" and pl.path is None:
        p.append(Problem("plan.path", pl.path, "plan=file reads an existing plan file",
                         "write one with `relay plan ...` and pass plan.path=<file>"))  # fmt: skip
    if c.calls_profile is not None and not Path(c.calls_profile).is_file():
        p.append(Problem("cluster.calls_profile", c.calls_profile, "the file does not exist",
                         "measure this job's calls with `relay profile --calls`"))  # fmt: skip
    if c.profile is not None and not Path(c.profile).is_file():
        p.append(Problem("cluster.profile", c.profile, "the profile file does not exist",
                         "measure one with `relay profile --out <file>`"))  # fmt: skip
    positive(p, pl, "plan", ["search_time_s", "iterations", "max_pp"])
    if not 0 <= pl.min_gain < 1:
        p.append(Problem("plan.min_gain", pl.min_gain, "must be in [0, 1): a fraction of the "
                         "best hand-made plan's estimated step time",
                         "use 0.1 (the default), or 0 to run whatever the search finds"))  # fmt: skip
    if pl.prompt_tokens is not None and pl.prompt_tokens <= 0:
        p.append(Problem("plan.prompt_tokens", pl.prompt_tokens, "must be > 0", "use 128"))


def _algo_ranges(p: list[Problem], a: AlgoConfig) -> None:
    if a.kl_coef < 0:
        p.append(
            Problem("algo.kl_coef", a.kl_coef, "must be >= 0", "use e.g. 0.02, or 0 for no KL")
        )
    if a.entropy_coef < 0:
        p.append(
            Problem(
                "algo.entropy_coef",
                a.entropy_coef,
                "must be >= 0",
                "use 0 (off) or a small bonus such as 0.001",
            )
        )
    if a.kl_controller == "adaptive":
        if a.kl_target_per_token <= 0:
            p.append(
                Problem(
                    "algo.kl_target_per_token",
                    a.kl_target_per_token,
                    "must be > 0 for the adaptive controller",
                    "use e.g. 0.02",
                )
            )
        if a.kl_horizon_samples <= 0:
            p.append(
                Problem(
                    "algo.kl_horizon_samples",
                    a.kl_horizon_samples,
                    "must be > 0 for the adaptive controller",
                    "use e.g. 10000",
                )
            )
    if a.reward_clip <= 0:
        p.append(
            Problem(
                "algo.reward_clip",
                a.reward_clip,
                "must be > 0 (scores are clipped to [-c, c])",
                "use e.g. 10.0",
            )
        )
    for name in ("clip_eps_low", "clip_eps_high"):
        v = getattr(a, name)
        if not 0 < v < 1:
            p.append(Problem(f"algo.{name}", v, "must be in (0, 1)", "use 0.2"))
    if a.dual_clip_c is not None and a.dual_clip_c <= 1:
        p.append(
            Problem(
                "algo.dual_clip_c",
                a.dual_clip_c,
                "must be > 1 (or null to disable)",
                "use 3.0, or null",
            )
        )
    if a.value_clip_eps is not None and a.value_clip_eps <= 0:
        p.append(
            Problem(
                "algo.value_clip_eps",
                a.value_clip_eps,
                "must be > 0 (or null to disable)",
                "use 0.2, or null",
            )
        )


def _generate_ranges(p: list[Problem], g: GenerateConfig) -> None:
    if g.temperature <= 0:
        p.append(
            Problem(
                "generate.temperature",
                g.temperature,
                "must be > 0",
                "use 1.0 for RL (greedy decoding is an evaluation setting)",
            )
        )
    if not 0 <= g.min_new_tokens <= g.max_new_tokens:
        p.append(Problem("generate.min_new_tokens", g.min_new_tokens,
                         f"must be in [0, generate.max_new_tokens = {g.max_new_tokens}]",
                         "use 0 (responses end at eos), or max_new_tokens for fixed lengths"))  # fmt: skip
    if not 0 < g.top_p <= 1:
        p.append(Problem("generate.top_p", g.top_p, "must be in (0, 1]", "use 1.0"))
    if g.top_k < 0:
        p.append(Problem("generate.top_k", g.top_k, "must be >= 0 (0 = off)", "use 0"))
    if not 0 < g.vllm_gpu_memory_utilization <= 1:
        p.append(
            Problem(
                "generate.vllm_gpu_memory_utilization",
                g.vllm_gpu_memory_utilization,
                "must be in (0, 1]",
                "use 0.5 when the trainer shares the device",
            )
        )
    bad = [t for t in g.stop_tokens if not isinstance(t, str) or not t]
    if bad:
        p.append(
            Problem(
                "generate.stop_tokens",
                list(g.stop_tokens),
                "each stop token is a non-empty string, one token of the tokenizer",
                "e.g. generate.stop_tokens='[\";\"]'",
            )
        )
    if any(not isinstance(t, str) or not t for t in g.stop):
        p.append(Problem("generate.stop", list(g.stop), "each stop string is non-empty text",
                         "e.g. generate.stop='[\"</answer>\"]'"))  # fmt: skip


def _task_ranges(p: list[Problem], cfg: RelayConfig) -> None:
    from orchestrator.data.tasks import MAX_DIGITS, TASKS, make_task, max_eval_prompts

    tc = cfg.task
    counts = ["num_digits", "num_rl_prompts", "num_eval_prompts"]
    if cfg.sft.enabled:
        counts.append("num_demos")
    for name in counts:
        v = getattr(tc, name)
        if v < 1:
            p.append(Problem(f"task.{name}", v, "must be >= 1", "use a positive count"))
    if tc.name not in TASKS or tc.num_digits < 1:
        return
    most = MAX_DIGITS.get(tc.name)
    if most is not None and tc.num_digits > most:
        p.append(
            Problem(
                "task.num_digits",
                tc.num_digits,
                f"the '{tc.name}' task takes at most {most} digits",
                f"use task.num_digits between 1 and {most}",
            )
        )
        return
    task = make_task(tc.name, tc.num_digits)
    room = max_eval_prompts(task)
    if tc.num_eval_prompts > room:
        p.append(
            Problem(
                "task.num_eval_prompts",
                tc.num_eval_prompts,
                f"at most half of the {task.num_distinct_prompts} distinct prompts of "
                f"'{tc.name}' with {tc.num_digits} digits may be held out",
                f"use at most {room}, or raise task.num_digits",
            )
        )
    need = task.answer_tokens
    if cfg.generate.max_new_tokens < need and not cfg.data.train_files:
        p.append(
            Problem(
                "generate.max_new_tokens",
                cfg.generate.max_new_tokens,
                f"'{tc.name}' answers take up to {need} tokens (eos included), so every "
                "longer answer would be cut",
                f"use at least {need}",
            )
        )


def _divisor_near(n: int, want: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - want))
