"""What every stage of a run shares: its config and plan, folder, checkpoints, assets,
wandb id, the stop flag SIGTERM raises, and the count of replaced workers."""

from __future__ import annotations

import signal
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import RelayConfig, to_dict
from orchestrator.run.checkpoint import CheckpointManager
from orchestrator.run.folder import RunPaths
from orchestrator.run.tracking import Tracker

STOP = threading.Event()
"""Set by SIGTERM: the run finishes the step in flight, checkpoints, and returns."""


def install_stop_handler() -> None:
    """Route SIGTERM to STOP (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())


def call_seed(seed: int, step: int, name: str) -> int:
    """A seed per (run seed, step, call): sampling and shuffling replay exactly on resume."""
    return (seed * 1_000_003 + step * 7_919 + zlib.crc32(name.encode())) % (2**31 - 1)


@dataclass
class Run:
    cfg: RelayConfig
    plan: Any  # orchestrator.runtime.planning.PlanResult: the RL graph's plan
    paths: RunPaths
    ckpt: CheckpointManager
    wandb_id: str = ""
    assets: Any = None  # orchestrator.run.assets.Assets, once built
    restarts: int = 0  # workers replaced so far (run.max_restarts bounds them)
    saved_step: int | None = None  # the RL checkpoint this process wrote or loaded
    stopped_early: bool = False

    @classmethod
    def of(cls, cfg: RelayConfig, plan: Any) -> Run:
        paths = RunPaths(Path(cfg.run.output_dir) / cfg.run.name)
        return cls(cfg, plan, paths, CheckpointManager(paths.root, cfg.run.keep_checkpoints))

    @property
    def stop_requested(self) -> bool:
        return STOP.is_set()

    @property
    def uses_reward_model(self) -> bool:
        return self.cfg.reward.source == "model"

    @property
    def trains_reward_model(self) -> bool:
        return self.uses_reward_model and self.cfg.reward.path is None

    @property
    def policy_init(self) -> Path:
        """The folder the actor, reference and critic start from."""
        return self.paths.sft_model if self.cfg.sft.enabled else self.assets.base

    def tracker(self, stage: str, total: int, start: int) -> Tracker:
        lg = self.cfg.logger
        return Tracker(self.paths.root, stage, total, start, lg.wandb_mode, lg.wandb_project,
                       self.wandb_id, self.cfg.run.name, to_dict(self.cfg), lg.progress)  # fmt: skip
