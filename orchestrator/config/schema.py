"""The configuration schema (defaults live here, once) and its validation.

The dataclasses are registered in Hydra's ConfigStore as the schema of `configs/`;
YAML files only override them. `load_config` composes the tree with the user's
overrides, checks every override and every rule, and raises one `ConfigError` that
lists every problem with its field, value, rule and fix.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class RunConfig:
    name: str = "ppo-sort"  # run folder = output_dir/name; also the wandb run name
    output_dir: str = "runs"
    seed: int = 1
    resume: str = "auto"  # auto | never | <path of a checkpoints/step_N folder>
    allow_config_change: bool = False  # resume even if the folder's config differs
    save_every_steps: int = 20
    keep_checkpoints: int = 2
    max_restarts: int = 3  # RL: times dead model workers are replaced (from the newest checkpoint)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # built from a size preset unless `path` is set
    path: str | None = None  # a local Hugging Face model folder (causal LM + tokenizer)
    max_position_embeddings: int = 64
    zero_head: bool = False  # LM head starts at zero: a uniform next-token distribution


@dataclass
class TaskConfig:
    name: str = "sort"  # sort | add
    num_digits: int = 8
    demo_noise: float = 0.3  # share of demonstrations with a mistake
    num_demos: int = 4000
    num_rl_prompts: int = 4000
    num_eval_prompts: int = 256
    # a JSONL file of {"prompt": ...} lines: the RL stage's prompts instead of sampled ones
    prompt_file: str | None = None


@dataclass
class SFTConfig:
    enabled: bool = True
    steps: int = 600
    batch_samples: int = 64
    micro_batch_samples_per_device: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class RewardConfig:
    # model (Bradley-Terry reward model) | verifier (the task's own) | function (yours)
    source: str = "model"
    function: str | None = None  # source=function: 'path/to/file.py:name' or 'pkg.mod:name'
    on_error: str = "stop"  # a reward that raises or is NaN: stop (with a checkpoint) | skip
    steps: int = 600  # reward-model training steps (one batch of pairs each)
    batch_pairs: int = 128
    micro_batch_pairs_per_device: int = 128
    lr: float = 5e-4
    warmup_steps: int = 10
    num_pairs: int = 20000  # training preference pairs (4000 overfit: 0.85 held out)
    num_eval_pairs: int = 256  # held-out pairs (eval prompts) for the accuracy
    label_noise: float = 0.1  # share of training pairs with chosen and rejected swapped
    path: str | None = None  # a trained reward-model folder to use (skips the stage)


@dataclass
class PolicyConfig:
    kind: str = "plain"  # plain | pmoe (a mixture of expert heads with a router)
    num_experts: int = 1
    expert_rank: int = 8  # rank of each expert's low-rank delta on the LM head
    router_coef: float = 1.0  # weight of the router's regression on the best expert
    q_coef: float = 1.0  # weight of the Q head's regression on the returns
    best_expert_only: bool = True  # policy gradient only through each token's best expert


@dataclass
class ReweightConfig:
    strategy: str = "uniform"  # uniform | linupper | quadratic | extremes
    temperature: float = 1.0  # r: larger is closer to uniform weights
    warmup_steps: int = 0  # uniform weights for the first steps of each stage
    policy_proxy: str = "none"  # none | nll | abs_advantage: per-sample difficulty for RL


@dataclass
class AlgoConfig:
    name: str = "ppo"
    advantage_estimator: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_estimator: str = "k1"  # k1 | k2 | k3 (KL in the reward)
    kl_in_loss: bool = False  # KL as a loss term (kl_coef x token-mean k3) instead
    kl_coef: float = 0.02
    kl_controller: str = "fixed"  # fixed | adaptive
    kl_target_per_token: float = 0.02  # adaptive target, per-token mean KL
    kl_horizon_samples: int = 10000
    reward_clip: float = 10.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = 3.0
    value_clip_eps: float | None = 0.2
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    policy_loss: str = "ppo"  # ppo (clipped ratio) | reinforce (ReMax: -G logp, no ratio)


@dataclass
class TrainConfig:
    steps: int = 200  # RL steps (one rollout batch each)
    rollout_batch_prompts: int = 64
    samples_per_prompt: int = 1
    mini_batch_samples: int = 32  # samples per optimizer step
    micro_batch_samples_per_device: int = 32
    actor_lr: float = 2e-4
    critic_lr: float = 1e-3
    warmup_steps: int = 2  # optimizer steps of linear warm-up (actor and critic)
    lr_schedule: str = "constant"  # constant | cosine (to min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0
    eval_every_steps: int = 20


@dataclass
class GenerateConfig:
    backend: str = "auto"  # auto (vllm where installed, else hf) | vllm | hf
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_tokens: list[str] = field(default_factory=list)  # tokens that end a response, like eos
    vllm_tensor_parallel_size: int = 1  # shards of the engine (its own processes when > 1)
    vllm_gpu_memory_utilization: float = 0.5  # GPU: share of the device the engine may take
    vllm_sleep: bool = True  # GPU: free the engine's KV cache and weights while training
    vllm_dtype: str = "float32"  # the engine's weights: float32 (the trainer's) | bfloat16


GENERATION_BACKENDS = ("auto", "vllm", "hf")
LR_SCHEDULES = ("constant", "cosine")
VLLM_DTYPES = ("float32", "bfloat16", "float16")


def generation_backend(cfg: RelayConfig) -> str:
    """The backend `generate.backend` selects: auto is vllm where it is installed, except
    for PMOE policies (a mixture head vLLM cannot run), which use transformers."""
    backend = cfg.generate.backend
    if backend != "auto":
        return backend
    from orchestrator.engines.vllm_engine import vllm_available

    return "vllm" if vllm_available() and cfg.policy.kind == "plain" else "hf"


@dataclass
class ClusterConfig:
    address: str | None = None  # a Ray address to join; RAY_ADDRESS is used if unset
    num_nodes: int = 1
    devices_per_node: int = 4  # on CPU: slots of the custom Ray resource `relay_device`
    device: str = "cpu"  # cpu | cuda
    threads_per_device: int = 1
    device_kind: str | None = None  # planner catalogue: cpu | h100-sxm | h200-sxm | a100-sxm-80g
    profile: str | None = None  # a `relay profile` file (default: profiles/<kind>.json if present)


@dataclass
class PlanConfig:
    mode: str = "per_role"  # per_role | search | symmetric | heuristic | file
    path: str | None = None  # the plan file plan=file reads (JSON or YAML, as `relay plan` writes)
    graph: str | None = None  # graph to plan: null (the algorithm's RL graph) | sft | reward_model
    seed: int = 0  # the search's random seed
    search_time_s: float = 10.0  # the search's time budget
    iterations: int = 3  # iterations the simulator unrolls
    max_pp: int = 1  # the largest pipeline degree plans may use (1: what the runtime runs)
    offload: str = (
        "auto"  # frozen roles sharing devices: auto (if memory needs it) | always | never
    )
    actor_shape: str | None = (
        None  # planning only: a catalogue shape (llama2-7b, ...) for actor/ref
    )
    critic_shape: str | None = None  # planning only: a catalogue shape for critic/reward
    prompt_tokens: int | None = None  # planning only: prompt length (null: the task's)
    out: str | None = None  # where `relay plan` writes (null: <output_dir>/<name>.plan.json)


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "relay"
    progress: bool = True
    plot_every_steps: int = 10


@dataclass
class RelayConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


GROUP_SCHEMAS = {
    "algo": AlgoConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "reward": RewardConfig,
    "policy": PolicyConfig,
    "cluster": ClusterConfig,
    "plan": PlanConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="relay_schema", node=RelayConfig)


@dataclass(frozen=True)
class Problem:
    field: str
    value: Any
    rule: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.rule}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Every problem of a configuration, raised once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        body = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        super().__init__(f"invalid configuration ({n} problem{'s' * (n != 1)}):\n{body}")


def _leaf_paths(schema: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(schema):
        path = f"{prefix}{f.name}"
        default = (
            f.default_factory() if f.default_factory is not field().default_factory else f.default
        )  # type: ignore[misc]
        if is_dataclass(default):
            out.update(_leaf_paths(type(default), path + "."))
        else:
            out[path] = f.type
    return out


LEAF_PATHS = _leaf_paths(RelayConfig)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_overrides(overrides: list[str]) -> list[Problem]:
    """Catch misspelled keys and unknown group options before Hydra composes."""
    problems: list[Problem] = []
    for ov in overrides:
        if "=" not in ov:
            problems.append(
                Problem(ov, ov, "an override has the form key=value", f"write it as {ov}=<value>")
            )
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUP_SCHEMAS:
            options = group_options(key)
            if value not in options:
                problems.append(
                    Problem(
                        key,
                        value,
                        f"the config group '{key}' has no option '{value}'",
                        f"use one of {options}",
                    )
                )
            continue
        if key.startswith("hydra."):
            continue
        if key not in LEAF_PATHS:
            close = difflib.get_close_matches(key, list(LEAF_PATHS), n=1, cutoff=0.6)
            fix = (
                f"did you mean '{close[0]}'?" if close else "see `relay train --help` for the keys"
            )
            problems.append(Problem(key, value, "unknown key", fix))
            continue
        type_problem = _type_problem(key, value, str(LEAF_PATHS[key]))
        if type_problem:
            problems.append(type_problem)
    return problems


def _type_problem(key: str, raw: str, annotation: str) -> Problem | None:
    """A wrong-typed override value (int, float, bool fields; null where optional)."""
    import yaml

    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string; Hydra as a float
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None:
        ok = "None" in kinds
    elif "bool" in kinds:
        ok = isinstance(value, bool)
    elif "int" in kinds and "float" not in kinds:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in kinds:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if ok:
        return None
    want = " or ".join(sorted("null" if k == "None" else k for k in kinds))
    return Problem(key, raw, f"must be {want}", f"give {key} a value of type {want}")


def compose(overrides: list[str]) -> DictConfig:
    """Compose configs/ with the overrides (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def load_config(overrides: list[str], for_run: bool = True) -> RelayConfig:
    """Compose, type-check and validate; raise ConfigError listing every problem.
    for_run=False (`relay plan`) skips the rules of running on this machine."""
    problems = check_overrides(overrides)
    good = [
        o
        for o in overrides
        if not any(o.split("=", 1)[0].lstrip("+~") == p.field for p in problems)
    ]
    try:
        cfg = compose(good)
    except Exception as e:  # Hydra/OmegaConf type or parse errors name the key in the text
        msg = str(e).splitlines()[0]
        problems.append(
            Problem(
                "overrides",
                good,
                f"could not compose the config ({msg})",
                "give each key a value of its declared type",
            )
        )
        raise ConfigError(problems) from None
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RelayConfig)
    problems += validate(obj, for_run)
    if problems:
        raise ConfigError(problems)
    return obj


def check_choice(p: list[Problem], path: str, value: Any, options: Any, what: str) -> None:
    """A Problem if `value` is not one of `options` (listed, sorted, in the fix)."""
    if value not in options:
        p.append(Problem(path, value, f"unknown {what}", f"use one of {sorted(options)}"))


def _positive(problems: list[Problem], cfg: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            problems.append(Problem(f"{prefix}.{n}", v, "must be > 0", "set a positive value"))


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

    _positive(
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
    _positive(p, s, "sft", ["batch_samples", "micro_batch_samples_per_device", "lr"])
    _positive(p, g, "generate", ["max_new_tokens"])
    _positive(p, a, "algo", ["ppo_epochs"])
    _positive(p, cfg.run, "run", ["save_every_steps", "keep_checkpoints"])
    if cfg.run.max_restarts < 0:
        p.append(Problem("run.max_restarts", cfg.run.max_restarts, "must be >= 0",
                         "use 0 to stop at the first dead worker, or 3"))  # fmt: skip
    _positive(p, c, "cluster", ["num_nodes", "devices_per_node", "threads_per_device"])
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
    if cfg.task.prompt_file is None and cfg.task.num_rl_prompts < t.rollout_batch_prompts:
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
    from orchestrator.config.stage_rules import pipeline_rules

    pipeline_rules(p, cfg)
    if for_run:
        _local_run_rules(p, cfg)
        _prompt_file_rules(p, cfg)
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


def _local_run_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """Rules of running here with one worker per role (not of planning): enough devices,
    one node unless joining a cluster, the GPUs this machine has, the model's context."""
    from algos.ppo import ALGORITHM_GRAPHS

    a, c = cfg.algo, cfg.cluster
    if cfg.model.path is None:
        from orchestrator.data.tasks import make_task

        try:
            task = make_task(cfg.task.name, cfg.task.num_digits)
        except ValueError:  # an unknown task or digit count: its own rule reports it
            task = None
        if task is not None:
            context = task.max_prompt_chars + 1 + cfg.generate.max_new_tokens
            if context > cfg.model.max_position_embeddings:
                p.append(
                    Problem(
                        "model.max_position_embeddings",
                        cfg.model.max_position_embeddings,
                        f"bos + prompt + response take up to {context} positions",
                        f"use at least {context}",
                    )
                )
    if a.name in ALGORITHM_GRAPHS:
        needed = devices_needed(a.name, c.device, cfg.reward.source)
        have = c.num_nodes * c.devices_per_node
        if needed > have:
            p.append(
                Problem(
                    "cluster.devices_per_node",
                    c.devices_per_node,
                    f"algorithm '{a.name}' places {needed} roles on one device each, the "
                    f"cluster has {have} devices ({c.num_nodes} node(s) x {c.devices_per_node})",
                    f"set cluster.devices_per_node >= {-(-needed // c.num_nodes)}",
                )
            )
    address = c.address or os.environ.get("RAY_ADDRESS")
    if c.num_nodes > 1 and not address:
        p.append(
            Problem(
                "cluster.num_nodes",
                c.num_nodes,
                "a local Ray cluster started by `relay train` has one node",
                "set cluster.address (or RAY_ADDRESS) to join a multi-node cluster, or use 1",
            )
        )
    if c.device == "cuda" and not address:
        import torch

        gpus = torch.cuda.device_count()
        needed_gpus = (
            devices_needed(a.name, "cuda", cfg.reward.source) if a.name in ALGORITHM_GRAPHS else 1
        )
        if gpus < needed_gpus:
            p.append(
                Problem(
                    "cluster.device",
                    c.device,
                    f"the local cluster would need {needed_gpus} GPUs (one per model "
                    f"role), this machine has {gpus}",
                    "use cluster.device=cpu, or join a larger cluster (cluster.address)",
                )
            )


def _prompt_file_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """`task.prompt_file`: readable JSONL, every line a prompt of the task that fits the
    model's context with bos and generate.max_new_tokens (line-numbered problems)."""
    import random

    from orchestrator.data.tasks import TASKS, make_task
    from orchestrator.data.user_data import prompt_file_problems, read_prompt_file

    path = cfg.task.prompt_file
    if path is None or cfg.task.name not in TASKS or cfg.task.num_digits < 1:
        return
    task = make_task(cfg.task.name, cfg.task.num_digits)
    context = cfg.model.max_position_embeddings
    count_tokens: Any = len  # the tokenizer Relay builds has one token per character
    if cfg.model.path is not None:
        folder = Path(cfg.model.path)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        except Exception:  # model.path's own rule reports a broken folder
            return

        def count_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

    report = read_prompt_file(path, task.answer, count_tokens, context, cfg.generate.max_new_tokens)
    example = task.sample_prompt(random.Random(0))
    for rule, fix in prompt_file_problems(
        report, task.name, example, context, cfg.generate.max_new_tokens,
        cfg.train.rollout_batch_prompts,
    ):  # fmt: skip
        p.append(Problem("task.prompt_file", path, rule, fix))


PLAN_MODES = ("per_role", "search", "symmetric", "heuristic", "file")
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
    if c.profile is not None and not Path(c.profile).is_file():
        p.append(Problem("cluster.profile", c.profile, "the profile file does not exist",
                         "measure one with `relay profile --out <file>`"))  # fmt: skip
    _positive(p, pl, "plan", ["search_time_s", "iterations", "max_pp"])
    if pl.prompt_tokens is not None and pl.prompt_tokens <= 0:
        p.append(Problem("plan.prompt_tokens", pl.prompt_tokens, "must be > 0", "use 128"))


def devices_needed(algo: str, device: str, reward_source: str = "model") -> int:
    """Devices the algorithm's roles take: one each; on GPUs a verifier reward needs none."""
    from algos.ppo import ALGORITHM_GRAPHS

    roles = ALGORITHM_GRAPHS[algo]().roles
    free = device == "cuda" and "reward" in roles and reward_source in ("verifier", "function")
    return len(roles) - (1 if free else 0)


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
    if not 0 < g.top_p <= 1:
        p.append(Problem("generate.top_p", g.top_p, "must be in (0, 1]", "use 1.0"))
    if g.top_k < 0:
        p.append(Problem("generate.top_k", g.top_k, "must be >= 0 (0 = off)", "use 0"))
    if g.vllm_tensor_parallel_size < 1:
        p.append(
            Problem(
                "generate.vllm_tensor_parallel_size",
                g.vllm_tensor_parallel_size,
                "must be >= 1",
                "use 1",
            )
        )
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


def _task_ranges(p: list[Problem], cfg: RelayConfig) -> None:
    from orchestrator.data.tasks import TASKS, make_task, max_eval_prompts

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
    if cfg.generate.max_new_tokens < need:
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


def to_yaml(cfg: RelayConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RelayConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
