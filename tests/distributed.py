"""Running a test body in several processes joined by torch.distributed (gloo): each rank
writes what it found wrong to a file of its own, and the test fails listing them all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(worker: Callable[..., None], tmp_path: Path, *args: Any, world: int = 4) -> None:
    """mp.spawn `worker(rank, folder, *args)` on `world` processes; fail with every
    rank's problems (see `report`)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path), *args), nprocs=world, join=True)
    reports = [p.read_text() for p in sorted(tmp_path.glob("rank*.problems"))]
    assert not reports, "\n".join(reports)


def join_world(rank: int, folder: str, world: int = 4) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)  # fmt: skip


def report(rank: int, folder: str, problems: list[str]) -> None:
    """Leave the world together, then write this rank's problems, if any."""
    dist.barrier()
    dist.destroy_process_group()
    if problems:
        Path(folder, f"rank{rank}.problems").write_text("\n".join(problems))
