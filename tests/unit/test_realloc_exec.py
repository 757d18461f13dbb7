"""Parameter reallocation executed with torch.distributed (gloo) over 4 processes: for
every ordered pair of the six 4-device layouts, and for pairs of different meshes, the
weights each process ends with are exactly the destination layout's slices, and a round
trip gives the source slices back bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.workers.realloc import ReallocStats, reallocate, shard_state
from planner.catalogue import ModelShape, shape_from_hf_config
from planner.layout import Layout, Mesh
from planner.realloc import model_tensors
from tests.distributed import join_world, report, run_ranks

# vocab 37 does not divide by 2 or 4: tensor-parallel ranks hold uneven embedding rows
SHAPE = ModelShape("test", hidden=64, layers=4, heads=4, kv_heads=4, intermediate=96, vocab=37)
WORLD = 4
FULL = Mesh(0, 4)
LAYOUTS = [Layout(4, 1, 1), Layout(2, 2, 1), Layout(1, 4, 1), Layout(2, 1, 2), Layout(1, 2, 2),
           Layout(1, 1, 4)]  # fmt: skip
PAIRS = [((FULL, a), (FULL, b)) for a in LAYOUTS for b in LAYOUTS if a != b] + [
    ((Mesh(0, 2), Layout(1, 2, 1)), (Mesh(2, 2), Layout(2, 1, 1))),  # train -> other devices
    ((Mesh(0, 1), Layout(1, 1, 1)), (FULL, Layout(1, 2, 2))),  # one device -> all four
    ((Mesh(2, 2), Layout(1, 1, 2)), (FULL, Layout(1, 4, 1))),
    ((FULL, Layout(2, 2, 1)), (Mesh(3, 1), Layout(1, 1, 1))),  # all four -> one device
]


def full_state(seed: int = 0, shape: ModelShape = SHAPE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.shape, generator=g) for t in model_tensors(shape)}


# vocab 5 over tp 4 in chunks of 2: the last rank holds no embedding or LM-head rows
SMALL = ModelShape("small", hidden=64, layers=4, heads=4, kv_heads=4, intermediate=96, vocab=5)


def _worker(rank: int, folder: str) -> None:
    join_world(rank, folder, WORLD)
    problems = []
    moved = 0
    for shape, src, dst in [(SHAPE, s, d) for s, d in PAIRS] + [(SMALL, s, d) for s, d in PAIRS]:
        full = full_state(shape=shape)
        mine = shard_state(full, shape, src, rank)
        stats = ReallocStats()
        got = reallocate(mine, shape, src, dst, rank, devices_per_node=2, stats=stats)
        moved += stats.received_bytes
        want = shard_state(full, shape, dst, rank)
        if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
            problems.append(f"{src} -> {dst}: device {rank} holds other values")
        back = reallocate(got, shape, dst, src, rank, devices_per_node=2)
        if back.keys() != mine.keys() or not all(torch.equal(back[k], mine[k]) for k in mine):
            problems.append(f"{src} -> {dst} -> back: device {rank} differs")
    if moved == 0:
        problems.append(f"device {rank} received nothing over all pairs")
    report(rank, folder, problems)


def test_reallocation_is_exact_for_every_layout_pair(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path, world=WORLD)


def test_shards_partition_each_tensor() -> None:
    """Under every layout the tensor-parallel slices of a stage tile each split tensor
    exactly once; each tensor lives only on its own stage's devices."""
    full = full_state()
    for layout in LAYOUTS:
        held = [shard_state(full, SHAPE, (FULL, layout), d) for d in range(WORLD)]
        for t in model_tensors(SHAPE):
            pieces = [h[t.name] for h in held if t.name in h]
            assert len(pieces) == layout.dp * layout.tp  # replicated ones on every tp rank
            if t.split_dim is not None:
                replica = pieces[: layout.tp]  # the first data-parallel replica's ranks
                assert torch.equal(torch.cat(replica, t.split_dim), full[t.name])


def test_planner_names_match_the_hugging_face_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models.hf import MODEL_PRESETS

    cfg = dict(MODEL_PRESETS["tiny"], vocab_size=37)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **cfg))
    shape = shape_from_hf_config("tiny", cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {t.name: t.shape for t in model_tensors(shape)} == want


def test_a_device_outside_both_meshes_does_nothing() -> None:
    """A device outside both meshes takes part in no op and ends with nothing."""
    out = reallocate({}, SHAPE, (Mesh(0, 1), Layout(1, 1, 1)), (Mesh(1, 1), Layout(1, 1, 1)), 3,
                     devices_per_node=2)  # fmt: skip
    assert out == {}
