"""ZeRO-3 under a plan, on real DeviceWorkers (two processes, gloo): an actor trained data
parallel with DeepSpeed ZeRO-3 (each rank holds a partition of every weight) is
reallocated, from its gathered parameters, to a tensor-parallel replica and to a
one-device replica; each holds exactly the planner's slices of the trained weights, and
the trip back from the tensor-parallel replica is bit-identical."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.distributed import report, run_ranks

WORLD = 2


def _worker(rank: int, folder: str, port: int, model: str) -> None:
    from algos.ppo import sft_graph
    from orchestrator.engines.train import OptimSpec
    from orchestrator.workers.device_worker import DeviceWorker
    from orchestrator.workers.groups import plan_groups
    from orchestrator.workers.realloc import shard_state
    from orchestrator.workers.spec import RoleSpec
    from planner.layout import Layout, Mesh

    train = (Mesh(0, 2), Layout(2, 1, 1))
    tp2 = (Mesh(0, 2), Layout(1, 2, 1))
    one = (Mesh(1, 1), Layout(1, 1, 1))
    worker = DeviceWorker(rank, WORLD)
    worker.join(("127.0.0.1", port), plan_groups(WORLD, [train, tp2, one]))
    os.environ["DS_ACCELERATOR"] = "cpu"
    optim = OptimSpec(1e-2, 1, 0.0, 1.0, 3, 8, 4)
    worker.host([RoleSpec("actor", "causal", model, model, "sort", 4, optim=optim)])
    worker.load("actor", train)
    call = sft_graph().call("actor_sft")
    g = torch.Generator().manual_seed(0)
    batch = {"prompt_ids": torch.randint(4, 14, (8, 5), generator=g),
             "prompt_mask": torch.ones(8, 5, dtype=torch.long),
             "response_ids": torch.randint(4, 14, (8, 4), generator=g),
             "response_mask": torch.ones(8, 4, dtype=torch.long)}  # fmt: skip
    problems = []
    rep = worker._replica("actor", train)
    worker.run(call, train, {"seed": 0, "step": 0, "version": 1}, batch)
    partition = [p for p in rep.module.parameters() if p.ds_tensor.numel() < p.ds_numel]
    if not partition:
        problems.append(f"rank {rank}: ZeRO-3 did not partition the weights")
    full = worker.shards("actor", train)  # gathered
    for dst in (tp2, one):
        worker.reallocate("actor", train, dst, 2, 1)
        if rank in dst[0].devices:
            got = worker.shards("actor", dst)
            want = shard_state(full, rep.model.shape, dst, rank)
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            if bad or got.keys() != want.keys():
                problems.append(f"rank {rank}: {dst[1]} holds other values: {bad[:3]}")
    back = (Mesh(0, 1), Layout(1, 1, 1))  # whole weights on device 0, from the tp2 slices
    worker.reallocate("actor", tp2, back, 2, 1)
    if rank == 0:
        again = worker.shards("actor", back)
        if any(not torch.equal(again[k], full[k]) for k in full):
            problems.append("the round trip through tp2 changed the weights")
    report(rank, folder, problems)


def test_zero3_replica_reallocates_its_gathered_weights_exactly(tmp_path: Path) -> None:
    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import build_model_folder, train_tokenizer
    from orchestrator.workers.groups import free_port

    tok = train_tokenizer(make_task("sort", 4).alphabet(), tmp_path / "tok")
    model = build_model_folder("tiny", tok, tmp_path / "model", seed=0, max_position_embeddings=32)
    run_ranks(_worker, tmp_path, free_port(), str(model), world=WORLD)
