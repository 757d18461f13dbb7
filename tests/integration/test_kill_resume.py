"""SIGKILL of the driver at a random moment: resume loses at most the steps since the
last checkpoint, never loads an incomplete checkpoint, and continues a user's data
mid-epoch as if never stopped. Both tests run a sharded plan
(`plan=symmetric` on two devices: every call data-parallel over both device workers), so
the kill and the stop reach device workers that each hold a slice of every role's batch
(two, not the local cluster's four: the same sharding for half the workers' start)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.run.checkpoint import CheckpointManager
from tests.integration.tiny import RL_ONLY, tiny_overrides

SHARDED = ("plan=symmetric", "cluster.devices_per_node=2")
STEPS = 6  # RL steps of the killed run and of the one never killed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the driver's process group (Ray's helper processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def relay(args: list[str], log: Any = subprocess.PIPE) -> subprocess.Popen:
    """`relay train` in its own process group; its output to a pipe or the file `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def your_data(tmp_path: Path) -> list[str]:
    """A user's run: a Qwen2-like model folder (no bos), 20 prompts in a JSONL file (16
    a step: step 2 crosses into the second epoch) and a reward function of their own."""
    from tests.qwen_like import qwen_folder

    rows = [json.dumps({"prompt": f"What is {i} plus {i + 1}?"}) for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "reward.py").write_text("def score(prompt, response):\n"
                                        "    return len(response) / 10\n")  # fmt: skip
    return [f"model.path={qwen_folder(tmp_path / 'model')}",
            f"data.train_files=[{tmp_path / 'rows.jsonl'}]", "sft.enabled=false",
            "reward=function", f"reward.function={tmp_path / 'reward.py'}:score",
            "generate.max_new_tokens=8"]  # fmt: skip


def rl_metrics(run_dir: Path) -> list[tuple[float, ...]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["rollout/reward_mean"], r["loss/policy"], r["loss/value"])
            for r in rows if r["stage"] == "rl" and "loss/policy" in r]  # fmt: skip


def test_sigkill_driver_then_resume(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """On a user's model, data and reward: the resumed run continues mid-epoch and ends
    with the per-step metrics and the weights of a run never killed."""
    yours = your_data(tmp_path)
    overrides = tiny_overrides(tmp_path, "killed", STEPS, "run.save_every_steps=1",
                               "logger.wandb_mode=offline", *SHARDED, *yours)  # fmt: skip
    run_dir = tmp_path / "killed"
    ckpts = CheckpointManager(run_dir, keep=2)
    # the same run, never killed, alongside (its final weights are the reference)
    straight_log = tmp_path / "straight.log"
    with straight_log.open("w") as log:
        straight = relay(
            tiny_overrides(tmp_path, "straight", STEPS, "run.save_every_steps=1",
                           "logger.wandb_mode=offline", *SHARDED, *yours), log)  # fmt: skip
    request.addfinalizer(lambda: kill_group(straight))
    proc = relay(overrides)
    try:
        deadline = time.time() + 240
        while not ckpts.complete() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpts.complete(), "no checkpoint was written before the deadline"
        time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))  # a random moment
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    # every checkpoint that resume could pick verifies completely
    complete = ckpts.complete()
    assert complete
    for _, folder in complete:
        assert CheckpointManager.verify(folder) == []
    killed_at = complete[-1][0]
    assert killed_at < STEPS, "the run finished before it was killed; nothing was tested"

    done = relay(overrides)
    try:
        out, _ = done.communicate(timeout=400)
    finally:
        kill_group(done)
    assert done.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["stage"] == "rl" and "rollout/reward_mean" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    # the resumed process logged into the same wandb run (one offline folder per start)
    wandb_id = json.loads((run_dir / "relay_run.json").read_text())["wandb_id"]
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and all(r.endswith(wandb_id) for r in runs), runs
    # and the per-step metrics and final weights are those of a run that was never killed
    assert straight.wait(timeout=400) == 0, straight_log.read_text()[-3000:]
    assert rl_metrics(run_dir) == rl_metrics(tmp_path / "straight")
    for role in ("actor", "critic"):
        a = load_file(run_dir / "checkpoints" / f"step_{STEPS}" / role / "model.safetensors")
        b = load_file(tmp_path / "straight" / "checkpoints" / f"step_{STEPS}" / role
                      / "model.safetensors")  # fmt: skip
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role} {k} differs from the uninterrupted run's"


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_0(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path, "stopped", 30, "run.save_every_steps=100", *SHARDED, *RL_ONLY
    )
    run_dir = tmp_path / "stopped"
    proc = relay(overrides)
    try:
        deadline = time.time() + 240
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and '"stage": "rl", "step": 2' in metrics.read_text():
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and "stopped on request" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if '"rl"' in line and "rollout/reward_mean" in line]  # fmt: skip
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps[-1]}" and 2 <= steps[-1] < 30
