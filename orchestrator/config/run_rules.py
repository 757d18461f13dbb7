"""Rules of running a config on this machine (not of planning it): nodes, GPUs, the
model's context, the user's prompt file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Problem, RelayConfig


def local_run_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """Rules of running here (not of planning): one node unless joining a cluster, the
    GPUs this machine has, the model's context."""
    c = cfg.cluster
    if cfg.model.path is None:
        from orchestrator.data.tasks import make_task

        try:
            task = make_task(cfg.task.name, cfg.task.num_digits)
        except ValueError:  # an unknown task or digit count: its own rule reports it
            task = None
        if task is not None:
            context = task.max_prompt_chars + 1 + cfg.generate.max_new_tokens
            if context > cfg.model.max_position_embeddings:
                p.append(
                    Problem(
                        "model.max_position_embeddings",
                        cfg.model.max_position_embeddings,
                        f"bos + prompt + response take up to {context} positions",
                        f"use at least {context}",
                    )
                )
    address = c.address or os.environ.get("RAY_ADDRESS")
    if c.num_nodes > 1 and not address:
        p.append(
            Problem(
                "cluster.num_nodes",
                c.num_nodes,
                "a local Ray cluster started by `relay train` has one node",
                "set cluster.address (or RAY_ADDRESS) to join a multi-node cluster, or use 1",
            )
        )
    if c.device == "cuda" and not address:
        import torch

        gpus, need = torch.cuda.device_count(), c.num_nodes * c.devices_per_node
        if gpus < need:
            p.append(
                Problem(
                    "cluster.devices_per_node",
                    c.devices_per_node,
                    f"the local cluster would use {need} GPUs (cluster.devices_per_node), this "
                    f"machine has {gpus}",
                    f"set cluster.devices_per_node={max(gpus, 1)} (roles share devices under "
                    "plan=auto), use cluster.device=cpu, or join a larger cluster "
                    "(cluster.address)",
                )
            )


def model_context(cfg: RelayConfig) -> int:
    """Positions the model holds: model.path's config, else model.max_position_embeddings."""
    if cfg.model.path is None:
        return cfg.model.max_position_embeddings
    config = json.loads((Path(cfg.model.path) / "config.json").read_text())
    return int(config.get("max_position_embeddings", cfg.model.max_position_embeddings))


def prompt_file_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """`task.prompt_file`: readable JSONL, every line a prompt of the task that fits the
    model's context with bos and generate.max_new_tokens (line-numbered problems)."""
    import random

    from orchestrator.data.tasks import TASKS, make_task
    from orchestrator.data.user_data import prompt_file_problems, read_prompt_file

    path = cfg.task.prompt_file
    if path is None or cfg.task.name not in TASKS:
        return
    try:
        task = make_task(cfg.task.name, cfg.task.num_digits)
    except ValueError:  # a digit count out of range: its own rule reports it
        return
    context = cfg.model.max_position_embeddings
    count_tokens: Any = len  # the tokenizer Relay builds has one token per character
    if cfg.model.path is not None:
        folder = Path(cfg.model.path)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        except Exception:  # model.path's own rule reports a broken folder
            return

        def count_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

    report = read_prompt_file(path, task.answer, count_tokens, context, cfg.generate.max_new_tokens)
    example = task.sample_prompt(random.Random(0))
    for rule, fix in prompt_file_problems(
        report, task.name, example, context, cfg.generate.max_new_tokens,
        cfg.train.rollout_batch_prompts,
    ):  # fmt: skip
        p.append(Problem("task.prompt_file", path, rule, fix))
