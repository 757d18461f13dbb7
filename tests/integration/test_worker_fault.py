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

from orchestrator.run.tracking import read_metrics
from tests.integration.test_kill_resume import kill_group, relay
from tests.integration.tiny import ONE_DEVICE, RL_ONLY, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def rl_steps(run_dir: Path, stage: str = "rl") -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_metrics(path) if r["stage"] == stage]


def kill_a_worker(proc: subprocess.Popen, run_dir: Path, after_step: int, stage: str = "rl") -> int:
    """SIGKILL one device worker of `stage` that hosts a role (workers.json in the run
    folder names each worker's process) once `after_step` steps of `stage` are logged;
    returns the step count seen then."""
    end = time.monotonic() + 600
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if len([s for s in rl_steps(run_dir, stage) if s > 0]) >= after_step:
            doc = json.loads((run_dir / "workers.json").read_text())
            assert doc["stage"] == stage, doc
            hosting = [w for w in doc["workers"] if w["roles"]]
            victim = psutil.Process(random.Random(0).choice(hosting)["pid"])
            assert "DeviceWorker" in " ".join(victim.cmdline()), victim.cmdline()
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            return len([s for s in rl_steps(run_dir, stage) if s > 0])  # logged by then
        time.sleep(0.5)
    raise AssertionError("the run never reached the step to kill a worker at")


def run_and_kill_a_worker(tmp_path: Path, name: str, steps: int, *extra: str) -> str:
    """Run `relay train`, SIGKILL a model worker after RL step 3, return the output."""
    proc = relay(tiny_overrides(tmp_path, name, steps, *RL_ONLY, *extra))
    try:
        logged = kill_a_worker(proc, tmp_path / name, after_step=3)
        out, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    assert proc.returncode is not None
    # a kill after the last step tests nothing (a tiny step takes well under a second)
    assert logged < steps, f"the worker died after step {logged} of {steps}: too late"
    return f"rc={proc.returncode}\n{out}"


@pytest.mark.parametrize("plan", ["per_role", "symmetric"])
def test_dead_worker_is_replaced_and_the_run_finishes(tmp_path: Path, plan: str) -> None:
    """per_role, and a sharded plan (every call data-parallel over two devices: the other
    worker is left inside collectives with the dead one)."""
    run_dir = tmp_path / "fault"
    # per_role with vLLM: the new workers start new engine shards
    backend = "generate.backend=" + ("vllm" if plan == "per_role" else "hf")
    # 12 steps, saved every 2: after the kill at step 3 or so, enough are left for the
    # run to meet the dead worker (steps of the tiny model take well under a second)
    devices = "cluster.devices_per_node=" + ("4" if plan == "per_role" else "2")
    out = run_and_kill_a_worker(tmp_path, "fault", 12, f"plan={plan}", backend, devices)
    assert out.startswith("rc=0\n"), out
    assert "the worker of device" in out and "died during" in out and "restart 1 of 3" in out
    assert "continue from checkpoint" in out  # the step-2 (or later) checkpoint
    steps = rl_steps(run_dir)
    assert sorted(steps) == list(range(0, 13)), steps  # each step once, none lost
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_12"


def test_restarts_are_bounded(tmp_path: Path) -> None:
    run_dir = tmp_path / "bounded"
    out = run_and_kill_a_worker(tmp_path, "bounded", 40, "run.max_restarts=0", ONE_DEVICE)
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
    # the RL step after it on one device: one worker to start, not three
    extra = ("sft.steps=60", "reward=verifier", "generate.backend=hf", ONE_DEVICE)
    proc = relay(tiny_overrides(tmp_path, "sft_fault", 1, *extra))
    try:
        logged = kill_a_worker(proc, run_dir, after_step=3, stage="sft")
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    assert logged < 60, f"the worker died after SFT step {logged} of 60: too late"
    assert proc.returncode == 0, out[-3000:]
    assert "restart 1 of 3: new workers continue from the start of the sft stage" in out
    assert sorted(rl_steps(run_dir, "sft")) == list(range(1, 61))
    assert (run_dir / "models" / "sft" / "DONE").is_file()
    assert [s for s in rl_steps(run_dir) if s > 0] == [1]


def test_a_worker_that_fails_while_built_stops_the_run_with_its_own_error(tmp_path: Path) -> None:
    """A model folder vLLM rejects (its config.json names a quantization vLLM does not
    know; transformers loads it): the run stops at once, with the worker's own exception
    type and message, no restart and no traceback; exit 2."""
    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import build_model_folder, train_tokenizer

    tok = train_tokenizer(make_task("sort", 8).alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "model", seed=0, max_position_embeddings=64)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    proc = relay(tiny_overrides(tmp_path, "bad", 1, *RL_ONLY, f"model.path={folder}",
                                "generate.backend=vllm", ONE_DEVICE))  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    assert proc.returncode == 2, out[-3000:]
    assert "failed building actor's vLLM engine: ValidationError" in out
    assert "Unknown quantization method: gguf" in out
    assert "Traceback" not in out and "restart" not in out


def test_a_worker_killed_for_memory_is_reported_as_such(tmp_path: Path) -> None:
    """Ray's memory monitor set to kill above 2% of the node's memory: the run reports
    which device and roles were killed for memory, the node's memory then and what the
    plan expected there, with a fix; exit 2, no traceback."""
    env = {**os.environ, "RAY_memory_usage_threshold": "0.02",
           "RAY_memory_monitor_refresh_ms": "100"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train",
         *tiny_overrides(tmp_path, "oom", 1, *RL_ONLY, "run.max_restarts=0",
                         "generate.backend=hf", ONE_DEVICE)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=env,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    assert proc.returncode == 2, out[-3000:]
    assert "was killed for memory" in out and "(roles " in out
    assert "the node used" in out and "over Ray's limit of 2%" in out
    assert "the plan expected" in out and "Fix: lower what the run holds" in out
    assert "Traceback" not in out
