"""Rules of `data.*`: the user's own RL prompts, read and checked (row by row) before the
run folder is touched."""

from __future__ import annotations

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
    if not d.train_files:
        return
    if cfg.model.path is None:
        p.append(Problem("data.train_files", d.train_files, "your own prompts need your own "
                         "model and tokenizer (the built-in tokenizer knows only the task's "
                         "characters)", "set model.path to a Hugging Face model folder"))  # fmt: skip
    if cfg.task.prompt_file is not None:
        p.append(Problem("task.prompt_file", cfg.task.prompt_file, "RL prompts come from "
                         "data.train_files or task.prompt_file, not both",
                         "drop task.prompt_file"))  # fmt: skip
    r = cfg.reward
    if r.source == "verifier":
        p.append(Problem("reward.source", r.source, "the task's verifier scores only the task's "
                         "prompts, not data.train_files'", "use reward=function with "
                         "reward.function=math (labels) or your own 'file.py:name'"))  # fmt: skip
    if r.source == "model" and r.path is None:
        p.append(Problem("reward.source", r.source, "a reward model is trained on the task's "
                         "preference pairs, not on data.train_files'", "use reward=function, "
                         "or reward.path=<a trained reward model folder>"))  # fmt: skip
    if cfg.sft.enabled:
        p.append(Problem("sft.enabled", True, "SFT trains on the task's demonstrations, not on "
                         "data.train_files'", "pass sft.enabled=false (start RL from model.path)"))  # fmt: skip


def data_file_rules(p: list[Problem], cfg: RelayConfig) -> None:
    """data.train_files and data.eval_files read cleanly: every row a prompt (text or chat
    messages) that fits the model's context with generate.max_new_tokens."""
    from orchestrator.config.run_rules import model_context
    from orchestrator.data.files import DataFileError
    from orchestrator.data.prompts import load_template, read_prompts

    d = cfg.data
    if not d.train_files or cfg.model.path is None or p_has(p, "data.", "model.path"):
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
