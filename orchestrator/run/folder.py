"""The run folder: created once, reopened only by the same config (or with
run.allow_config_change), never touched when it is not a Relay run's."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import RelayConfig, to_dict, to_yaml
from orchestrator.run.checkpoint import write_atomic

RUN_MARKER = "relay_run.json"
# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = (
    "run.resume",
    "run.allow_config_change",
    "train.steps",
    "logger.",
    "reward.on_error",
)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class RunPaths:
    root: Path

    @property
    def assets(self) -> Path:
        return self.root / "assets"

    @property
    def tokenizer(self) -> Path:
        return self.assets / "tokenizer"

    @property
    def base_model(self) -> Path:
        return self.assets / "base_model"

    @property
    def data(self) -> Path:
        """The RL rows a run reads, whatever their source: rl_train.jsonl, rl_eval.jsonl."""
        return self.root / "data"

    @property
    def workers(self) -> Path:
        """The workers of the stage now running: device, roles, process id, host."""
        return self.root / "workers.json"

    def write_workers(self, stage: str, processes: list[dict[str, Any]]) -> None:
        """Rewritten each time a stage starts its workers (restarts included)."""
        doc = {"stage": stage, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "workers": processes}
        write_atomic(self.workers, json.dumps(doc, indent=1))

    @property
    def sft_model(self) -> Path:
        return self.root / "models" / "sft"

    @property
    def reward_model(self) -> Path:
        return self.root / "models" / "reward"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs, except those a resume may change."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


def prompt_file_digest(cfg: RelayConfig) -> str | None:
    from orchestrator.data.user_data import file_sha256

    path = cfg.task.prompt_file
    return file_sha256(path) if path is not None else None


def data_digests(cfg: RelayConfig) -> dict[str, str]:
    """sha256 of each of data.train_files and data.eval_files (a folder: of its files)."""
    import hashlib

    out = {}
    for path in [*(cfg.data.train_files or []), *(cfg.data.eval_files or [])]:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with f.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    h.update(chunk)
        out[str(path)] = h.hexdigest()
    return out


def prepare(cfg: RelayConfig, root: Path) -> dict[str, Any]:
    """Create or reopen the run folder; returns the run's marker (with its wandb id)."""
    marker_path = root / RUN_MARKER
    if root.exists() and any(root.iterdir()):
        if not marker_path.is_file():
            raise RunError(
                f"run.output_dir/run.name = {root} exists and is not a Relay run folder "
                f"(no {RUN_MARKER}). Fix: choose another run.name or output_dir."
            )
        marker = json.loads(marker_path.read_text())
        if cfg.run.resume == "never":
            raise RunError(
                f"run.resume = 'never', but the run folder {root} already holds a run. "
                "Fix: pass resume=auto to continue it, or choose a new run.name; nothing "
                "was changed."
            )
        changed = config_changes(marker.get("config", {}), to_dict(cfg))
        digest = prompt_file_digest(cfg)
        before = marker.get("prompt_file_sha256", digest)
        if before != digest and before is not None and digest is not None:
            changed.append(("task.prompt_file (contents)", f"sha256 {before[:12]}",
                            f"sha256 {digest[:12]}"))  # fmt: skip
        old_data, new_data = marker.get("data_sha256", {}), data_digests(cfg)
        for path in sorted(set(old_data) & set(new_data)):
            if old_data[path] != new_data[path]:
                changed.append((f"data file {path} (contents)", f"sha256 {old_data[path][:12]}",
                                f"sha256 {new_data[path][:12]}"))  # fmt: skip
        if changed and not cfg.run.allow_config_change:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
            raise RunError(
                f"run.name = {cfg.run.name!r}: the run folder {root} was made by a different "
                f"config ({lines}). Fix: choose a new run.name, or pass "
                "run.allow_config_change=true to continue with the new values; nothing was "
                "changed."
            )
        return marker
    if cfg.run.resume not in ("never", "auto"):
        raise RunError(
            f"run.resume = {cfg.run.resume!r} needs the run folder {root}, which is empty"
        )
    root.mkdir(parents=True, exist_ok=True)
    marker = {
        "relay": 1,
        "wandb_id": uuid.uuid4().hex[:12],
        "created": time.time(),
        "config": to_dict(cfg),
        "prompt_file_sha256": prompt_file_digest(cfg),
        "data_sha256": data_digests(cfg),
    }
    write_atomic(marker_path, json.dumps(marker))
    write_atomic(root / "config.yaml", to_yaml(cfg))
    return marker
