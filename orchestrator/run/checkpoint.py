"""Checkpoints that resume can trust.

`<run_dir>/checkpoints/step_<N>/` holds, per trainable role, Hugging Face weights and the
DeepSpeed optimizer/scheduler state, plus `controller.json` and `rng.pt`. A checkpoint
is written into a hidden temporary folder, a MANIFEST.json with every file's size and
sha256 is written last, the folder is renamed into place, and only then is the `latest`
pointer replaced. Resume takes the checkpoint `latest` names, or else the most recently
written one, whose manifest verifies; a folder without a manifest (interrupted) is never
picked, and a corrupted one is reported and skipped. The N most recently written are kept
(the write order is a counter in each manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    pass


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def recover(self) -> None:
        """Finish a swap that a kill interrupted: put a sealed step folder back in place."""
        if not self.root.is_dir():
            return
        for pattern in (".tmp_step_*", ".old_step_*"):
            for p in sorted(self.root.glob(pattern)):
                final = self.root / f"step_{p.name.rsplit('_', 1)[1]}"
                if not final.exists() and (p / MANIFEST).is_file():
                    os.replace(p, final)

    def begin(self, step: int) -> Path:
        """A fresh temporary folder for the checkpoint of `step`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp_step_{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Seal `tmp` with a manifest, move it into place and point `latest` at it."""
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        seq = max((self.seq(p) for _, p in self.complete()), default=0) + 1
        manifest = {"step": step, "seq": seq, "files": files}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / f"step_{step}"
        if final.exists():  # the same step written again after a resume: swap, then delete
            old = self.root / f".old_step_{step}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        write_atomic(self.root / "latest", final.name + "\n")
        self._prune()
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints with a manifest, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob("step_*"):
            if (p / MANIFEST).is_file():
                try:
                    found.append((int(p.name.split("_", 1)[1]), p))
                except ValueError:
                    continue
        return sorted(found)

    def _prune(self) -> None:
        """Drop all but the `keep` most recently written: renamed away first, so a kill
        mid-delete never leaves a half-deleted step_<N> folder behind. (Most recently
        written, not highest step: after resuming from an older checkpoint, the new
        branch's checkpoints are the ones to keep.)"""
        for p in self.by_write_order()[: -self.keep]:
            trash = self.root / f".trash_{p.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(p, trash)
        for pattern in (".tmp_step_*", ".trash_*", ".old_step_*"):
            for p in self.root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def seq(folder: Path) -> int:
        """The write order of a sealed checkpoint (a counter in its manifest)."""
        try:
            return int(json.loads((folder / MANIFEST).read_text()).get("seq", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    def by_write_order(self) -> list[Path]:
        """Sealed checkpoints, oldest written first (ties: lower step first)."""
        return [p for _, p in sorted(self.complete(), key=lambda sp: (self.seq(sp[1]), sp[0]))]

    @staticmethod
    def verify(folder: Path) -> list[str]:
        """Problems of a checkpoint folder; empty if every file matches its manifest."""
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return [f"{folder} has no {MANIFEST} (it was interrupted while being written)"]
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError) as e:
            return [f"{manifest} is unreadable ({e})"]
        problems = []
        for rel, meta in files.items():
            p = folder / rel
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(
                    f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
                )
            elif _sha256(p) != meta["sha256"]:
                problems.append(f"{rel} does not match its sha256 checksum")
        return problems

    def newest_valid(self) -> Path | None:
        """The checkpoint `latest` names if it verifies, else the most recently written
        one that does; corrupted ones are reported and skipped."""
        candidates = list(reversed(self.by_write_order()))
        latest = self.root / "latest"
        if latest.is_file():
            named = self.root / latest.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for p in candidates:
            problems = self.verify(p)
            if not problems:
                return p
            warnings.warn(
                f"checkpoint {p} is corrupted and is skipped: {'; '.join(problems)}", stacklevel=2
            )
        return None
