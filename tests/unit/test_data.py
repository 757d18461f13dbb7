"""A user's RL data: dataset files through `datasets`, prompts as text or chat messages
(tokenized as the tokenizer's own chat template does), labels and fields handed to reward
functions of either form, the built-in math reward, and each data problem with its row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.data.files import DataFileError, read_rows
from orchestrator.data.prompts import PromptRow, read_prompts
from orchestrator.data.reward_fns import RewardError, call_reward, final_answer, math_reward
from orchestrator.data.text import encode_prompts
from tests.qwen_like import qwen_tokenizer

ROWS = [
    {"prompt": [{"role": "user", "content": "What is 12 plus 30?"}], "label": "42", "level": 1},
    {"prompt": [{"role": "user", "content": "Compute 5 times 6."}], "label": "30", "level": 2},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "disk"])
def test_every_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    from datasets import Dataset

    ds = Dataset.from_list(ROWS)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:
        path = tmp_path / "saved_folder"
        ds.save_to_disk(str(path))
    assert read_rows([str(path)]) == ROWS


def test_file_problems_name_the_file_and_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        read_rows([str(tmp_path / "missing.jsonl")])
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataFileError, match="unknown format '.txt'"):
        read_rows([str(tmp_path / "rows.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataFileError, match="line 2: not valid JSON"):
        read_rows([str(bad)])
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataFileError, match="several splits") as e:
        read_rows([str(tmp_path / "dd")])
    assert str(tmp_path / "dd" / "test") in e.value.fix


def test_chat_prompts_are_the_tokenizers_own_template(tmp_path: Path, tok) -> None:
    """Messages go through apply_chat_template with the generation prompt; the ids the run
    feeds the model are exactly the tokenizer's own, with no bos added (Qwen2 has none)."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    report = read_prompts([str(path)], tok, "prompt", "label", "auto", None, "error", 200)
    assert report.problems == [] and len(report.rows) == 2
    row = report.rows[0]
    assert row.templated and row.label == "42" and row.extras == {"level": 1}
    ids, mask = encode_prompts(tok, [r.text for r in report.rows], add_bos=False)
    for r, i, m in zip(ROWS, ids, mask):
        want = tok.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"]
        assert i[m.bool()].tolist() == want


def test_text_prompts_and_the_chat_modes(tmp_path: Path, tok) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What is 1 plus 2?", "label": 3}])
    plain = read_prompts([str(text)], tok, "prompt", "label", "auto", None, "error", 200)
    assert plain.rows[0].text == "What is 1 plus 2?" and not plain.rows[0].templated
    wrapped = read_prompts([str(text)], tok, "prompt", "label", "always", None, "error", 200)
    assert wrapped.rows[0].text.startswith("<|im_start|>user\nWhat is 1 plus 2?")
    custom = read_prompts([str(text)], tok, "prompt", "label", "always",
                          "Q: {{ messages[0]['content'] }} A:", "error", 200)  # fmt: skip
    assert custom.rows[0].text == "Q: What is 1 plus 2? A:"
    chat = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    never = read_prompts([str(chat)], tok, "prompt", "label", "never", None, "error", 200)
    assert "data.chat=never" in never.problems[0][0]
    both = write_jsonl(tmp_path / "both.jsonl", [*ROWS, {"prompt": "What is 1 plus 2?"}])
    mixed = read_prompts([str(both)], tok, "prompt", "label", "auto", None, "error", 200)
    assert "mix text and chat messages" in mixed.problems[0][0]
    rendered = read_prompts([str(both)], tok, "prompt", "label", "always", None, "error", 200)
    assert rendered.problems == [] and all(r.templated for r in rendered.rows)
    with pytest.raises(DataFileError, match="neither a Jinja template"):
        read_prompts([str(text)], tok, "prompt", "label", "always", "templates/chatm.jinja",
                     "error", 200)  # fmt: skip


def test_row_problems_have_row_numbers(tmp_path: Path, tok) -> None:
    rows = [{"prompt": "fine"}, {"question": "no prompt"}, {"prompt": 7}, {"prompt": "x " * 300},
            {"prompt": ""}]  # fmt: skip
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = read_prompts([str(path)], tok, "prompt", "label", "auto", None, "error", 50)
    rules = " | ".join(rule for rule, _ in report.problems)
    assert "row 2 (fields ['question'])" in rules
    assert "row 3: int 7" in rules
    assert "row 4:" in rules and "at most 50 tokens" in rules
    assert "encode to no tokens (and the tokenizer has no bos token to start them): row 5" in rules
    filtered = read_prompts([str(path)], tok, "prompt", "label", "auto", None, "filter", 50)
    assert filtered.too_long == 1 and "row 4" not in " ".join(r for r, _ in filtered.problems)


def rows_of(*labels: str) -> list[PromptRow]:
    return [PromptRow(f"q{i}", f"q{i}", label, {"level": i}) for i, label in enumerate(labels)]


def test_reward_functions_of_both_forms_get_labels_and_fields() -> None:
    rows = rows_of("42", "7")

    def per_sample(prompt, response, label, level):
        return {"score": float(response == label), "level_seen": level}

    def per_batch(prompts, responses, labels, **fields):
        return {"score": [float(r == lab) for r, lab in zip(responses, labels)],
                "level_seen": fields["level"]}  # fmt: skip

    for fn in (per_sample, per_batch):
        out = call_reward(fn, "f.py:g", rows, ["42", "8"])
        assert out.scores == [1.0, 0.0] and out.extras == {"level_seen": [0.0, 1.0]}
    assert call_reward(lambda p, r: 0.5, "s", rows, ["a", "b"]).scores == [0.5, 0.5]
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        call_reward(lambda prompts, responses: [1.0], "s", rows, ["a", "b"])
    with pytest.raises(RewardError, match="without a number under 'score'"):
        call_reward(lambda p, r: {"value": 1.0}, "s", rows, ["a", "b"])


@pytest.mark.parametrize(
    "response,label,correct",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),  # equal as expressions: math-verify
        ("The answer is: 42 apples.", "42", True),
        ("12 + 30 = 42. The answer is 42.", "42", True),
        ("so we get \\boxed{1,234}", "1234", True),
        ("Tom has 7 apples.\n#### 7", "He buys 4 more: 3 + 4 = 7\n#### 7", True),
        ("I think 41", "42", False),
        ("no number at all", "42", False),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ],
)
def test_math_reward(response: str, label: str, correct: bool) -> None:
    out = math_reward("q", response, label)
    assert out["score"] == float(correct) and out["correct"] == float(correct)


def test_final_answer_prefers_the_boxed_one() -> None:
    assert final_answer("first 3, then \\boxed{x^{2}} and 5") == "x^{2}"
    assert final_answer("nothing") is None


def test_the_reward_call_reads_each_samples_row_through_its_index(tmp_path: Path, tok) -> None:
    """The reward interface looks each sample's row up by prompt_index (ReMax's greedy
    call by unique_prompt_index, mapped by position): the function gets that row's label."""
    from algos.ppo import ALGORITHM_GRAPHS
    from orchestrator.data.prompts import RowTable, write_rows
    from orchestrator.data.reward_fns import LoadedReward, RewardMix
    from orchestrator.data.text import encode_responses
    from orchestrator.data.user_data import load_reward_function
    from orchestrator.interfaces.lookup import get_interface
    from orchestrator.interfaces.registry import WorkerContext

    for make in ALGORITHM_GRAPHS.values():
        graph = make()
        assert "prompt_index" in graph.dataset_keys
        assert all(c.inputs[-1].endswith("prompt_index") for c in graph.calls
                   if c.interface == "reward")  # fmt: skip
    rows = [PromptRow(f"q{i}", f"q{i}", str(10 * i)) for i in range(4)]
    write_rows(tmp_path / "rl_train.jsonl", rows)
    (tmp_path / "f.py").write_text(
        "def score(prompts, responses, labels):\n"
        "    return [float(r == lab) for r, lab in zip(responses, labels)]\n"
    )
    mix = RewardMix((f"{tmp_path / 'f.py'}:score",), (1.0,))
    reward = LoadedReward(mix, load_reward_function)
    ctx = WorkerContext("reward", None, tok, None, rows=RowTable(str(tmp_path)), task_rows=False,
                        reward=reward)  # fmt: skip
    index = torch.tensor([3, 1, 1, 0])
    ids, mask = encode_prompts(tok, [rows[i].text for i in index])
    rids, rmask = encode_responses(tok, ["30", "10", "11", "0"], width=4)
    remax = ALGORITHM_GRAPHS["remax"]()
    for call in (c for c in remax.calls if c.interface == "reward"):
        batch = dict(zip(call.inputs, (ids, mask, rids, rmask, index)))
        options = {"inputs": call.inputs, "outputs": call.outputs, **call.options}
        out, metrics = get_interface("reward")(ctx, batch, options)
        assert out[call.outputs[0]].tolist() == [1.0, 1.0, 0.0, 1.0], call.name


def test_answers_compare_as_numbers_without_math_verify(monkeypatch) -> None:
    import sys

    from orchestrator.data.reward_fns import answers_equal

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails: the parser alone
    assert answers_equal("1,234", "1234") and answers_equal("$7.0", "7")
    assert not answers_equal("0.5", "\\frac{1}{2}") and not answers_equal("41", "42")


def test_the_config_check_reads_your_files_and_a_resume_refuses_changed_ones(
    tmp_path: Path,
) -> None:
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError
    from orchestrator.run.folder import RunError, prepare
    from tests.qwen_like import qwen_folder

    folder = qwen_folder(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", ROWS * 40)
    ok = [f"model.path={folder}", f"data.train_files=['{train}']", "sft.enabled=false",
          "reward=function", "reward.function=math", f"run.output_dir={tmp_path / 'runs'}"]  # fmt: skip

    def problems(*extra: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config([*ok, *extra])
        return "\n".join(str(p) for p in err.value.problems)

    assert "data.train_files = " in problems(f"data.train_files=['{tmp_path / 'no.jsonl'}']")
    assert "no such file" in problems(f"data.train_files=['{tmp_path / 'no.jsonl'}']")
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "What is 1 plus 1?"}] * 80)
    assert "data.label_key = 'label': the math reward needs a label" in problems(
        f"data.train_files=['{unlabelled}']"
    )
    ruled_out = problems("sft.enabled=true", "reward=verifier", "task.prompt_file=x.jsonl")
    for field in ("sft.enabled = True", "reward.source = 'verifier'", "task.prompt_file = "):
        assert field in ruled_out
    assert "data.chat = 'sometimes'" in problems("data.chat=sometimes")

    cfg = load_config(ok)
    root = Path(cfg.run.output_dir) / cfg.run.name
    prepare(cfg, root)
    prepare(load_config(ok), root)  # the same files: reopened
    write_jsonl(train, list(reversed(ROWS)) * 40)
    with pytest.raises(RunError, match=r"data file .*train.jsonl \(contents\)"):
        prepare(load_config(ok), root)


def test_the_data_position_is_where_take_stands() -> None:
    from orchestrator.data.text import data_position, take

    items = list(range(10))
    assert data_position(10, 4, 3, seed=5) == {"epoch": 1, "index": 2, "seed": 5, "rows": 10}
    # the next step reads on from there: the second epoch's permutation from index 2
    from orchestrator.data.text import epoch_order

    assert take(items, 4, 3, seed=5) == [items[i] for i in epoch_order(10, 5, 1)[2:6]]


def test_several_reward_functions_are_summed_with_their_weights() -> None:
    from orchestrator.data.reward_fns import LoadedReward, RewardMix
    from orchestrator.data.user_data import load_reward_function

    rows = rows_of("42", "7")
    mix = LoadedReward(RewardMix(("math", "format"), (1.0, 0.25)), load_reward_function)
    out = mix(rows, ["The answer is 42.", "maybe 8"])
    assert out.scores == [1.25, 0.0]
    assert out.extras["math/score"] == [1.0, 0.0] and out.extras["format/score"] == [1.0, 0.0]
    assert out.extras["correct"] == [1.0, 0.0]  # the math reward's, the first to say


def test_a_reward_call_that_takes_too_long_fails_the_call(tmp_path: Path) -> None:
    from orchestrator.data.reward_fns import LoadedReward, RewardMix
    from orchestrator.data.user_data import load_reward_function

    (tmp_path / "slow.py").write_text(
        "import time\n\ndef score(prompt, response):\n    time.sleep(0.5)\n    return 1.0\n"
    )
    spec = f"{tmp_path / 'slow.py'}:score"
    quick = LoadedReward(RewardMix((spec,), (1.0,), timeout_s=5.0), load_reward_function)
    assert quick(rows_of("1"), ["1"]).scores == [1.0]
    slow = LoadedReward(RewardMix((spec,), (1.0,), timeout_s=0.1), load_reward_function)
    with pytest.raises(RewardError, match="took longer than reward.timeout_s = 0.1 s"):
        slow(rows_of("1"), ["1"])


def test_reward_mix_settings_are_checked() -> None:
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError

    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(["reward=function", *overrides])
        return "\n".join(str(p) for p in err.value.problems)

    assert "reward.weights = [1.0]: one weight per function (2 given)" in problems(
        "reward.functions=[math,format]", "reward.weights=[1.0]"
    )
    assert "reward.timeout_s = 0.0: must be > 0" in problems("reward.function=math",
                                                            "reward.timeout_s=0")  # fmt: skip
    assert "reward.functions = 'nope': must have the form" in problems("reward.functions=[nope]")
    both = problems("reward.function=math", "reward.functions=[format]")
    assert "reward.function and reward.functions are alternatives" in both
    cfg = load_config(["reward=function", "reward.functions=[math,format]",
                       "reward.weights=[1.0,0.2]", "reward.timeout_s=30"])  # fmt: skip
    assert cfg.reward.functions == ["math", "format"] and cfg.reward.timeout_s == 30.0


def test_qwen2_biases_are_tensors_the_planner_moves() -> None:
    """Every weight of a Qwen2 model (biases on q, k and v) is a tensor of the planner's
    list, with its shape: reallocation and the tensor-parallel loader know them all."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from planner.catalogue import shape_from_hf_config
    from planner.realloc import model_tensors

    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    specs = {t.name: t for t in model_tensors(shape_from_hf_config("q", config.to_dict()))}
    params = dict(model.named_parameters())
    assert set(params) == set(specs)
    for name, p in params.items():
        assert tuple(p.shape) == specs[name].shape, name
    assert specs["model.layers.0.self_attn.k_proj.bias"].split_dim == 0


def test_the_workers_get_built_in_rewards_by_name_and_files_by_absolute_path() -> None:
    from types import SimpleNamespace

    from orchestrator.config.load import load_config
    from orchestrator.run.specs import reward_mix

    cfg = load_config(["reward=function", "reward.functions=[math,examples/rewards.py:sorted_digits]",
                       "reward.weights=[1.0,0.5]"])  # fmt: skip
    mix = reward_mix(SimpleNamespace(cfg=cfg))
    assert mix.specs[0] == "math" and Path(mix.specs[1].split(":")[0]).is_absolute()
    assert mix.weights == (1.0, 0.5)
    one = reward_mix(SimpleNamespace(cfg=load_config(["reward=function", "reward.function=math"])))
    assert one.specs == ("math",) and one.weights == (1.0,)


def test_the_planner_sizes_prompts_by_your_longest_row(tmp_path: Path) -> None:
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import workload
    from tests.qwen_like import qwen_folder

    model = qwen_folder(tmp_path / "model", context=256)
    rows = [{"prompt": [{"role": "user", "content": "What is 12 plus 30? " * k}], "label": "1"}
            for k in (1, 6, 2)]  # fmt: skip
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = load_config([f"model.path={model}", f"data.train_files=[{path}]", "sft.enabled=false",
                       "reward=function", "reward.function=math", "train.rollout_batch_prompts=2",
                       "train.mini_batch_samples=2", "train.micro_batch_samples_per_device=2"])  # fmt: skip
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(model)  # as the run loads it (Qwen2's own class)
    longest = len(
        own.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True)["input_ids"]
    )
    assert workload(cfg).call("actor_gen").prompt_tokens == longest
