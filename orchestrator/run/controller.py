"""The controller: a run from its folder to its summary. The stages run in order, each on
the plan's workers (orchestrator.runtime): SFT, then the reward model (when the reward is
a model Relay trains), then RL; a finished stage is skipped on resume, and a stage whose
worker died runs again on new workers (orchestrator.run.faults)."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.config.schema import RelayConfig
from orchestrator.run.assets import build_assets
from orchestrator.run.checkpoint import write_atomic
from orchestrator.run.context import Run, install_stop_handler
from orchestrator.run.faults import with_restarts
from orchestrator.run.folder import RunError, prepare
from orchestrator.run.rl import run_rl
from orchestrator.run.stages import run_reward_model, run_sft
from orchestrator.run.tracking import plot_learning_curves

__all__ = ["Controller", "RunError"]


class Controller:
    def __init__(self, cfg: RelayConfig, plan: Any = None) -> None:
        """plan: the RL graph's execution plan (orchestrator.runtime.planning); None:
        the one plan.mode makes for the config."""
        if plan is None:
            from orchestrator.runtime.planning import plan_for_run

            plan = plan_for_run(cfg)
        self.run_state = Run.of(cfg, plan)

    def run(self) -> dict[str, Any]:
        install_stop_handler()
        run = self.run_state
        run.stopped_early = False
        run.wandb_id = prepare(run.cfg, run.paths.root)["wandb_id"]
        from planner.plan import to_dict as plan_to_dict

        p = run.plan
        write_atomic(run.paths.root / "plan.json",
                     json.dumps(plan_to_dict(p.ctx, p.plan, p.mode, p.estimate), indent=1))  # fmt: skip
        run.assets = build_assets(run.cfg, run.paths, run.trains_reward_model)
        summary: dict[str, Any] = {"run_dir": str(run.paths.root),
                                   "parameters": run.assets.num_params}  # fmt: skip
        if run.cfg.sft.enabled:
            summary["sft"] = with_restarts(run, "sft", lambda _: run_sft(run))
        if run.trains_reward_model and not run.stopped_early:
            summary["reward_model"] = with_restarts(run, "reward_model",
                                                    lambda _: run_reward_model(run))  # fmt: skip
        if not run.stopped_early:
            summary["rl"] = with_restarts(run, "rl", lambda after_fault: run_rl(run, after_fault))
        summary["stopped"] = run.stopped_early
        plot_learning_curves(run.paths.root)
        write_atomic(run.paths.root / "summary.json", json.dumps(summary, indent=1))
        return summary
