"""A train replica's checkpoint under every ZeRO stage: each data-parallel rank saves its
own optimizer state (its ZeRO partition) and scheduler, and a fresh trainer that loads the
weights and that state steps exactly as the one that kept going."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import join_world, report, run_ranks


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _step(engine, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randn(4, 6, generator=g)
    loss = engine.module(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _worker(rank: int, folder: str, stages: list[int]) -> None:
    """Every stage in one pair of processes (a process start and DeepSpeed's import cost
    more than a stage's round trip)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    join_world(rank, folder, world=2)
    own = [dist.new_group([r]) for r in range(2)]
    problems = [p for stage in stages for p in _round_trip(rank, stage, own)]
    report(rank, folder, problems)


def _round_trip(rank: int, stage: int, own: list) -> list[str]:
    from orchestrator.engines.train import OptimSpec, TrainEngine
    from orchestrator.workers.groups import DataParallelGroups

    spec = OptimSpec(lr=0.05, warmup_steps=2, weight_decay=0.01, grad_clip=1.0, zero_stage=stage,
                     mini_batch_samples=8, micro_batch_samples_per_device=4)  # fmt: skip

    def engine(module: torch.nn.Module) -> TrainEngine:
        mpu = DataParallelGroups(dist.group.WORLD, own[rank])
        return TrainEngine(module, spec, mpu=mpu, dp=2)

    a = engine(_model())
    for s in range(3):
        _step(a, rank, s)
    state = a.rank_state()
    weights = a.full_state_dict()
    b = engine(_model())
    b.load_weights(weights)
    b.load_rank_state(state)
    for s in range(3, 6):
        _step(a, rank, s)
        _step(b, rank, s)
    after_a, after_b = a.full_state_dict(), b.full_state_dict()
    problems = [f"ZeRO {stage}, rank {rank}: {k} differs after the reload"
                for k, v in after_a.items() if not torch.equal(v, after_b[k])]  # fmt: skip
    if b.version != a.version + 1:
        problems.append(f"ZeRO {stage}, rank {rank}: version {b.version}, "
                        f"expected {a.version + 1}")  # fmt: skip
    return problems


def test_rank_state_round_trip_under_every_zero_stage(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path, [0, 1, 2, 3], world=2)
