"""`relay train` on CUDA: every role on one GPU (the colocated plan), with vLLM where it is
installed, and a sharded plan over two GPUs (NCCL between device workers) where there are
two. Marked `gpu`: skipped on CPU machines; tests/gpu/run_gpu_checks.sh runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.tiny import RL_ONLY, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def train(tmp_path: Path, name: str, *extra: str) -> Path:
    args = tiny_overrides(tmp_path, name, 3, *RL_ONLY, "cluster.device=cuda", *extra)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return tmp_path / name


def steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["stage"] == "rl" and "loss/policy" in r}


def test_every_role_on_one_gpu(tmp_path: Path) -> None:
    run = train(tmp_path, "one", "cluster.devices_per_node=1")
    rows = steps(run)
    assert sorted(rows) == [1, 2, 3]
    plan = json.loads((run / "plan.json").read_text())
    assert {c["mesh"] for c in plan["calls"].values()} == {"d0"}


def test_data_parallel_over_two_gpus_matches_one(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (NCCL between device workers)")
    same = ("generate.backend=hf", "generate.top_k=1")
    one = steps(train(tmp_path, "one", "cluster.devices_per_node=1", *same))
    two = steps(train(tmp_path, "two", "cluster.devices_per_node=2", "plan=symmetric", *same))
    for step in (1, 2, 3):
        for key in ("loss/policy", "loss/value", "train/grad_norm_actor"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-3), (step, key)
