"""RL prompts from a user's dataset rows: the prompt (text or chat messages), its label
(the ground truth the reward sees) and every other field, passed through to the reward.

A prompt given as messages goes through the tokenizer's chat template with the
generation prompt (or `data.chat_template`); the rendered text already holds the
template's special tokens, so it is tokenized as it is, with no bos added: the ids are
those `apply_chat_template(messages, add_generation_prompt=True)` gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT_MODES = ("auto", "always", "never")
TOO_LONG = ("filter", "error")
MAX_LISTED = 5


@dataclass
class PromptRow:
    """One RL prompt: `text` is what is tokenized; `prompt`, `label` and `extras` are the
    row's own values, which the reward function gets."""

    text: str
    prompt: Any  # str, or a list of {"role", "content"} messages
    label: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    templated: bool = False  # `text` is a chat template's output (no bos is added)


def load_template(spec: str | None) -> str | None:
    """`data.chat_template`: a Jinja template (it has `{{` or `{%`), or the path of a file
    holding one; DataFileError naming a path that is no file."""
    from orchestrator.data.files import DataFileError

    if spec is None or "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataFileError(f"{spec!r} is neither a Jinja template (no {{{{ or {{%) nor a file",
                            "give the template itself, or the path of a file holding it")  # fmt: skip
    return path.read_text(encoding="utf-8")


def is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


class Encoder:
    """Prompts and responses of one tokenizer and chat setting (`data.chat`,
    `data.chat_template`): a prompt's messages where it is templated, its token count as
    encoded, and a (prompt, response) pair as text and response ids."""

    def __init__(self, tokenizer: Any, chat: str, chat_template: str | None) -> None:
        from orchestrator.data.text import bos_prefix

        self.tok, self.chat = tokenizer, chat
        self.template = load_template(chat_template)
        has = self.template is not None or getattr(tokenizer, "chat_template", None) is not None
        self.can_render = has and chat != "never"
        self.eos = tokenizer.eos_token_id
        self.bos = len(bos_prefix(tokenizer))

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, chat_template=self.template,
                                            add_generation_prompt=generation_prompt)  # fmt: skip

    def messages(self, value: Any) -> list[dict] | None:
        """The prompt as chat messages where it is templated, else None (text as it is).
        ValueError naming what is wrong with the value."""
        if isinstance(value, str):
            if self.chat != "always":
                return None
            value = [{"role": "user", "content": value}]
        elif not is_messages(value):
            raise ValueError("neither text nor chat messages")
        if not self.can_render:
            raise ValueError("chat messages, but data.chat=never or the tokenizer has no chat "
                             "template")  # fmt: skip
        return value

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_tokens(self, text: str, templated: bool) -> int:
        return len(self.ids(text)) + (0 if templated else self.bos)

    def pair(self, prompt: Any, response: str) -> tuple[str, list[int], bool]:
        """(prompt text, response ids ending in eos, templated)."""
        if not isinstance(response, str):
            raise ValueError(f"the response is a {type(response).__name__}, not text")
        messages = self.messages(prompt)
        if messages is None:
            return prompt, [*self.ids(response), self.eos], False
        head = self.render(messages, True)
        full = self.render([*messages, {"role": "assistant", "content": response}], False)
        if not full.startswith(head):
            raise ValueError("the chat template's text of the conversation does not begin with "
                             "its text of the prompt")  # fmt: skip
        ids = self.ids(full[len(head) :])
        ids = ids[: ids.index(self.eos) + 1] if self.eos in ids else [*ids, self.eos]
        return head, ids, True


@dataclass
class PromptReport:
    rows: list[PromptRow]
    problems: list[tuple[str, str]]  # (rule, fix)
    too_long: int = 0  # rows filtered for length


def listed(items: list[str], most: int = MAX_LISTED, noun: str = "") -> str:
    """The first `most` items joined with "; ", then how many more there are (of `noun`)."""
    more = len(items) - most
    what = f" {noun}{'s' * (more != 1)}" if noun else ""
    return "; ".join(items[:most]) + (f"; and {more} more{what}" if more > 0 else "")


def prompt_rows(
    rows: list[dict[str, Any]],
    prompt_key: str,
    label_key: str,
    chat: str,
    render: Callable[[list[dict]], str] | None,
    count_tokens: Callable[[str, bool], int],
    room: int,
    too_long: str,
) -> PromptReport:
    """PromptRows of dataset rows, and the problems found, by kind, with row numbers.
    `count_tokens(text, templated)` counts a prompt's tokens as they will be encoded
    (bos included); a prompt may have at most `room` of them."""
    out: list[PromptRow] = []
    missing, mistyped, unrendered, long_rows, empty = [], [], [], [], []
    kinds = set()
    for number, row in enumerate(rows, start=1):
        if prompt_key not in row or row[prompt_key] is None:
            # files with the field elsewhere give this row None there: list the fields it has
            missing.append(
                f"row {number} (fields {sorted(k for k, v in row.items() if v is not None)})"
            )
            continue
        value = row[prompt_key]
        if isinstance(value, str):
            kind = "text"
        elif is_messages(value):
            kind = "messages"
        else:
            mistyped.append(
                f"row {number}: {type(value).__name__} {json.dumps(value, default=str)[:60]}"
            )
            continue
        kinds.add(kind)
        templated = kind == "messages" or chat == "always"
        if templated and render is None:
            unrendered.append(f"row {number}")
            continue
        if templated:
            messages = value if kind == "messages" else [{"role": "user", "content": value}]
            try:
                text = render(messages)  # type: ignore[misc]
            except Exception as e:
                unrendered.append(f"row {number} ({type(e).__name__}: {str(e)[:80]})")
                continue
        else:
            text = value
        tokens = count_tokens(text, templated)
        if tokens == 0:
            empty.append(f"row {number}")
            continue
        if tokens > room:
            long_rows.append(f"row {number}: {tokens} tokens")
            continue
        extras = {k: v for k, v in row.items() if k not in (prompt_key, label_key)}
        out.append(PromptRow(text, value, row.get(label_key), extras, templated))
    problems: list[tuple[str, str]] = []
    if missing:
        problems.append((f"{len(missing)} row(s) have no '{prompt_key}' field: {listed(missing)}",
                         "add the field, or name the prompt's field with data.prompt_key"))  # fmt: skip
    if mistyped:
        problems.append((f"{len(mistyped)} prompt(s) are neither text nor chat messages: "
                         f"{listed(mistyped)}",
                         'give a string, or a list of {"role": ..., "content": ...} messages'))  # fmt: skip
    if empty:
        problems.append((f"{len(empty)} prompt(s) encode to no tokens (and the tokenizer has no "
                         f"bos token to start them): {listed(empty)}",
                         "give every prompt some text"))  # fmt: skip
    if unrendered:
        never = chat == "never"
        why = ("data.chat=never, but they are chat messages" if never
               else "the chat template failed or the tokenizer has none")  # fmt: skip
        fix = ("give text prompts, or use data.chat=auto to render messages" if never
               else "use a tokenizer with a chat template, or give one with data.chat_template")  # fmt: skip
        problems.append((f"{len(unrendered)} prompt(s) could not be rendered: {why}: "
                         f"{listed(unrendered)}", fix))  # fmt: skip
    if len(kinds) > 1 and chat != "always":
        problems.append(("the prompts mix text and chat messages",
                         "give every prompt in one form (data.chat=always renders text as a "
                         "user message)"))  # fmt: skip
    if long_rows and too_long == "error":
        problems.append((f"{len(long_rows)} prompt(s) leave no room for the response: "
                         f"{listed(long_rows)}; a prompt may take at most {room} tokens",
                         "shorten them, lower generate.max_new_tokens, or pass "
                         "data.too_long=filter to drop them"))  # fmt: skip
    if not problems and not out:
        problems.append(("no prompt is left" + (f" ({len(long_rows)} too long)" if long_rows else ""),
                         "add prompts that fit the model's context"))  # fmt: skip
    return PromptReport(out, problems, len(long_rows))


def read_prompts(
    files: list[str],
    tokenizer: Any,
    prompt_key: str,
    label_key: str,
    chat: str,
    chat_template: str | None,
    too_long: str,
    room: int,
) -> PromptReport:
    """The PromptReport of dataset files (`data.*` settings); a prompt may take `room`
    tokens, bos included. DataFileError on a file that cannot be read."""
    from orchestrator.data.files import read_rows

    enc = Encoder(tokenizer, chat, chat_template)
    render = (lambda messages: enc.render(messages, True)) if enc.can_render else None
    rows = read_rows(files)
    return prompt_rows(rows, prompt_key, label_key, chat, render, enc.prompt_tokens, room,
                       too_long)  # fmt: skip


# ------------------------------------------------------------------- the run's rows

SPLITS = ("train", "eval")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON Lines, atomically (the run folder's data/ files)."""
    tmp = path.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    tmp.replace(path)


def write_rows(path: Path, rows: list[PromptRow]) -> None:
    """PromptRows as the run folder's data/rl_<split>.jsonl."""
    from dataclasses import asdict

    write_jsonl(path, [asdict(row) for row in rows])


def read_rows_file(path: Path) -> list[PromptRow]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [PromptRow(**json.loads(line)) for line in f if line.strip()]


class RowTable:
    """A worker's view of the run's RL rows, per split, read once from the run folder."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
        self._rows: dict[str, list[PromptRow]] = {}

    def rows(self, split: str) -> list[PromptRow]:
        if split not in self._rows:
            path = self.folder / f"rl_{split}.jsonl" if self.folder else None
            if path is None or not path.is_file():
                raise FileNotFoundError(
                    f"the run's {split} rows ({path or 'no rows folder given'}) are missing: "
                    "the worker must see the run folder (on a cluster, a shared run.output_dir)"
                )
            self._rows[split] = read_rows_file(path)
        return self._rows[split]

    def at(self, split: str, indices: Any) -> list[PromptRow]:
        table = self.rows(split)
        return [table[int(i)] for i in indices]
