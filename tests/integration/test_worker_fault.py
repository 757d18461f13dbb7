"""A model worker killed mid-run: new workers restore the newest checkpoint and the run
finishes with every step logged once; past run.max_restarts it stops with a message."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.run.tracking import read_metrics
from tests.integration.test_kill_resume import kill_group, relay
from tests.integration.tiny import RL_ONLY, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def rl_steps(run_dir: Path, stage: str = "rl") -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_metrics(path) if r["stage"] == stage]


def kill_a_worker(proc: subprocess.Popen, run_dir: Path, after_step: int, stage: str = "rl") -> int:
    """SIGKILL one model worker (a process titled ray::ModelWorker under the driver)
    once `after_step` steps of `stage` are logged; returns the step count seen then."""
    end = time.monotonic() + 600
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if len([s for s in rl_steps(run_dir, stage) if s > 0]) >= after_step:
            workers = [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "ModelWorker" in " ".join(p.cmdline())
            ]
            if workers:
                victim = random.Random(0).choice(workers)
                os.kill(victim.pid, signal.SIGKILL)
                return after_step
        time.sleep(0.5)
    raise AssertionError("the run never reached the step to kill a worker at")


def run_and_kill_a_worker(tmp_path: Path, name: str, steps: int, *extra: str) -> str:
    """Run `relay train`, SIGKILL a model worker after RL step 3, return the output."""
    proc = relay(tiny_overrides(tmp_path, name, steps, *RL_ONLY, *extra))
    try:
        kill_a_worker(proc, tmp_path / name, after_step=3)
        out, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    assert proc.returncode is not None
    return f"rc={proc.returncode}\n{out}"


def test_dead_worker_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "fault"
    out = run_and_kill_a_worker(tmp_path, "fault", 6)  # checkpoints every 2 steps
    assert out.startswith("rc=0\n"), out
    assert "a model worker died" in out and "restart 1 of 3" in out
    assert "continue from checkpoint" in out  # the step-2 (or later) checkpoint
    steps = rl_steps(run_dir)
    assert sorted(steps) == list(range(0, 7)), steps  # each step once, none lost
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_restarts_are_bounded(tmp_path: Path) -> None:
    run_dir = tmp_path / "bounded"
    out = run_and_kill_a_worker(tmp_path, "bounded", 40, "run.max_restarts=0")
    assert not out.startswith("rc=0\n")
    assert "run.max_restarts = 0" in out and "newest complete checkpoint is" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (
        latest.startswith("step_")
        and json.loads((run_dir / "checkpoints" / latest / "controller.json").read_text())["step"]
        >= 2
    )


def test_dead_sft_worker_restarts_the_stage(tmp_path: Path) -> None:
    """SFT keeps no checkpoints: a dead SFT worker is replaced and the stage starts over;
    its metrics read as one clean pass and the run goes on to RL."""
    run_dir = tmp_path / "sft_fault"
    extra = ("sft.steps=60", "reward=verifier", "generate.backend=hf")
    proc = relay(tiny_overrides(tmp_path, "sft_fault", 1, *extra))
    try:
        kill_a_worker(proc, run_dir, after_step=5, stage="sft")
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "restart 1 of 3: new workers continue from the start of the sft stage" in out
    assert sorted(rl_steps(run_dir, "sft")) == list(range(1, 61))
    assert (run_dir / "models" / "sft" / "DONE").is_file()
    assert [s for s in rl_steps(run_dir) if s > 0] == [1]
