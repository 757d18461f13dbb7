"""The real pipeline on a local Ray cluster: SFT -> PPO with DeepSpeed workers, metrics,
plots, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config.load import load_config
from orchestrator.run.controller import Controller, RunError
from orchestrator.run.tracking import read_metrics
from tests.integration.tiny import ONE_DEVICE, RL_ONLY, tiny_overrides
from tests.unit.test_docs import undocumented

pytestmark = pytest.mark.integration


def run(overrides: list[str]) -> dict:
    """As `relay train` runs: under the plan of plan.mode (the default per_role)."""
    from orchestrator.runtime.planning import plan_for_run

    cfg = load_config(overrides)
    return Controller(cfg, plan_for_run(cfg)).run()


def weights(ckpt: Path, role: str) -> dict[str, torch.Tensor]:
    return load_file(ckpt / role / "model.safetensors")


def rl_rows(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["stage"] == "rl":
            assert r["step"] not in rows, f"step {r['step']} logged twice"
            rows[r["step"]] = {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}
    return rows


def test_ppo_pipeline_runs_and_writes_everything(ray_cluster, tmp_path: Path) -> None:
    summary = run(tiny_overrides(tmp_path, "e2e", 2, "logger.wandb_mode=offline",
                                 "generate.backend=auto"))  # fmt: skip
    run_dir = Path(summary["run_dir"])
    rows = rl_rows(run_dir)
    assert sorted(rows) == [0, 1, 2]
    for key in (
        "rollout/reward_mean",
        "rollout/task_accuracy",
        "loss/policy",
        "loss/value",
        "train/clip_frac",
        "train/explained_variance",
        "rollout/kl_to_ref_token_mean",
    ):
        assert key in rows[2], key
    logged = read_metrics(run_dir / "metrics.jsonl")
    assert "time/actor_gen_s" in logged[-1]
    # the default job samples with vLLM (where it is installed) from the trainer's weights
    from orchestrator.engines.vllm_engine import vllm_available

    if vllm_available():
        assert rows[2]["rollout/logprob_diff"] < 1e-4
        assert rows[2]["rollout/logprob_diff_max"] < 1e-3
        step2 = [r for r in logged if r["stage"] == "rl" and r["step"] == 2]
        assert step2[0]["time/weight_sync"] > 0
    keys = {k for row in logged for k in row} - {"stage", "step"}
    assert undocumented(keys) == [], "metrics missing from docs/metrics.md"
    assert (run_dir / "learning_curves.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    ckpt = run_dir / "checkpoints" / "step_2"
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    actor = AutoModelForCausalLM.from_pretrained(ckpt / "actor")
    critic = AutoModelForTokenClassification.from_pretrained(ckpt / "critic")
    assert actor.config.num_hidden_layers == 2 and critic.config.num_labels == 1
    state = json.loads((ckpt / "controller.json").read_text())
    assert state["step"] == 2 and state["data_position_prompts"] == 32
    # the run's execution plan: in the run folder, the checkpoint, and next to step time
    plan = json.loads((run_dir / "plan.json").read_text())
    layouts = {
        c: {k: v for k, v in d.items() if k != "estimated_s"} for c, d in plan["calls"].items()
    }
    assert plan["mode"] == "per_role" and state["plan"] == layouts
    assert rows[2]["plan/est_step_s"] == pytest.approx(
        plan["estimate"]["time_per_iteration_s"], abs=1e-6
    )
    marker = json.loads((run_dir / "relay_run.json").read_text())
    assert state["wandb_id"] == marker["wandb_id"]
    assert any(p.name.endswith(marker["wandb_id"]) for p in (run_dir / "wandb").iterdir())
    # the actor trained: its weights differ from the SFT weights it started from
    sft = load_file(run_dir / "models" / "sft" / "model.safetensors")
    trained = weights(ckpt, "actor")
    assert any(not torch.equal(sft[k], trained[k]) for k in sft)
    # the default pipeline: SFT -> reward model -> RL scored by the reward model
    rm = json.loads((run_dir / "models" / "reward" / "DONE").read_text())
    assert 0.0 <= rm["eval/reward_model_accuracy"] <= 1.0
    stages = [r["stage"] for r in logged]
    assert stages.index("sft") < stages.index("reward_model") < stages.index("rl")
    assert "rollout/verifier_reward_mean" in rows[2]
    # another algorithm from the same SFT and reward models: no SFT or reward stage (on
    # one device: one worker to start)
    again = run(
        tiny_overrides(tmp_path, "reuse", 1, "algo=remax", f"model.path={run_dir}/models/sft",
                       "sft.enabled=false", f"reward.path={run_dir}/models/reward",
                       ONE_DEVICE)
    )  # fmt: skip
    reused = read_metrics(Path(again["run_dir"]) / "metrics.jsonl")
    assert {r["stage"] for r in reused} == {"rl"}
    assert not (Path(again["run_dir"]) / "models").exists()


def test_resume_continues_and_a_finished_run_is_left_as_it_is(
    ray_cluster, tmp_path: Path, capsys
) -> None:
    """2 steps, then resume=auto for 1 more: every step logged once. (That a resume ends
    with the weights and metrics of an uninterrupted run is checked after a SIGKILL in
    test_kill_resume.py and under sharded plans in test_planned_run.py.) A finished run:
    the same command does nothing; another config is refused."""
    run(tiny_overrides(tmp_path, "split", 2, *RL_ONLY))
    resumed = Path(
        run(tiny_overrides(tmp_path, "split", 3, "run.resume=auto", *RL_ONLY))["run_dir"]
    )
    assert sorted(rl_rows(resumed)) == [0, 1, 2, 3]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_3"
    workers = resumed / "workers.json"
    workers.unlink()  # a worker start would write it again
    again = run(tiny_overrides(tmp_path, "split", 3, "run.resume=auto", *RL_ONLY))
    assert "already finished at step 3" in capsys.readouterr().out
    assert not workers.exists(), "a finished run started workers it had no use for"
    assert "rollout/reward_mean" in again["rl"]
    with pytest.raises(RunError, match="different config"):
        run(tiny_overrides(tmp_path, "split", 3, *RL_ONLY, "algo.kl_coef=0.5"))


def test_foreign_folder_is_left_alone(ray_cluster, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a Relay run folder"):
        run(tiny_overrides(tmp_path, "foreign", 2))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_critic_free_algorithm_runs_under_a_sharded_plan(ray_cluster, tmp_path: Path) -> None:
    """GRPO (RLOO shares its graph; the bandit test runs both) on device workers under the
    symmetric plan: groups of samples split over data-parallel ranks."""
    summary = run(
        tiny_overrides(
            tmp_path,
            "grpo",
            2,
            *RL_ONLY,  # the RL stage under test: no SFT stage before it
            "algo=grpo",
            "plan=symmetric",
            "generate.backend=hf",
            "train.rollout_batch_prompts=4",
            "train.mini_batch_samples=8",
            "train.micro_batch_samples_per_device=4",
        )  # fmt: skip
    )
    run_dir = Path(summary["run_dir"])
    rows = rl_rows(run_dir)
    assert "train/kl_loss" in rows[2] and "loss/value" not in rows[2]
    assert not (run_dir / "checkpoints" / "step_2" / "critic").exists()
    assert (run_dir / "checkpoints" / "step_2" / "actor" / "model.safetensors").is_file()


def test_remax_with_a_pmoe_policy_runs(ray_cluster, tmp_path: Path) -> None:
    summary = run(
        tiny_overrides(tmp_path, "remax-pmoe", 2, "algo=remax", "policy=pmoe",
                       "policy.num_experts=3", "reward=verifier")
    )  # fmt: skip
    run_dir = Path(summary["run_dir"])
    rows = rl_rows(run_dir)
    for key in ("rollout/greedy_reward_mean", "train/router_loss", "train/q_loss",
                "train/return_mean", "loss/policy"):  # fmt: skip
        assert key in rows[2], key
    assert "loss/value" not in rows[2] and "train/clip_frac" not in rows[2]
    keys = {k for row in read_metrics(run_dir / "metrics.jsonl") for k in row} - {"stage", "step"}
    assert undocumented(keys) == [], "metrics missing from docs/metrics.md"
    actor = run_dir / "checkpoints" / "step_2" / "actor"
    assert (actor / "pmoe.safetensors").is_file() and (actor / "model.safetensors").is_file()
    assert not (run_dir / "checkpoints" / "step_2" / "critic").exists()
    assert not (run_dir / "models" / "reward").exists()
