"""Your model, your data, your reward through `relay train`: a Qwen2-architecture folder
(no bos token, a chat template, biases on q/k/v) sampled by vLLM, JSONL prompts given as chat messages with labels and an
extra field, and a batch reward function that reads the labels and returns a dict; GRPO
runs on them (responses ending at a stop string) and logs the function's extra values. Bad rows stop the run before anything
starts (exit 2, the row named, no run folder)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.run.tracking import read_metrics
from tests.integration.tiny import ONE_DEVICE, tiny_overrides
from tests.qwen_like import qwen_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

REWARD = """
import json
from pathlib import Path

HERE = Path(__file__).parent


def score(prompts, responses, labels, level):
    with open(HERE / "seen.jsonl", "a") as f:
        for p, lab, r in zip(prompts, labels, responses):
            f.write(json.dumps({"prompt": p, "label": lab, "response": r}) + "\\n")
    correct = [float(r.strip() == lab) for r, lab in zip(responses, labels)]
    return {"score": [c + 0.01 * len(r) for c, r in zip(correct, responses)],
            "correct": correct, "level": level}
"""


def problems(rng: random.Random, n: int, form: str = "What is {a} plus {b}?") -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        messages = [{"role": "user", "content": form.format(a=a, b=b)}]
        rows.append({"prompt": messages, "label": str(a + b), "level": a % 3})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen_folder(tmp_path_factory.mktemp("qwen") / "model")


def overrides(tmp_path: Path, folder: Path, train: Path, *extra: str) -> list[str]:
    (tmp_path / "reward.py").write_text(REWARD)
    return tiny_overrides(
        tmp_path, "yours", 2,
        f"model.path={folder}", f"data.train_files=['{train}']",
        "sft.enabled=false", "reward=function", f"reward.function={tmp_path / 'reward.py'}:score",
        "algo=grpo", "train.rollout_batch_prompts=4", "train.samples_per_prompt=4",
        "generate.max_new_tokens=8", ONE_DEVICE, *extra,
    )  # fmt: skip


def test_grpo_on_your_model_data_and_reward(tmp_path: Path, folder: Path) -> None:
    rng = random.Random(0)
    train = write_jsonl(tmp_path / "train.jsonl", problems(rng, 24))
    evals = write_jsonl(tmp_path / "eval.jsonl", problems(rng, 6, "Add {a} and {b}."))
    out = relay("train", *overrides(tmp_path, folder, train, f"data.eval_files=['{evals}']",
                                    "generate.backend=vllm", "generate.stop=[e]"))  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "yours" / "metrics.jsonl") if r["stage"] == "rl"]
    steps = [r for r in rows if "rollout/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # the function's "correct" is the accuracy, its other values metrics
        assert 0.0 <= r["rollout/task_accuracy"] <= 1.0
        assert 0.0 <= r["rollout/reward_fn/level"] <= 2.0
        assert "rollout/verifier_reward_mean" not in r  # no task verifier for your data
        assert r["rollout/logprob_diff"] < 1e-4  # vLLM sampled: its log-probs against the trainer's
    assert any("eval/greedy_accuracy" in r and "eval/sampled_reward" in r for r in rows)
    # the function's other values on the held-out prompts too
    assert any(0.0 <= r.get("eval/greedy_reward_fn/level", -1) <= 2.0 for r in rows)
    # the function saw the rows' own prompts (messages) and labels, 16 per step, and the
    # evaluation's 6 prompts scored by it too (greedy and sampled, at steps 0 and 2)
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    train_rows = {json.dumps(r["prompt"]): r["label"] for r in problems(random.Random(0), 24)}
    rl_seen = [s for s in seen if json.dumps(s["prompt"]) in train_rows]
    assert len(rl_seen) == 2 * 16
    assert all(train_rows[json.dumps(s["prompt"])] == s["label"] for s in rl_seen)
    assert len(seen) - len(rl_seen) == 2 * 2 * 6
    # vLLM stopped at the stop string: its first "e" is in the response's last token
    cut = [s["response"] for s in seen if "e" in s["response"]]
    assert cut and all(len(r) - r.index("e") <= 12 for r in cut), cut


def test_bad_rows_stop_before_anything_starts(tmp_path: Path, folder: Path) -> None:
    rows = problems(random.Random(1), 8)
    rows[2] = {"question": "What is 1 plus 1?", "label": "2"}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = relay("train", *overrides(tmp_path, folder, train))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "data.train_files" in out.stderr and "row 3" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "yours").exists()


def test_sft_reward_model_and_grpo_on_your_parquet_files(tmp_path: Path, folder: Path) -> None:
    """The whole pipeline on a user's files, Parquet this time, with the no-bos chat model:
    SFT on conversations (one row per assistant turn), a reward model on preference pairs
    of messages, then GRPO scored by that reward model."""
    from datasets import Dataset

    rng = random.Random(2)
    convs, prefs = [], []
    for row in problems(rng, 24):
        answer = {"role": "assistant", "content": row["label"]}
        convs.append({"messages": [*row["prompt"], answer]})
        wrong = str(int(row["label"]) + 1)
        prefs.append({"prompt": row["prompt"], "chosen": [answer],
                      "rejected": [{"role": "assistant", "content": wrong}]})  # fmt: skip
    paths = {}
    for name, rows in (("train", problems(rng, 24)), ("sft", convs), ("prefs", prefs)):
        paths[name] = tmp_path / f"{name}.parquet"
        Dataset.from_list(rows).to_parquet(str(paths[name]))
    out = relay("train", *tiny_overrides(
        tmp_path, "pipeline", 2,
        f"model.path={folder}", f"data.train_files=['{paths['train']}']",
        f"data.sft_files=['{paths['sft']}']", f"data.preference_files=['{paths['prefs']}']",
        f"data.preference_eval_files=['{paths['prefs']}']",
        "sft.batch_samples=8", "sft.micro_batch_samples_per_device=8", "sft.lr=3e-3",
        "reward.batch_pairs=8", "reward.micro_batch_pairs_per_device=8",
        "algo=grpo", "train.rollout_batch_prompts=4", "train.samples_per_prompt=4",
        "generate.max_new_tokens=8", ONE_DEVICE,
    ))  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "pipeline"
    rows = read_metrics(run / "metrics.jsonl")
    sft = [r["loss/sft"] for r in rows if r["stage"] == "sft" and "loss/sft" in r]
    assert len(sft) == 10 and sft[-1] < sft[0]  # it learns the answers
    assert any("eval/reward_model_accuracy" in r for r in rows if r["stage"] == "reward_model")
    assert [r["step"] for r in rows if r["stage"] == "rl" and "rollout/reward_mean" in r] == [1, 2]
    for folder_name in ("sft", "reward"):
        assert (run / "models" / folder_name / "DONE").is_file()
    # the conversations' assistant turns, as the run folder has no task data of its own
    assert not (run / "data" / "sft_train.jsonl").exists()
