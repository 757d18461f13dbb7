"""A model worker killed mid-run: new workers restore the newest checkpoint and the run
finishes with every step logged once; past run.max_restarts it stops with a message."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.tracking import read_metrics
from tests.integration.tiny import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def rl_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_metrics(path) if r["stage"] == "rl"]


def kill_a_worker(proc: subprocess.Popen, run_dir: Path, after_step: int) -> int:
    """SIGKILL one RL model worker (a process titled ray::ModelWorker under the driver)
    once `after_step` RL steps are logged; returns the step count seen then."""
    end = time.monotonic() + 600
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if len([s for s in rl_steps(run_dir) if s > 0]) >= after_step:
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


def test_dead_worker_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "fault"
    proc = start(tiny_overrides(tmp_path, "fault", 6))  # checkpoints every 2 steps
    try:
        kill_a_worker(proc, run_dir, after_step=3)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "a model worker died" in out and "restart 1 of 3" in out
    assert "continue from checkpoint" in out  # the step-2 (or later) checkpoint
    steps = rl_steps(run_dir)
    assert sorted(steps) == list(range(0, 7)), steps  # each step once, none lost
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_restarts_are_bounded(tmp_path: Path) -> None:
    run_dir = tmp_path / "bounded"
    proc = start(tiny_overrides(tmp_path, "bounded", 40, "run.max_restarts=0"))
    try:
        kill_a_worker(proc, run_dir, after_step=3)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "run.max_restarts = 0" in out and "newest complete checkpoint is" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (
        latest.startswith("step_")
        and json.loads((run_dir / "checkpoints" / latest / "controller.json").read_text())["step"]
        >= 2
    )
