"""Every config file composes and validates; every invalid case is one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from orchestrator.config.load import load_config
from orchestrator.config.schema import CONFIG_DIR, ConfigError, RelayConfig

REPO = Path(__file__).resolve().parents[2]
GROUP_FILES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent != CONFIG_DIR)


def test_there_are_group_files() -> None:
    assert {p.parent.name for p in GROUP_FILES} >= {"algo", "model", "task", "cluster", "logger"}


def test_default_config_validates() -> None:
    cfg = load_config([])
    assert isinstance(cfg, RelayConfig)
    assert cfg.algo.name == "ppo" and cfg.model.preset == "tiny" and cfg.task.name == "sort"


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_file_loads(path: Path, tmp_path: Path) -> None:
    extra = []
    if (path.parent.name, path.stem) == ("plan", "file"):  # it needs a plan file to read
        (tmp_path / "plan.json").write_text("{}")
        extra = [f"plan.path={tmp_path / 'plan.json'}"]
    if (path.parent.name, path.stem) == ("reward", "function"):  # it needs a function
        extra = ["reward.function=examples/rewards.py:sorted_digits"]
    cfg = load_config([f"{path.parent.name}={path.stem}", *extra])
    assert isinstance(cfg, RelayConfig)


def test_plan_file_mode_needs_an_existing_file() -> None:
    (msg,) = problems_of(["plan=file"])
    assert "plan.path = None" in msg and "relay plan" in msg
    (msg,) = problems_of(["plan=file", "plan.path=/nonexistent/plan.json"])
    assert "plan.path" in msg
    (msg,) = problems_of(["plan.actor_shape=llama3-8b"])
    assert "plan.actor_shape = 'llama3-8b'" in msg and "llama2-7b" in msg


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    return [str(p) for p in err.value.problems]


def test_batch_that_does_not_divide() -> None:
    (msg,) = problems_of(["train.rollout_batch_prompts=48", "train.mini_batch_samples=32"])
    assert "train.mini_batch_samples = 32" in msg
    assert "must divide the rollout batch" in msg and "48 samples" in msg and "Fix:" in msg


def test_micro_batch_that_does_not_divide() -> None:
    (msg,) = problems_of(["train.micro_batch_samples_per_device=5"])
    assert "train.micro_batch_samples_per_device = 5" in msg and "Fix:" in msg


def test_overlapped_generation_needs_the_ratio_loss() -> None:
    (msg,) = problems_of(["algo=remax", "train.overlap_generation=true"])
    assert "train.overlap_generation = True" in msg and "reinforce" in msg.lower()
    assert "algo=grpo" in msg and "Fix:" in msg
    assert load_config(["algo=grpo", "train.overlap_generation=true"]).train.overlap_generation


def test_unknown_algorithm() -> None:
    (msg,) = problems_of(["algo.name=ppx"])
    assert "algo.name = 'ppx'" in msg and "unknown algorithm" in msg and "ppo" in msg


def test_unknown_group_option() -> None:
    (msg,) = problems_of(["algo=ppx"])
    assert "algo = 'ppx'" in msg and "'ppo'" in msg


def test_fewer_devices_than_roles_is_a_valid_config() -> None:
    """Roles share devices (plan=auto colocates them): a config with one device is valid;
    only plan=per_role needs a device per role (tests/unit/test_plan_cli.py)."""
    assert load_config(["cluster.devices_per_node=1"]).cluster.devices_per_node == 1


def test_multi_node_without_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (msg,) = problems_of(["cluster.num_nodes=2"])
    assert "cluster.num_nodes = 2" in msg and "RAY_ADDRESS" in msg


def test_missing_model_folder(tmp_path: Path) -> None:
    (msg,) = problems_of([f"model.path={tmp_path / 'nope'}"])
    assert "model.path" in msg and "config.json" in msg and "Fix:" in msg


def test_misspelled_key_suggests_the_right_one() -> None:
    (msg,) = problems_of(["train.setps=3"])
    assert "train.setps" in msg and "unknown key" in msg and "did you mean 'train.steps'" in msg


def test_every_problem_is_listed_once() -> None:
    msgs = problems_of(
        ["algo.name=nope", "train.setps=3", "train.mini_batch_samples=7", "algo.gamma=2"]
    )
    joined = "\n".join(msgs)
    for field in ("algo.name", "train.setps", "train.mini_batch_samples", "algo.gamma"):
        assert field in joined
    assert "train.micro_batch_samples_per_device" in joined  # 32 does not divide 7 either
    assert len(msgs) == 5


def test_cli_exits_non_zero_with_one_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["train", "algo.name=nope", f"run.output_dir={tmp_path}", "train.setps=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid configuration (2 problems)" in err
    assert "algo.name" in err and "train.setps" in err
    assert not any(tmp_path.iterdir()), "a rejected config must not touch the run folder"


def test_cli_help_lists_commands_and_config() -> None:
    relay = Path(sys.executable).parent / "relay"
    cmd = [str(relay)] if relay.exists() else [sys.executable, "-m", "launch.cli"]
    top = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=REPO)
    assert top.returncode == 0 and "train" in top.stdout and "config" in top.stdout
    train = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, cwd=REPO)
    assert train.returncode == 0
    assert "Config groups" in train.stdout and "rollout_batch_prompts" in train.stdout
    bad = subprocess.run([*cmd, "trian"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_wrong_types_are_named_one_by_one() -> None:
    msgs = problems_of(["train.steps=many", "algo.gamma=x", "sft.enabled=maybe"])
    assert len(msgs) == 3
    assert any(m.startswith("train.steps = 'many': must be int") for m in msgs)
    assert any(m.startswith("algo.gamma = 'x': must be float") for m in msgs)
    assert any(m.startswith("sft.enabled = 'maybe': must be bool") for m in msgs)


def test_optional_fields_take_null() -> None:
    cfg = load_config(["algo.dual_clip_c=null", "model.path=null"])
    assert cfg.algo.dual_clip_c is None and cfg.model.path is None


@pytest.mark.parametrize(
    "override,field",
    [
        ("task.num_digits=0", "task.num_digits"),
        ("task.num_demos=0", "task.num_demos"),
        ("task.num_eval_prompts=60", "task.num_eval_prompts"),  # with task.num_digits=2
        ("sft.steps=0", "sft.steps"),
        ("logger.plot_every_steps=0", "logger.plot_every_steps"),
        ("algo.dual_clip_c=1.0", "algo.dual_clip_c"),
        ("algo.reward_clip=0", "algo.reward_clip"),
        ("algo.clip_eps_low=1.5", "algo.clip_eps_low"),
        ("algo.value_clip_eps=-0.1", "algo.value_clip_eps"),
        ("algo.kl_coef=-1", "algo.kl_coef"),
        ("generate.temperature=0", "generate.temperature"),
        ("generate.top_p=0", "generate.top_p"),
        ("generate.top_k=-1", "generate.top_k"),
        ("generate.max_new_tokens=4", "generate.max_new_tokens"),
        ("model.max_position_embeddings=16", "model.max_position_embeddings"),
    ],
)
def test_range_rules(override: str, field: str) -> None:
    extra = ["task.num_digits=2", "task.num_eval_prompts=60"] if "eval" in override else []
    msgs = problems_of([override, *extra] if not extra else extra)
    assert any(m.startswith(f"{field} = ") and "Fix:" in m for m in msgs), msgs


def test_adaptive_controller_settings() -> None:
    msgs = problems_of(
        ["algo=ppo_adaptive_kl", "algo.kl_target_per_token=0", "algo.kl_horizon_samples=0"]
    )
    assert {m.split(" = ")[0] for m in msgs} == {
        "algo.kl_target_per_token",
        "algo.kl_horizon_samples",
    }


def test_floats_in_exponent_notation_are_floats() -> None:
    cfg = load_config(["train.actor_lr=3e-4", "algo.kl_coef=1E-2"])
    assert cfg.train.actor_lr == 3e-4 and cfg.algo.kl_coef == 0.01


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["algo.advantage_estimator=remax"], "algo.advantage_estimator"),
        (["algo=remax", "algo.advantage_estimator=gae"], "algo.advantage_estimator"),
        (["policy=pmoe", "generate.temperature=0.7"], "generate.temperature/top_p/top_k"),
        (["policy.num_experts=3"], "policy.num_experts"),
        (["reweight.strategy=hardest"], "reweight.strategy"),
        (["reweight.temperature=0"], "reweight.temperature"),
        (["reweight.policy_proxy=loss"], "reweight.policy_proxy"),
        (
            ["reweight.policy_proxy=nll", "algo.loss_agg=seq-mean-token-sum"],
            "reweight.policy_proxy",
        ),
        (["reward.label_noise=0.5"], "reward.label_noise"),
        (
            ["reward.batch_pairs=10", "reward.micro_batch_pairs_per_device=4"],
            "reward.micro_batch_pairs_per_device",
        ),
        (["algo.policy_loss=a2c"], "algo.policy_loss"),
        (["reward.path=/no/such/folder"], "reward.path"),
        (["reward=verifier", "reward.path=/tmp"], "reward.path"),
        (["generate.backend=sglang"], "generate.backend"),
        (["policy=pmoe", "generate.backend=vllm"], "generate.backend"),
        (["generate.vllm_gpu_memory_utilization=1.5"], "generate.vllm_gpu_memory_utilization"),
        (["generate.vllm_dtype=int8"], "generate.vllm_dtype"),
        (["generate.stop_tokens=['']"], "generate.stop_tokens"),
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["train.min_lr_ratio=2"], "train.min_lr_ratio"),
    ],
)
def test_pipeline_rules(overrides: list[str], field: str) -> None:
    msgs = problems_of(overrides)
    assert any(m.startswith(f"{field} = ") for m in msgs), msgs


def test_algorithms_and_pipeline_options_compose() -> None:
    remax = load_config(["algo=remax"])
    assert remax.algo.policy_loss == "reinforce" and remax.algo.reward_clip == 5.0
    pmoe = load_config(["policy=pmoe"])
    assert pmoe.policy.kind == "pmoe" and pmoe.policy.num_experts == 5
    assert load_config(["reward=verifier"]).reward.source == "verifier"
    bandit = load_config(["task=bandit", "algo=grpo"])
    assert bandit.algo.kl_in_loss is False and bandit.algo.kl_coef == 0.5
    assert bandit.reward.source == "verifier" and not bandit.sft.enabled


def test_auto_backend_is_vllm_where_installed_and_hf_for_pmoe() -> None:
    from orchestrator.config.schema import generation_backend
    from orchestrator.engines.vllm_engine import vllm_available

    assert generation_backend(load_config([])) == ("vllm" if vllm_available() else "hf")
    assert generation_backend(load_config(["policy=pmoe"])) == "hf"
    assert generation_backend(load_config(["generate.backend=hf"])) == "hf"


def test_stop_tokens_must_be_single_tokens(tmp_path: Path) -> None:
    from orchestrator.config.schema import ConfigError
    from orchestrator.models.hf import train_tokenizer
    from orchestrator.run.assets import stop_token_ids

    tok = train_tokenizer("0123456789S=", tmp_path)
    assert stop_token_ids(tok, ["=", "S"]) == (tok.convert_tokens_to_ids("="),
                                               tok.convert_tokens_to_ids("S"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"generate.stop_tokens.*\['12', 'x'\]"):
        stop_token_ids(tok, ["=", "12", "x"])


def test_a_digit_count_a_task_cannot_take_is_a_config_error() -> None:
    """`task=bandit task.num_digits=12` (the bandit has ten arms): the usual field / value
    / rule / fix message and exit 2, not a traceback from inside validation."""
    msgs = problems_of(["task=bandit", "task.num_digits=12"])
    assert any(
        m.startswith("task.num_digits = 12: the 'bandit' task takes at most 10") for m in msgs
    )
    relay = Path(sys.executable).parent / "relay"
    cmd = [str(relay)] if relay.exists() else [sys.executable, "-m", "launch.cli"]
    out = subprocess.run(
        [*cmd, "train", "task=bandit", "task.num_digits=12"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "task.num_digits = 12" in out.stderr and "Traceback" not in out.stderr + out.stdout
