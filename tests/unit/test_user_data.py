"""A user's prompt file and reward function: every bad input is refused with the field,
the value, the rule (with line numbers for the file) and the fix, before any run folder
is touched; a reward that raises or is not finite becomes a RewardError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launch.cli import main
from orchestrator.config.load import load_config
from orchestrator.config.schema import ConfigError
from orchestrator.data.tasks import SortTask
from orchestrator.data.user_data import (
    RewardError,
    call_reward_function,
    check_finite,
    load_reward_function,
    read_prompt_file,
)

# the default task: sort with 8 digits; prompts look like "S31204567="
GOOD = ["S31204567=", "S00000000=", "S98765432="]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def prompts_file(path: Path, prompts: list[str]) -> str:
    return write_lines(path, [json.dumps({"prompt": p}) for p in prompts])


def problems(overrides: list[str]) -> dict[str, list[str]]:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    out: dict[str, list[str]] = {}
    for p in err.value.problems:
        out.setdefault(p.field, []).append(f"{p.rule} | {p.fix}")
    return out


def test_a_good_file_reads_every_prompt_in_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": p}) for p in GOOD] + [""])
    task = SortTask(8)
    report = read_prompt_file(path, task.answer, len, context=64, max_new_tokens=12)
    assert report.ok and report.prompts == GOOD
    cfg = load_config([f"task.prompt_file={path}", "train.rollout_batch_prompts=2",
                       "train.mini_batch_samples=2", "train.micro_batch_samples_per_device=2"])  # fmt: skip
    assert cfg.task.prompt_file == path


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": GOOD[0]}),
        '{"prompt": "S12345678="',  # line 2: truncated JSON
        json.dumps({"text": GOOD[1]}),  # line 3: no prompt key
        "",  # blank lines are skipped but counted
        json.dumps([GOOD[2]]),  # line 5: not an object
        json.dumps({"prompt": 7}),  # line 6: not a string
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    found = problems([f"task.prompt_file={path}"])["task.prompt_file"]
    (text,) = found
    assert text.startswith("4 malformed line(s): line 2: not valid JSON")
    assert "line 3: needs a \"prompt\" string (got keys ['text'])" in text
    assert 'line 5: needs a "prompt" string (got a list)' in text
    assert "line 6" in text and "line 1" not in text
    assert 'like {"prompt": "S' in text  # the fix shows a line of the right form


def test_long_prompts_name_the_lines_and_the_limit(tmp_path: Path) -> None:
    path = prompts_file(tmp_path / "long.jsonl", [GOOD[0], "S" + "1" * 80 + "=", GOOD[1]])
    (text,) = problems([f"task.prompt_file={path}"])["task.prompt_file"]
    # bos + 82 tokens + 12 new tokens > 64 positions: at most 64 - 1 - 12 = 51 tokens
    assert "1 prompt(s) longer than the model's context allows: line 2: 82 tokens" in text
    assert "must fit in 64 positions, so at most 51 tokens" in text
    assert "generate.max_new_tokens" in text.split("|")[1]


def test_prompts_of_another_task_are_refused(tmp_path: Path) -> None:
    path = prompts_file(tmp_path / "add.jsonl", [GOOD[0], "A12345678+00000001="])
    (text,) = problems([f"task.prompt_file={path}"])["task.prompt_file"]
    assert "1 prompt(s) the 'sort' task cannot score: line 2: 'A12345678+00000001='" in text


def test_an_empty_or_missing_file(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    (text,) = problems([f"task.prompt_file={empty}"])["task.prompt_file"]
    assert text.startswith("holds no prompts")
    (text,) = problems([f"task.prompt_file={tmp_path / 'nope.jsonl'}"])["task.prompt_file"]
    assert text.startswith("no such file")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    (text,) = problems([f"task.prompt_file={tmp_path / 'bin.jsonl'}"])["task.prompt_file"]
    assert text.startswith("is not UTF-8 text")


def test_fewer_prompts_than_a_rollout_batch(tmp_path: Path) -> None:
    path = prompts_file(tmp_path / "few.jsonl", GOOD)
    (text,) = problems([f"task.prompt_file={path}"])["task.prompt_file"]
    assert "holds 3 prompts, fewer than train.rollout_batch_prompts (64)" in text


def test_a_bad_prompt_file_exits_non_zero_and_leaves_the_run_folder_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "kept"
    run.mkdir(parents=True)
    (run / "relay_run.json").write_text("{}")
    before = {p: p.read_bytes() for p in run.iterdir()}
    path = write_lines(tmp_path / "bad.jsonl", ["not json"])
    code = main(["train", f"task.prompt_file={path}", f"run.output_dir={tmp_path / 'runs'}",
                 "run.name=kept"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"task.prompt_file = '{path}': 1 malformed line(s): line 1: not valid JSON" in err
    assert {p: p.read_bytes() for p in run.iterdir()} == before


# ----------------------------------------------------------------- reward functions


def test_a_reward_file_may_define_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "scored.py"
    path.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Weights:\n"
                    "    length: float = 0.1\n\ndef score(prompt, response):\n"
                    "    return Weights().length * len(response)\n")  # fmt: skip
    assert load_reward_function(f"{path}:score")("S1=", "12") == 0.2


def test_reward_function_specs(tmp_path: Path) -> None:
    good = tmp_path / "rewards.py"
    good.write_text("LIMIT = 3\n\ndef score(prompt, response):\n    return len(response) / 8\n")
    fn = load_reward_function(f"{good}:score")
    assert fn("S1=", "12") == 0.25
    for spec, message in [
        ("score", "must have the form"),
        (f"{tmp_path}/missing.py:score", "does not exist"),
        (f"{good}:nothing", "has no attribute 'nothing'"),
        (f"{good}:LIMIT", "is a int, not a function"),
        ("no_such_module_xyz:score", "importing module 'no_such_module_xyz' failed"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_reward_function(spec)
    broken = tmp_path / "broken.py"
    broken.write_text("def score(:\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed: SyntaxError"):
        load_reward_function(f"{broken}:score")


def test_reward_function_config_rules(tmp_path: Path) -> None:
    found = problems(["reward=function"])
    assert "reward.source=function needs a function" in found["reward.function"][0]
    found = problems(["reward.function=x.py:f"])
    assert "used only with reward.source=function" in found["reward.function"][0]
    found = problems(["reward=function", f"reward.function={tmp_path}/gone.py:f"])
    assert "does not exist" in found["reward.function"][0]
    found = problems(["reward.on_error=retry"])
    assert "unknown reward error policy" in found["reward.on_error"][0]
    good = tmp_path / "r.py"
    good.write_text("def f(prompt, response):\n    return 1.0\n")
    cfg = load_config(["reward=function", f"reward.function={good}:f", "reward.on_error=skip"])
    assert cfg.reward.source == "function" and cfg.reward.on_error == "skip"


def test_reward_errors_name_the_sample() -> None:
    pairs = [("S21=", "12"), ("S43=", "34")]

    def raises(prompt: str, response: str) -> float:
        if prompt == "S43=":
            raise ZeroDivisionError("division by zero")
        return 1.0

    with pytest.raises(RewardError, match=r"f.py:g raised ZeroDivisionError: division by zero "
                       r"\(prompt 'S43=', response '34'\)"):  # fmt: skip
        call_reward_function(raises, "f.py:g", pairs)
    with pytest.raises(RewardError, match=r"returned 'high' \(a str\)"):
        call_reward_function(lambda p, r: "high", "f.py:g", pairs)
    with pytest.raises(RewardError, match=r"returned True \(a bool\)"):
        call_reward_function(lambda p, r: True, "f.py:g", pairs)
    with pytest.raises(RewardError, match=r"\(a int\)"):  # too large for a float
        call_reward_function(lambda p, r: 10**400, "f.py:g", pairs)
    import numpy as np
    import torch

    assert call_reward_function(lambda p, r: np.float32(0.5), "s", pairs) == [0.5, 0.5]
    assert call_reward_function(lambda p, r: torch.tensor(2), "s", pairs) == [2.0, 2.0]
    values = call_reward_function(lambda p, r: math.nan if r == "34" else 0.0, "s", pairs)
    with pytest.raises(RewardError, match=r"the reward model returned nan for 1 of 2 samples "
                       r"\(first: prompt 'S43=', response '34'\)"):  # fmt: skip
        check_finite(values, pairs, "the reward model")
    check_finite([0.0, -1.5], pairs, "the reward model")  # finite scores pass


def test_the_example_reward_function() -> None:
    fn = load_reward_function("examples/rewards.py:sorted_digits")
    assert fn("S3120=", "0123") == 1.0
    assert fn("S3120=", "0132") == 0.5 * 4 / 4 - 0.5  # right digits, out of order
    assert fn("S3120=", "0124") == 0.5 * 3 / 4  # sorted, one digit wrong
    assert fn("S3120=", "") == 0.0


def prepare_of(cfg):
    """Make or reopen the config's run folder (as `relay train` does first)."""
    from orchestrator.run.folder import prepare

    return prepare(cfg, Path(cfg.run.output_dir) / cfg.run.name)


def test_resume_refuses_a_prompt_file_whose_contents_changed(tmp_path: Path) -> None:
    from orchestrator.run.folder import RunError

    path = prompts_file(tmp_path / "p.jsonl", GOOD * 22)  # 66 prompts: a rollout batch
    overrides = [f"task.prompt_file={path}", f"run.output_dir={tmp_path / 'runs'}"]
    prepare_of(load_config(overrides))  # makes the run folder and its marker
    prepare_of(load_config(overrides))  # the same file: reopens it
    prompts_file(tmp_path / "p.jsonl", list(reversed(GOOD)) * 22)
    with pytest.raises(RunError, match=r"task.prompt_file \(contents\): 'sha256 [0-9a-f]{12}'"):
        prepare_of(load_config(overrides))
    first = json.loads((tmp_path / "runs" / "ppo-sort" / "relay_run.json").read_text())
    allowed = [*overrides, "run.allow_config_change=true"]  # accepted; the marker keeps
    marker = prepare_of(load_config(allowed))  # the contents it was made with
    assert marker["prompt_file_sha256"] == first["prompt_file_sha256"]
