"""Training rows of the SFT and reward-model stages, from dataset rows (a user's files, or
the built-in task's demonstrations and pairs written into the run folder as files).

SFT rows are a prompt and its response, or a whole conversation (`data.messages_key`),
which becomes one row per assistant turn: the turns before it are the prompt, the turn
is the response, so every assistant token is trained once and no other token is.
Preference rows are a prompt with a chosen and a rejected response.

A prompt is encoded as the RL prompts are (`prompts.py`: chat messages through the chat
template with the generation prompt, no bos added). A templated row's response is what
the template adds after that prompt for the assistant's turn (its end-of-turn token
included), cut after its first eos; a text row's response is its tokens and eos. The
response ids are kept per row; a batch pads them to the widest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.data.prompts import is_messages, listed, load_template
from orchestrator.data.text import bos_prefix, encode_prompts, pad_id

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class SFTRow:
    prompt: str  # the text that is tokenized (a chat template's output where templated)
    response_ids: list[int]  # ends with eos
    templated: bool = False


@dataclass
class PreferenceRow:
    prompt: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    templated: bool = False


@dataclass
class RowsReport:
    rows: list[Any]
    problems: list[tuple[str, str]]  # (rule, fix)
    too_long: int = 0


class Encoder:
    """Prompts and responses of one tokenizer and chat setting (`data.chat`,
    `data.chat_template`): `prompt(value)` and `response(messages, text)`."""

    def __init__(self, tokenizer: Any, chat: str, chat_template: str | None) -> None:
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


def _turns(conversation: Any) -> list[tuple[list[dict], str]]:
    """(messages before, assistant content) for each assistant turn after the first message."""
    if not is_messages(conversation):
        raise ValueError("is not a list of {role, content} messages")
    out = [(conversation[:i], m["content"]) for i, m in enumerate(conversation)
           if m["role"] == "assistant" and i > 0]  # fmt: skip
    if not out:
        raise ValueError("has no assistant turn after a first message")
    return out


def _response(value: Any) -> str:
    """A chosen or rejected response: text, or messages ending in the assistant's."""
    if isinstance(value, str):
        return value
    if is_messages(value) and value[-1]["role"] == "assistant":
        return value[-1]["content"]
    raise ValueError("is neither text nor messages ending in an assistant turn")


class _Checker:
    """Rows that fit, and the problems found by kind, with row numbers."""

    def __init__(self, enc: Encoder, room: int, max_response: int | None) -> None:
        self.enc, self.room, self.max_response = enc, room, max_response
        self.bad: dict[str, list[str]] = {}
        self.long: list[str] = []

    def add(self, kind: str, what: str) -> None:
        self.bad.setdefault(kind, []).append(what)

    def fits(self, number: int, prompt: str, templated: bool, *responses: list[int]) -> bool:
        p = self.enc.prompt_tokens(prompt, templated)
        r = max(len(x) for x in responses)
        if (self.max_response is not None and r > self.max_response) or p + r > self.room:
            self.long.append(f"row {number}: {p} + {r} tokens")
            return False
        return True

    def report(self, rows: list[Any], too_long: str, fields: str) -> RowsReport:
        problems = [(f"{len(v)} row(s) {k}: {listed(v)}", f"give every row {fields}")
                    for k, v in self.bad.items()]  # fmt: skip
        limit = f"{self.room} positions (the model's context)"
        if self.max_response is not None:
            limit += f", a response at most {self.max_response} tokens (data.max_response_tokens)"
        if self.long and too_long == "error":
            problems.append((f"{len(self.long)} row(s) do not fit: {listed(self.long)}; prompt + "
                             f"response may take {limit}", "shorten them, or pass "
                             "data.too_long=filter to drop them"))  # fmt: skip
        if not problems and not rows:
            problems.append(("no row is left" + (f" ({len(self.long)} too long)" * bool(self.long)),
                             "add rows that fit the model's context"))  # fmt: skip
        if len({r.templated for r in rows}) > 1:
            problems.append(("the prompts mix text and chat messages", "give every prompt in "
                             "one form (data.chat=always renders text as a user message)"))  # fmt: skip
        return RowsReport(rows, problems, len(self.long))


def _present(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is not None


def _fields(row: dict[str, Any]) -> str:
    return f"fields {sorted(k for k, v in row.items() if v is not None)}"


def sft_rows(
    rows: list[dict[str, Any]],
    keys: dict[str, str],
    enc: Encoder,
    room: int,
    max_response: int | None,
    too_long: str,
) -> RowsReport:
    """SFTRows of dataset rows: `keys` names the prompt, response and messages fields."""
    check, out = _Checker(enc, room, max_response), []
    for number, row in enumerate(rows, start=1):
        if _present(row, keys["messages"]):
            try:
                turns = _turns(row[keys["messages"]])
            except ValueError as e:
                check.add(f"whose '{keys['messages']}' {e}", f"row {number}")
                continue
            pairs: list[tuple[Any, str]] = list(turns)
        elif _present(row, keys["prompt"]) and _present(row, keys["response"]):
            pairs = [(row[keys["prompt"]], row[keys["response"]])]
        else:
            check.add(f"have neither '{keys['prompt']}' + '{keys['response']}' nor "
                      f"'{keys['messages']}'", f"row {number} ({_fields(row)})")  # fmt: skip
            continue
        for prompt, response in pairs:
            try:
                text, ids, templated = enc.pair(prompt, response)
            except Exception as e:  # noqa: BLE001 - a template's own errors, said per row
                check.add("cannot be encoded", f"row {number} ({str(e)[:80]})")
                break
            if check.fits(number, text, templated, ids):
                out.append(SFTRow(text, ids, templated))
    fields = (f"'{keys['prompt']}' and '{keys['response']}' (text or chat messages), or a "
              f"'{keys['messages']}' conversation")  # fmt: skip
    return check.report(out, too_long, fields)


def preference_rows(
    rows: list[dict[str, Any]],
    keys: dict[str, str],
    enc: Encoder,
    room: int,
    max_response: int | None,
    too_long: str,
) -> RowsReport:
    """PreferenceRows of dataset rows: `keys` names the prompt, chosen and rejected fields.
    Without a prompt, chosen and rejected are whole conversations that differ only in
    their last (assistant) turn."""
    check, out = _Checker(enc, room, max_response), []
    pk, ck, rk = keys["prompt"], keys["chosen"], keys["rejected"]
    for number, row in enumerate(rows, start=1):
        if not (_present(row, ck) and _present(row, rk)):
            check.add(f"lack '{ck}' or '{rk}'", f"row {number} ({_fields(row)})")
            continue
        chosen, rejected = row[ck], row[rk]
        try:
            if _present(row, pk):
                prompt = row[pk]
            elif is_messages(chosen) and is_messages(rejected) and chosen[:-1] == rejected[:-1]:
                prompt = chosen[:-1]
            else:
                raise ValueError(f"no '{pk}', and '{ck}' and '{rk}' are not conversations that "
                                 "share all but their last turn")  # fmt: skip
            text, cids, templated = enc.pair(prompt, _response(chosen))
            _, rids, _ = enc.pair(prompt, _response(rejected))
        except Exception as e:  # noqa: BLE001 - said per row
            check.add("cannot be encoded", f"row {number} ({str(e)[:100]})")
            continue
        if check.fits(number, text, templated, cids, rids):
            out.append(PreferenceRow(text, cids, rids, templated))
    fields = f"'{ck}' and '{rk}' responses and a '{pk}' (text or chat messages)"
    return check.report(out, too_long, fields)


def write_jsonl(path: Any, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON Lines, atomically (the built-in task's data files in the run folder)."""
    tmp = path.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------- batches


def pad_right(
    tokenizer: Any, seqs: list[list[int]], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, width] (width: the longest, or at least `width`) and mask."""
    w = max(width or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), w), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def sft_batch(tokenizer: Any, rows: list[SFTRow], width: int | None = None) -> dict[str, Any]:
    pids, pmask = encode_prompts(tokenizer, [r.prompt for r in rows], not rows[0].templated)
    rids, rmask = pad_right(tokenizer, [r.response_ids for r in rows], width)
    return {"prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids,
            "response_mask": rmask}  # fmt: skip


def preference_batch(
    tokenizer: Any, rows: list[PreferenceRow], width: int | None = None
) -> dict[str, Any]:
    """Chosen and rejected padded to one width (the widest of both)."""
    pids, pmask = encode_prompts(tokenizer, [r.prompt for r in rows], not rows[0].templated)
    w = max(width or 0, *(len(r.chosen_ids) for r in rows), *(len(r.rejected_ids) for r in rows))
    cids, cmask = pad_right(tokenizer, [r.chosen_ids for r in rows], w)
    rids, rmask = pad_right(tokenizer, [r.rejected_ids for r in rows], w)
    return {"prompt_ids": pids, "prompt_mask": pmask, "chosen_ids": cids, "chosen_mask": cmask,
            "rejected_ids": rids, "rejected_mask": rmask}  # fmt: skip
