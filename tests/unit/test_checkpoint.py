"""Checkpoint folders: atomic commit, manifest verification, keep-N, corruption fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.run.checkpoint import MANIFEST, CheckpointManager


def write_step(mgr: CheckpointManager, step: int, payload: bytes = b"weights") -> Path:
    tmp = mgr.begin(step)
    (tmp / "actor").mkdir()
    (tmp / "actor" / "model.safetensors").write_bytes(payload * 100)
    (tmp / "controller.json").write_text(json.dumps({"step": step}))
    return mgr.commit(tmp, step)


def test_commit_writes_manifest_and_latest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    final = write_step(mgr, 5)
    assert final == tmp_path / "checkpoints" / "step_5"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {"actor/model.safetensors", "controller.json"}
    assert manifest["files"]["actor/model.safetensors"]["bytes"] == 700
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_5"
    assert CheckpointManager.verify(final) == []
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_keep_n_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        write_step(mgr, step)
    assert [s for s, _ in mgr.complete()] == [3, 4]
    assert not list((tmp_path / "checkpoints").glob(".trash_*"))


def test_interrupted_checkpoint_is_never_picked(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    write_step(mgr, 2)
    tmp = mgr.begin(4)  # a writer killed before commit
    (tmp / "controller.json").write_text("{")
    # even a step folder without its manifest (renamed by hand, say) is not complete
    (tmp_path / "checkpoints" / "step_6").mkdir()
    assert [s for s, _ in mgr.complete()] == [2]
    assert mgr.newest_valid() == tmp_path / "checkpoints" / "step_2"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_checkpoint_is_reported_and_skipped(tmp_path: Path, damage: str) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    write_step(mgr, 1)
    newest = write_step(mgr, 2)
    target = newest / "actor" / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[3] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    problems = CheckpointManager.verify(newest)
    assert len(problems) == 1 and "actor/model.safetensors" in problems[0]
    with pytest.warns(UserWarning, match="corrupted"):
        assert mgr.newest_valid() == tmp_path / "checkpoints" / "step_1"


def test_rewriting_a_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    write_step(mgr, 3, b"old")
    final = write_step(mgr, 3, b"new")
    assert (final / "actor" / "model.safetensors").read_bytes() == b"new" * 100
    assert CheckpointManager.verify(final) == []


def test_latest_pointer_wins_and_pruning_keeps_the_newest_written(tmp_path: Path) -> None:
    import os

    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6):
        write_step(mgr, step)
    # resumed from step 2 (an older branch): step 3 is written after 4 and 6
    write_step(mgr, 3)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert mgr.newest_valid() == tmp_path / "checkpoints" / "step_3"
    kept = sorted(s for s, _ in mgr.complete())
    assert kept == [3, 6]
    # with `latest` gone (or broken), the most recently written still wins, whatever mtimes say
    os.utime(tmp_path / "checkpoints" / "step_6" / MANIFEST)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert mgr.newest_valid() == tmp_path / "checkpoints" / "step_3"


def test_interrupted_swap_is_recovered(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    final = write_step(mgr, 5)
    # a kill between the two renames of a rewrite: only .old_step_5 is left
    (final.parent / ".old_step_5").mkdir()
    for p in final.iterdir():
        p.rename(final.parent / ".old_step_5" / p.name)
    final.rmdir()
    again = CheckpointManager(tmp_path, keep=3)
    again.recover()
    assert again.newest_valid() == final
    assert CheckpointManager.verify(final) == []
