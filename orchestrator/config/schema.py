"""The configuration schema (defaults live here, once) and its validation.

The dataclasses are registered in Hydra's ConfigStore as the schema of `configs/`;
YAML files only override them. `load_config` composes the tree with the user's
overrides, checks every override and every rule, and raises one `ConfigError` that
lists every problem with its field, value, rule and fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

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
    # the frozen roles' weights (reference, reward model): float32 (the trainer's) | bfloat16
    frozen_dtype: str = "float32"


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
class DataConfig:
    """Your own rows, from files read by the `datasets` library (docs/data.md)."""

    # RL prompts: JSONL, JSON, Parquet or Arrow files, or a `save_to_disk` folder; the
    # built-in task's prompts when unset
    train_files: list[str] | None = None
    eval_files: list[str] | None = None  # held-out prompts (the eval/ metrics)
    prompt_key: str = "prompt"  # text, or chat messages [{"role": ..., "content": ...}]
    label_key: str = "label"  # the ground truth handed to the reward (optional column)
    # auto: messages go through the chat template, text as it is; always: text prompts
    # too, as one user message; never: no template (messages are refused)
    chat: str = "auto"
    chat_template: str | None = (
        None  # a Jinja template (or a file of one) instead of the tokenizer's
    )
    too_long: str = "filter"  # rows that do not fit the model's context: filter | error
    # SFT rows (prompt + response, or a conversation); the task's demonstrations when unset
    sft_files: list[str] | None = None
    response_key: str = "response"
    messages_key: str = "messages"  # a conversation: one SFT row per assistant turn
    # reward-model rows (prompt + chosen + rejected); the task's pairs when unset
    preference_files: list[str] | None = None
    preference_eval_files: list[str] | None = None  # held-out pairs: the model's accuracy
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    max_response_tokens: int | None = None  # SFT and preference responses (null: context)


@dataclass
class SFTConfig:
    enabled: bool = True
    steps: int = 600
    batch_samples: int = 64
    micro_batch_samples_per_device: int = 64
    micro_batch_tokens_per_device: int = 0  # > 0: micro-batches by tokens (as train.*)
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class RewardConfig:
    # model (Bradley-Terry reward model) | verifier (the task's own) | function (yours)
    source: str = "model"
    function: str | None = None  # source=function: 'path/to/file.py:name' or 'pkg.mod:name'
    functions: list[str] = field(default_factory=list)  # several, summed with reward.weights
    weights: list[float] = field(default_factory=list)  # one per function (default: all 1)
    timeout_s: float | None = None  # one call of a function may take at most this long
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
    # > 0: micro-batches of at most this many tokens (prompt + response, padded) instead,
    # rows of similar lengths together; the same gradients (docs/configuration.md)
    micro_batch_tokens_per_device: int = 0
    actor_lr: float = 2e-4
    critic_lr: float = 1e-3
    warmup_steps: int = 2  # optimizer steps of linear warm-up (actor and critic)
    lr_schedule: str = "constant"  # constant | cosine (to min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0
    eval_every_steps: int = 20
    # true: the next step's rollout (generation and inference calls) runs while this step
    # trains, sampling from weights one update older (one step off-policy; the clipped
    # ratio against the sampling policy's log-probs corrects for it). Opt-in.
    overlap_generation: bool = False


@dataclass
class GenerateConfig:
    backend: str = "auto"  # auto (vllm where installed, else hf) | vllm | hf
    max_new_tokens: int = 12
    min_new_tokens: int = 0  # no stop before this many tokens (benchmarks: fixed lengths)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_tokens: list[str] = field(default_factory=list)  # tokens that end a response, like eos
    stop: list[str] = field(default_factory=list)  # strings that end a response (kept in it)
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
    # auto: a call gets the node's cores split among the devices busy while it runs
    # (planner.threads); device: always threads_per_device
    call_threads: str = "auto"
    device_kind: str | None = None  # planner catalogue: cpu | h100-sxm | h200-sxm | a100-sxm-80g
    profile: str | None = None  # a `relay profile` file (default: profiles/<kind>.json if present)
    calls_profile: str | None = None  # a `relay profile --calls` file: this job's call times


@dataclass
class PlanConfig:
    mode: str = "auto"  # auto | per_role | search | symmetric | heuristic | file
    path: str | None = None  # the plan file plan=file reads (JSON or YAML, as `relay plan` writes)
    graph: str | None = None  # graph to plan: null (the algorithm's RL graph) | sft | reward_model
    seed: int = 0  # the search's random seed
    search_time_s: float = 10.0  # the search's time budget
    # the searched plan replaces the best-estimated hand-made plan only when estimated at
    # least this fraction faster (the cost model's error on a run is up to about 0.2)
    min_gain: float = 0.1
    iterations: int = 3  # iterations the simulator unrolls
    # calls of one replica, kind and engine that are ready together run as one batch
    # (ReMax's sampled and greedy generations, then their two reward calls)
    fuse_calls: bool = True
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
    data: DataConfig = field(default_factory=DataConfig)
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


def check_choice(p: list[Problem], path: str, value: Any, options: Any, what: str) -> None:
    """A Problem if `value` is not one of `options` (listed, sorted, in the fix)."""
    if value not in options:
        p.append(Problem(path, value, f"unknown {what}", f"use one of {sorted(options)}"))


def positive(problems: list[Problem], cfg: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            problems.append(Problem(f"{prefix}.{n}", v, "must be > 0", "set a positive value"))


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


def to_yaml(cfg: RelayConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RelayConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
