"""A user's prompts (data.train_files, with a model folder of their own) and reward
function through `relay train`: the RL stage samples only the file's prompts; a reward
that raises stops the run with a checkpoint and a non-zero exit (reward.on_error=stop);
rerun with reward.on_error=skip, the run resumes from that checkpoint mid-epoch, reads the
rows an uninterrupted run reads, and a step whose rewards are NaN is reported and
skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.data.text import take
from orchestrator.run.tracking import read_metrics
from tests.integration.tiny import ONE_DEVICE, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

# Called once per sample; one RL step scores 16 samples, so calls 17-32 are step 2.
REWARD = """
import math
from pathlib import Path

HERE = Path(__file__).parent
calls = 0


def score(prompt, response):
    global calls
    calls += 1
    with open(HERE / "seen.txt", "a") as f:
        f.write(prompt + "\\n")
    if (HERE / "raise").exists() and calls > 16:
        raise ValueError("the scorer is down")
    if (HERE / "nan").exists() and 16 < calls <= 32:
        return math.nan
    return len(response) / 10
"""


def setup(tmp_path: Path, flag: str) -> tuple[list[str], list[str]]:
    """The reward file (with its flag file), a JSONL file of 20 text prompts, a Qwen2-like
    model folder (no bos), and the overrides of a 3-step RL run with neither SFT nor a
    reward model. 16 prompts a step: step 2 reads the last 4 rows of epoch 0 and 12 of
    epoch 1."""
    from tests.qwen_like import qwen_folder

    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / flag).write_text("")
    prompts = [f"What is {i} plus {i + 1}?" for i in range(20)]
    lines = [json.dumps({"prompt": p}) for p in prompts]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    overrides = tiny_overrides(
        tmp_path,
        "user",
        3,
        f"model.path={qwen_folder(tmp_path / 'model')}",
        "sft.enabled=false",
        "reward=function",
        f"reward.function={tmp_path / 'reward.py'}:score",
        f"data.train_files=[{tmp_path / 'prompts.jsonl'}]",
        "generate.backend=hf",
        "generate.max_new_tokens=8",
        "run.save_every_steps=100",  # no checkpoint before the error: the stop writes one
        # every role on one device: one worker to start, not three (placement is tested
        # elsewhere; the reward function's errors and the data position are tested here)
        ONE_DEVICE,
    )
    return overrides, prompts


def relay_train(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def rl_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]


def test_raising_reward_stops_then_a_nan_reward_is_skipped_on_resume(tmp_path: Path) -> None:
    overrides, prompts = setup(tmp_path, "raise")
    run_dir = tmp_path / "user"
    stopped = relay_train(overrides)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, out[-3000:]
    assert "step 2: reward.function" in out and "raised ValueError: the scorer is down" in out
    assert "reward.on_error = 'stop'" in out and "(step 1)" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert [r["step"] for r in rl_rows(run_dir)] == [0, 1]

    # The user fixes the scorer, which now returns NaN for its second batch (step 3 of the
    # resumed run), and reruns with reward.on_error=skip (a change a resume may make).
    (tmp_path / "raise").unlink()
    (tmp_path / "nan").write_text("")
    done = relay_train([*overrides, "reward.on_error=skip"])
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "step 3 skipped, no update (reward.on_error=skip)" in out
    assert "reward.function" in out and "returned nan for 16 of 16 samples" in out
    rows = {r["step"]: r for r in rl_rows(run_dir) if r["step"] > 0}
    assert sorted(rows) == [1, 2, 3]
    assert [rows[s]["rollout/skipped_steps"] for s in (1, 2, 3)] == [0, 0, 1]
    assert "rollout/reward_mean" in rows[2] and "rollout/reward_mean" not in rows[3]
    assert "loss/policy" in rows[2] and "loss/policy" not in rows[3]  # no update when skipped
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"
    state = json.loads((run_dir / "checkpoints" / "step_3" / "controller.json").read_text())
    assert state["skipped_steps"] == 1
    # the rows of an uninterrupted run (`take`: a fresh permutation per epoch, from the
    # seed), step by step; the failed step 2 scored its first sample before raising
    seen = (tmp_path / "seen.txt").read_text().splitlines()
    steps = [[prompts[i] for i in take(list(range(20)), 16, step, 1)] for step in range(3)]
    assert seen == [*steps[0], steps[1][0], *steps[1], *steps[2]]
    assert sorted(steps[0] + steps[1][:4]) == sorted(prompts)  # epoch 0: each row once
