"""Tensor-parallel forward passes over 4 gloo processes: for dp x tp = 4 x 1, 2 x 2 and
1 x 4 the sharded model's logits equal the single-device logits within 1e-5 (fp32), each
rank holds exactly the slices the planner's rules give it, and weights reallocated from
another layout (a pipeline one) load into the sharded model and give that model's
logits."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.distributed import join_world, report, run_ranks

WORLD = 4
# 4 heads split over up to 4 ranks; vocab 37 splits unevenly (10, 10, 10, 7 rows)
CFG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=192, vocab_size=37)  # fmt: skip
TOLERANCE = 1e-5


def model_and_logits(seed: int, ids: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **CFG)).eval()
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def _worker(rank: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from orchestrator.models.tensor_parallel import load_shards, local_shards, parallelize
    from orchestrator.workers.realloc import reallocate, shard_state
    from planner.catalogue import shape_from_hf_config
    from planner.layout import Layout, Mesh

    join_world(rank, folder, WORLD)
    shape = shape_from_hf_config("test", CFG)
    ids = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(1))
    problems = []
    for dp, tp in ((4, 1), (2, 2), (1, 4)):
        layout = (Mesh(0, WORLD), Layout(dp, tp, 1))
        model, ref = model_and_logits(0, ids)
        full = {k: v.clone() for k, v in model.state_dict().items()}
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        if tp > 1:
            parallelize(model, mesh["tp"])
        with torch.no_grad():
            err = (model(input_ids=ids).logits - ref).abs().max().item()
        if err > TOLERANCE:
            problems.append(f"dp{dp} tp{tp}: logits differ by {err:.2e}")
        want = shard_state(full, shape, layout, rank)
        got = local_shards(model)
        if any(not torch.equal(got[k], want[k]) for k in want) or got.keys() != want.keys():
            problems.append(f"dp{dp} tp{tp}: rank {rank} holds other slices than the planner's")
        # another model's weights, held under a 4-stage pipeline layout, reallocated into it
        other, other_ref = model_and_logits(7, ids)
        src = (Mesh(0, WORLD), Layout(1, 1, 4))
        mine = shard_state(other.state_dict(), shape, src, rank)
        load_shards(model, reallocate(mine, shape, src, layout, rank, devices_per_node=4))
        with torch.no_grad():
            err = (model(input_ids=ids).logits - other_ref).abs().max().item()
        if err > TOLERANCE:
            problems.append(f"dp{dp} tp{tp}: after reallocation logits differ by {err:.2e}")
    report(rank, folder, problems)


def test_sharded_forward_matches_one_device(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path, world=WORLD)


def test_load_shards_names_a_wrong_shape() -> None:
    import pytest

    from orchestrator.models.tensor_parallel import load_shards

    model, _ = model_and_logits(0, torch.zeros(1, 1, dtype=torch.long))
    shards = {k: v.clone() for k, v in model.state_dict().items()}
    shards["lm_head.weight"] = shards["lm_head.weight"][:10]
    with pytest.raises(ValueError, match=r"lm_head.weight: the shard has shape \(10, 128\)"):
        load_shards(model, shards)
    del shards["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_shards(model, shards)


def _train_worker(rank: int, failures: str, port: int, folder: str) -> None:
    from orchestrator.workers.device_worker import DeviceWorker
    from orchestrator.workers.groups import plan_groups
    from orchestrator.workers.realloc import shard_state
    from orchestrator.workers.spec import RoleSpec
    from planner.catalogue import shape_from_hf_config
    from planner.layout import Layout, Mesh
    from tests.plan_training import train_step

    shardings = [(Mesh(0, WORLD), Layout(2, 2, 1)), (Mesh(0, WORLD), Layout(1, 4, 1))]
    worker = DeviceWorker(rank, WORLD)
    worker.join(("127.0.0.1", port), plan_groups(WORLD, shardings))
    worker.specs = {f"actor{i}": RoleSpec(f"actor{i}", "causal", folder, folder, "sort", 4)
                    for i in range(len(shardings))}  # fmt: skip
    ids = torch.randint(0, 37, (8, 10), generator=torch.Generator().manual_seed(5))
    want = sgd_reference(folder, ids)
    shape = shape_from_hf_config("test", CFG)
    problems = []
    for i, sh in enumerate(shardings):
        worker.load(f"actor{i}", sh)
        train_step(worker, f"actor{i}", sh, {"input_ids": ids}, TRAIN_LR, optimizer="sgd")
        got = worker.shards(f"actor{i}", sh)
        for k, v in shard_state(want, shape, sh, rank).items():
            err = (got[k] - v).abs().max().item()
            if err > TOLERANCE:
                problems.append(f"{sh[1]}: rank {rank} {k} differs by {err:.2e}")
    report(rank, failures, problems)


TRAIN_LR = 0.5


def sgd_reference(folder: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step of next-token cross-entropy on the whole batch, in one process."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder)
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_tensor_parallel_training_matches_one_process(tmp_path: Path) -> None:
    """dp2 x tp2 and tp4 train steps on DeviceWorkers (gradient shards averaged over the
    data-parallel group) give one process's SGD step on the whole batch within 1e-5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.workers.groups import free_port

    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **CFG)).save_pretrained(folder)
    run_ranks(_train_worker, tmp_path, free_port(), str(folder), world=WORLD)
