"""What a run is built from, made locally and deterministically: the task and its data,
the tokenizer and the base model (or a user's model folder)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import ConfigError, Problem, RelayConfig
from orchestrator.data.prompts import PromptRow, write_rows
from orchestrator.run.folder import RunError, RunPaths


@dataclass
class Assets:
    task: Any  # orchestrator.data.tasks.Task
    data: Any  # orchestrator.data.tasks.TaskData
    tokenizer: Any
    tokenizer_path: Path
    base: Path  # the Hugging Face folder every role starts from (before SFT)
    stop_token_ids: tuple[int, ...]
    num_params: int
    rl_rows: list[Any]  # orchestrator.data.prompts.PromptRow: the RL prompts, labels, fields
    eval_rows: list[Any]  # the held-out ones (empty: no evaluation)
    task_rows: bool  # the rows are the task's own prompts (its verifier scores them)


def stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> tuple[int, ...]:
    """The ids of `generate.stop_tokens`; each must be exactly one token of the tokenizer."""
    ids, bad = [], []
    for text in stop_tokens:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            bad.append(text)
        else:
            ids.append(enc[0])
    if bad:
        raise ConfigError(
            [
                Problem(
                    "generate.stop_tokens",
                    list(stop_tokens),
                    f"{bad} are not single tokens of the model's tokenizer",
                    "use tokens of the task's alphabet (one character each for the built-in "
                    "tasks), or drop them",
                )
            ]
        )
    return tuple(ids)


def model_stop_ids(folder: Path, tokenizer: Any) -> tuple[int, ...]:
    """The eos ids of the folder's generation_config.json besides the tokenizer's own (an
    instruct model often lists several: Qwen2.5's end-of-turn and end-of-text)."""
    import json

    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(int(i) for i in ids if int(i) != tokenizer.eos_token_id)


def build_assets(cfg: RelayConfig, paths: RunPaths, reward_pairs: bool) -> Assets:
    """Task data (with preference pairs if a reward model is trained), tokenizer and base
    model; a built base model is reused (assets/base_model/DONE)."""
    from transformers import AutoTokenizer

    from orchestrator.data.tasks import build_task_data, make_task
    from orchestrator.models.hf import (
        build_model_folder,
        count_parameters,
        load_causal_lm,
        train_tokenizer,
    )

    task = make_task(cfg.task.name, cfg.task.num_digits)
    data = build_task_data(
        task,
        num_demos=cfg.task.num_demos,
        num_rl_prompts=cfg.task.num_rl_prompts,
        num_eval_prompts=cfg.task.num_eval_prompts,
        demo_noise=cfg.task.demo_noise,
        seed=cfg.run.seed,
        num_pairs=cfg.reward.num_pairs if reward_pairs else 0,
        num_eval_pairs=cfg.reward.num_eval_pairs if reward_pairs else 0,
        label_noise=cfg.reward.label_noise,
    )
    if cfg.task.prompt_file is not None:
        data.rl_prompts = file_prompts(cfg, task, data)
    if cfg.model.path is not None:
        base = tokenizer_path = Path(cfg.model.path)
    else:
        tokenizer_path, base = paths.tokenizer, paths.base_model
        if not (base / "DONE").is_file():
            tmp = paths.assets / ".building"
            shutil.rmtree(tmp, ignore_errors=True)
            corpus = [p + r for p, r in data.sft_pairs] + data.rl_prompts
            tok = train_tokenizer(task.alphabet(), tmp / "tokenizer", corpus)
            build_model_folder(
                cfg.model.preset,
                tok,
                tmp / "base_model",
                seed=cfg.run.seed,
                max_position_embeddings=cfg.model.max_position_embeddings,
                zero_head=cfg.model.zero_head,
            )
            for name in ("tokenizer", "base_model"):
                shutil.rmtree(paths.assets / name, ignore_errors=True)
                (tmp / name).rename(paths.assets / name)
            shutil.rmtree(tmp, ignore_errors=True)
            (base / "DONE").write_text("ok\n")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if cfg.data.train_files:
        rl_rows = dataset_rows(cfg, tokenizer, cfg.data.train_files, "data.train_files")
        eval_rows = (dataset_rows(cfg, tokenizer, cfg.data.eval_files, "data.eval_files")
                     if cfg.data.eval_files else [])  # fmt: skip
    else:
        rl_rows, eval_rows = task_rows(task, data.rl_prompts), task_rows(task, data.eval_prompts)
    write_rows(paths.data / "rl_train.jsonl", rl_rows)
    write_rows(paths.data / "rl_eval.jsonl", eval_rows)
    return Assets(task, data, tokenizer, tokenizer_path, base,
                  tuple(dict.fromkeys((*stop_token_ids(tokenizer, cfg.generate.stop_tokens),
                                       *model_stop_ids(base, tokenizer)))),
                  count_parameters(load_causal_lm(base)), rl_rows, eval_rows,
                  not cfg.data.train_files)  # fmt: skip


def task_rows(task: Any, prompts: list[str]) -> list[PromptRow]:
    """The task's prompts as rows, each labelled with the task's answer."""
    return [PromptRow(p, p, task.answer(p)) for p in prompts]


def dataset_rows(cfg: RelayConfig, tokenizer: Any, files: list[str], name: str) -> list[PromptRow]:
    """The rows of a user's dataset files (checked when the config loaded), rendered."""
    return checked_rows(name, files, lambda: read_prompt_rows(cfg, tokenizer, files))


def checked_rows(name: str, files: list[str], read: Any) -> list:
    """The rows of `read()` (a report of `files`, checked when the config loaded); a
    RunError if they changed since and no longer read cleanly; rows that do not fit the
    model's context are counted."""
    from orchestrator.data.files import DataFileError

    try:
        report = read()
    except DataFileError as e:
        raise RunError(f"{name} = {files}: {e}") from None
    if report.problems:  # the files changed since the config was checked
        rule, _ = report.problems[0]
        raise RunError(f"{name} = {files} no longer reads cleanly ({rule}); run `relay config "
                       "<the same overrides>` to see every problem")  # fmt: skip
    if report.too_long:
        print(f"relay: {report.too_long} row(s) of {name} do not fit the model's context and "
              "are left out (data.too_long=filter)")  # fmt: skip
    return report.rows


def read_prompt_rows(cfg: RelayConfig, tokenizer: Any, files: list[str]) -> Any:
    """The PromptReport of `files` under the config's data settings and the model's
    context (DataFileError on a file that cannot be read)."""
    from orchestrator.config.run_rules import model_context
    from orchestrator.data.prompts import read_prompts

    d = cfg.data
    return read_prompts(list(files), tokenizer, d.prompt_key, d.label_key, d.chat,
                        d.chat_template, d.too_long,
                        model_context(cfg) - cfg.generate.max_new_tokens)  # fmt: skip


def file_prompts(cfg: RelayConfig, task: Any, data: Any) -> list[str]:
    """task.prompt_file's prompts (checked line by line when the config loaded)."""
    from orchestrator.data.user_data import read_prompt_file

    report = read_prompt_file(str(cfg.task.prompt_file), task.answer, lambda text: 0, 1 << 30, 0)
    if not report.ok:  # the file changed since the config was checked
        raise RunError(
            f"task.prompt_file = {cfg.task.prompt_file!r} no longer reads cleanly; run "
            "`relay config <the same overrides>` to see its problems"
        )
    held_out = set(data.eval_prompts)
    shared = sum(p in held_out for p in report.prompts)
    if shared:
        print(f"relay: note: {shared} of {len(report.prompts)} prompts of "
              f"{cfg.task.prompt_file} are also evaluation prompts")  # fmt: skip
    return report.prompts


# ------------------------------------------------------------------- SFT and preference rows

TRAINING_FILES = {  # kind -> (the config's files, the task's file in the run folder)
    ("sft", "train"): ("data.sft_files", "sft_train.jsonl"),
    ("preference", "train"): ("data.preference_files", "preference_train.jsonl"),
    ("preference", "eval"): ("data.preference_eval_files", "preference_eval.jsonl"),
}


def stage_rows(cfg: RelayConfig, paths: RunPaths, assets: Assets, kind: str, split: str) -> list:
    """The SFT or preference rows of a split: the user's files (data.*), or the task's
    demonstrations and pairs, written to the run folder's data/ and read the same way."""
    from orchestrator.config.data_rules import read_training_rows
    from orchestrator.data.prompts import write_jsonl

    name, task_file = TRAINING_FILES[(kind, split)]
    files = getattr(cfg.data, name.split(".")[1])
    task = None
    if not files:
        if kind == "sft":
            rows = [{"prompt": p, "response": r} for p, r in assets.data.sft_pairs]
        else:
            pairs = assets.data.pref_pairs if split == "train" else assets.data.eval_pref_pairs
            rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
        if not rows:
            return []
        files, task = [str(paths.data / task_file)], assets.task
        write_jsonl(paths.data / task_file, rows)
    return checked_rows(name, files,
                        lambda: read_training_rows(cfg, assets.tokenizer, kind, files, task))  # fmt: skip
