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

from dataclasses import dataclass
from typing import Any

from orchestrator.data.prompts import Encoder, is_messages, listed
from orchestrator.data.text import encode_prompts, pad_right

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


# ------------------------------------------------------------------- batches


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
