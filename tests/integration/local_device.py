"""A DeviceWorker in the test's own process, without Ray: a world of one device that hosts
every role given, each under the one-device sharding (the colocated plan of one GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.workers.device_worker import DeviceWorker
from orchestrator.workers.evaluating import merge_evaluation
from orchestrator.workers.groups import free_port
from orchestrator.workers.spec import RoleSpec
from planner.layout import Layout, Mesh

ONE = (Mesh(0, 1), Layout(1, 1, 1))


class LocalDevice:
    def __init__(self, specs: list[RoleSpec], device: str = "cpu", engine_tp: int = 0) -> None:
        self.worker = DeviceWorker(0, 1, 1, device)
        self.worker.join(("127.0.0.1", free_port()), [[0]])
        self.worker.host(specs)
        if engine_tp:  # the generating role's vLLM engine
            self.worker.build_engine(next(s.name for s in specs if s.generation_backend), 1)
        for spec in specs:
            self.worker.load(spec.name, ONE)
        self.version = 0

    def run(self, call: Any, options: dict[str, Any], *inputs: Any) -> tuple[dict, dict]:
        """One call on the device: (outputs, metrics)."""
        part, metrics = self.worker.run(call, ONE, options, *inputs)
        return part[1], metrics

    def state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """The role's full weights now (the names reallocation and checkpoints use)."""
        return self.worker.shards(role, ONE)

    def save(self, role: str, folder: Path) -> None:
        self.worker.write_model(role, ONE, str(folder))
        self.worker.save_rank(role, ONE, str(folder))

    def load(self, role: str, folder: Path) -> None:
        self.worker.load_rank(role, ONE, str(folder), version=1)

    def evaluate(self, count: int, params: Any) -> dict[str, float]:
        """Accuracy and reward on the first `count` rows of the eval split."""
        return merge_evaluation([self.worker.evaluate("actor", ONE, count, params, version=0)])


def task_rows(
    tokenizer: Any, task: Any, prompts: list[str], folder: Path, split: str = "train"
) -> dict[str, torch.Tensor]:
    """Write `prompts` as the run's rows of `split` in `folder` (labelled with the task's
    answers, as a run does) and return their batch, prompt_index included."""
    from orchestrator.data.prompts import PromptRow, write_rows
    from orchestrator.data.text import encode_prompts

    write_rows(folder / f"rl_{split}.jsonl", [PromptRow(p, p, task.answer(p)) for p in prompts])
    ids, mask = encode_prompts(tokenizer, prompts)
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt_index": torch.arange(len(prompts))}
