"""Rules of `data.*`: the user's own RL prompts, read and checked (row by row) before the
run folder is touched."""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import Problem, RelayConfig


def data_setting_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """Settings that need no file read: the modes, and what user data rules out."""
    from orchestrator.data.prompts import CHAT_MODES, TOO_LONG

    d = cfg.data
    if d.chat not in CHAT_MODES:
        p.append(Problem("data.chat", d.chat, f"must be one of {list(CHAT_MODES)}",
                         "auto renders chat messages with the chat template"))  # fmt: skip
    if d.too_long not in TOO_LONG:
        p.append(Problem("data.too_long", d.too_long, f"must be one of {list(TOO_LONG)}",
                         "filter drops prompts that leave no room for the response"))  # fmt: skip
    if d.eval_files and not d.train_files:
        p.append(Problem("data.eval_files", d.eval_files, "held-out prompts of your own need "
                         "data.train_files too", "set data.train_files, or drop data.eval_files"))  # fmt: skip
    if d.max_response_tokens is not None and d.max_response_tokens < 1:
        p.append(Problem("data.max_response_tokens", d.max_response_tokens, "must be at least 1",
                         "give a token count, or null for the model's context"))  # fmt: skip
    if d.preference_eval_files and not d.preference_files:
        p.append(Problem("data.preference_eval_files", d.preference_eval_files, "held-out pairs "
                         "of your own need data.preference_files too",
                         "set data.preference_files, or drop data.preference_eval_files"))  # fmt: skip
    r = cfg.reward
    trains_rm = r.source == "model" and r.path is None
    if d.sft_files and not cfg.sft.enabled:
        p.append(Problem("data.sft_files", d.sft_files, "only the SFT stage reads them, and "
                         "sft.enabled is false", "pass sft.enabled=true, or drop data.sft_files"))  # fmt: skip
    if d.preference_files and not trains_rm:
        p.append(Problem("data.preference_files", d.preference_files, "only the reward-model "
                         f"stage reads them, and it does not run (reward.source={r.source}"
                         f"{', reward.path is set' if r.path else ''})",
                         "use reward=model without reward.path, or drop data.preference_files"))  # fmt: skip
    for name in ("train_files", "sft_files", "preference_files"):
        if getattr(d, name) and cfg.model.path is None:
            p.append(Problem(f"data.{name}", getattr(d, name), "your own rows need your own "
                             "model and tokenizer (the built-in tokenizer knows only the task's "
                             "characters)", "set model.path to a Hugging Face model folder"))  # fmt: skip
    if not d.train_files:
        return
    if cfg.task.prompt_file is not None:
        p.append(Problem("task.prompt_file", cfg.task.prompt_file, "RL prompts come from "
                         "data.train_files or task.prompt_file, not both",
                         "drop task.prompt_file"))  # fmt: skip
    if r.source == "verifier":
        p.append(Problem("reward.source", r.source, "the task's verifier scores only the task's "
                         "prompts, not data.train_files'", "use reward=function with "
                         "reward.function=math (labels) or your own 'file.py:name'"))  # fmt: skip
    if trains_rm and not d.preference_files:
        p.append(Problem("reward.source", r.source, "a reward model for data.train_files' prompts "
                         "needs preference pairs of your own", "set data.preference_files, use "
                         "reward=function, or reward.path=<a trained reward model folder>"))  # fmt: skip
    if cfg.sft.enabled and not d.sft_files:
        p.append(Problem("sft.enabled", True, "SFT before RL on data.train_files needs "
                         "demonstrations of your own", "set data.sft_files, or pass "
                         "sft.enabled=false (start RL from model.path)"))  # fmt: skip


def data_file_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """data.train_files and data.eval_files read cleanly: every row a prompt (text or chat
    messages) that fits the model's context with generate.max_new_tokens."""
    from orchestrator.config.run_rules import model_context
    from orchestrator.data.files import DataFileError
    from orchestrator.data.prompts import load_template, read_prompts

    d = cfg.data
    if cfg.model.path is None or p_has(p, "data.", "model.path"):
        return
    if not (d.train_files or d.sft_files or d.preference_files):
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        room = model_context(cfg) - cfg.generate.max_new_tokens
    except Exception:  # model.path's own rule reports a broken folder
        return
    try:
        load_template(d.chat_template)
    except DataFileError as e:
        p.append(Problem("data.chat_template", d.chat_template, e.rule, e.fix))
        return
    training_file_rules(p, cfg, tokenizer)
    uses_math = "math" in (cfg.reward.function, *cfg.reward.functions)
    for name, files in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files)):
        if not files:
            continue
        try:
            report = read_prompts(list(files), tokenizer, d.prompt_key, d.label_key, d.chat,
                                  d.chat_template, d.too_long, room)  # fmt: skip
        except DataFileError as e:
            p.append(Problem(name, list(files), e.rule, e.fix))
            continue
        except Exception as e:  # whatever else reading them raised, said as a problem
            p.append(Problem(name, list(files), f"reading them failed: {type(e).__name__}: "
                             f"{str(e)[:300]}", "check the files' format and contents"))  # fmt: skip
            continue
        for rule, fix in report.problems:
            p.append(Problem(name, list(files), rule, fix))
        n = len(report.rows)
        if report.problems:
            continue
        if name == "data.train_files" and n < cfg.train.rollout_batch_prompts:
            p.append(Problem(name, list(files), f"holds {n} usable prompts, fewer than "
                             f"train.rollout_batch_prompts ({cfg.train.rollout_batch_prompts})",
                             "add prompts, or lower train.rollout_batch_prompts"))  # fmt: skip
        labelled = sum(r.label is not None for r in report.rows)
        if uses_math and labelled < n:
            p.append(Problem("data.label_key", d.label_key, f"the math reward needs a label in "
                             f"every row; {n - labelled} of {n} rows of {name} have none",
                             "name the answer's field with data.label_key"))  # fmt: skip


def p_has(p: list[Problem], *prefixes: str) -> bool:
    return any(q.field.startswith(prefixes) for q in p)


def training_file_rules(p: list[Problem], cfg: RelayConfig, tokenizer: Any) -> None:
    """data.sft_files, data.preference_files and data.preference_eval_files read cleanly:
    every row a prompt with its response(s), fitting the model's context."""
    from orchestrator.data.files import DataFileError

    d = cfg.data
    for name, kind in (("sft_files", "sft"), ("preference_files", "preference"),
                       ("preference_eval_files", "preference")):  # fmt: skip
        files = getattr(d, name)
        if not files:
            continue
        try:
            report = read_training_rows(cfg, tokenizer, kind, list(files))
        except DataFileError as e:
            p.append(Problem(f"data.{name}", list(files), e.rule, e.fix))
            continue
        except Exception as e:  # whatever else reading them raised, said as a problem
            p.append(Problem(f"data.{name}", list(files), f"reading them failed: "
                             f"{type(e).__name__}: {str(e)[:300]}",
                             "check the files' format and contents"))  # fmt: skip
            continue
        for rule, fix in report.problems:
            p.append(Problem(f"data.{name}", list(files), rule, fix))


def read_training_rows(
    cfg: RelayConfig, tokenizer: Any, kind: str, files: list[str], task: Any = None
) -> Any:
    """The RowsReport of SFT (`kind` 'sft') or preference rows in `files`, under the
    config's data settings and the model's context; `task`: the files are the task's own
    (fixed field names, text prompts, every row kept). DataFileError on a
    file that cannot be read."""
    from orchestrator.config.run_rules import model_context
    from orchestrator.data.files import read_rows
    from orchestrator.data.prompts import Encoder
    from orchestrator.data.train_rows import preference_rows, sft_rows

    d = cfg.data
    read = sft_rows if kind == "sft" else preference_rows
    if task is not None:
        keys = {"prompt": "prompt", "response": "response", "chosen": "chosen",
                "rejected": "rejected", "messages": "messages"}  # fmt: skip
        return read(read_rows(files), keys, Encoder(tokenizer, "auto", None),
                    model_context(cfg), None, "error")  # fmt: skip
    keys = {"prompt": d.prompt_key, "response": d.response_key, "messages": d.messages_key,
            "chosen": d.chosen_key, "rejected": d.rejected_key}  # fmt: skip
    return read(read_rows(files), keys, Encoder(tokenizer, d.chat, d.chat_template),
                model_context(cfg), d.max_response_tokens, d.too_long)  # fmt: skip
