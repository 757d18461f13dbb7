"""The PPO graph on a real DeviceWorker in the test's process, without Ray (every role on
one device): the same worker code on CPU here and on a CUDA GPU (DeepSpeed over NCCL)
where one is present."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from algos.ppo import ppo_graph
from orchestrator.config.schema import AlgoConfig
from orchestrator.data.tasks import make_task
from orchestrator.data.text import encode_prompts
from orchestrator.engines.generate import SamplingParams
from orchestrator.engines.train import OptimSpec
from orchestrator.models.hf import build_model_folder, load_causal_lm, train_tokenizer
from orchestrator.workers.spec import RoleSpec
from tests.integration.local_device import LocalDevice, task_rows

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def make_workers(folder: Path, device: str, zero_stage: int) -> LocalDevice:
    """Every PPO role on one device; the run's rows are read from folder/../data."""
    optim = OptimSpec(1e-3, 1, 0.0, 1.0, zero_stage, 8, 4)
    common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4,
                  rows_folder=str(folder.parent / "data"))  # fmt: skip
    specs = [
        RoleSpec("actor", "causal", str(folder), optim=optim, generation_backend="hf", **common),
        RoleSpec("ref", "causal", str(folder), **common),
        RoleSpec("critic", "value", str(folder), optim=optim, **common),
        RoleSpec("reward", "verifier", None, **common),
    ]
    return LocalDevice(specs, device)


def rollout(workers: LocalDevice, dataset: dict, opts: dict) -> dict[str, dict]:
    """Every inference and generate call of the PPO graph, in order; the reward is replaced
    by random scores (an untrained model scores 0 everywhere: zero advantages)."""
    graph = ppo_graph()
    outputs: dict[str, dict] = {}
    for call in graph.order:
        if call.kind.value != "train":
            inputs = [dataset] + [outputs[p] for p in graph.parents(call)]
            outputs[call.name], _ = workers.run(call, opts, *inputs)
    outputs["reward_inf"]["scores"] = torch.rand(16, generator=torch.Generator().manual_seed(0))
    return outputs


def actor_train_inputs(tmp_path: Path, seed: int) -> tuple[Path, object, list, dict, dict]:
    """A tiny model folder and one PPO rollout of 16 prompts on fresh workers: returns
    (folder, actor_train call, its inputs, the rollout's outputs, the call options)."""
    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "base", seed=0, max_position_embeddings=32)
    workers = make_workers(folder, "cpu", 0)
    rng = random.Random(seed)
    prompts = [task.sample_prompt(rng) for _ in range(16)]
    dataset = task_rows(tok, task, prompts, tmp_path / "data")
    opts = {"seed": 0, "sampling": SamplingParams(6, seed=0), "kl_coef": 0.02,
            "algo": AlgoConfig(), "temperature": 1.0}  # fmt: skip
    outputs = rollout(workers, dataset, opts)
    graph = ppo_graph()
    train = graph.call("actor_train")
    inputs = [dataset] + [outputs[p] for p in graph.parents(train)]
    return folder, train, inputs, outputs, opts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_ppo_graph_on_workers(tmp_path: Path, device: str, zero_stage: int) -> None:
    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "base", seed=0, max_position_embeddings=32)
    workers = make_workers(folder, device, zero_stage)
    graph = ppo_graph()
    before = workers.state_dict("actor")
    rng = random.Random(0)
    prompts = [task.sample_prompt(rng) for _ in range(32)]
    every = task_rows(tok, task, prompts, tmp_path / "data")
    task_rows(tok, task, prompts[:8], tmp_path / "data", "eval")
    for step in range(2):
        dataset = {k: v[step * 16 : (step + 1) * 16] for k, v in every.items()}
        outputs: dict[str, dict] = {}
        metrics: dict[str, float] = {}
        for call in graph.order:
            opts = {
                "seed": step,
                "sampling": SamplingParams(6, seed=step),
                "kl_coef": 0.02,
                "algo": AlgoConfig(kl_in_loss=zero_stage == 1),
            }
            inputs = [dataset] + [outputs[p] for p in graph.parents(call)]
            outputs[call.name], m = workers.run(call, opts, *inputs)
            metrics.update(m)
        for key in ("loss/policy", "loss/value", "rollout/reward_mean", "train/grad_norm_actor"):
            assert math.isfinite(metrics[key]), key
        assert ("train/kl_loss" in metrics) == (zero_stage == 1)
        assert all(v.device.type == "cpu" for v in outputs["actor_gen"].values())
    after = workers.state_dict("actor")
    assert any(not torch.equal(before[k].cpu(), after[k].cpu()) for k in before)
    # save, then restore into fresh workers: identical weights
    workers.save("actor", tmp_path / "ckpt")
    fresh = make_workers(folder, device, zero_stage)
    fresh.load("actor", tmp_path / "ckpt")
    restored = fresh.state_dict("actor")
    for k in after:
        assert torch.equal(after[k].cpu(), restored[k].cpu()), k
    acc = fresh.evaluate(8, SamplingParams(6, greedy=True))
    assert 0.0 <= acc["accuracy"] <= 1.0


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_x_accumulation_invariance(tmp_path: Path, loss_agg: str) -> None:
    """A PPO actor train call (16 samples, two Adam steps of mini-batch 8) with each
    mini-batch as 1 x 8, as 2 x 4 (gradient accumulation), or as micro-batches of a token
    budget (rows of similar lengths together, their padding cut, as many as it takes)
    gives the same weights: the loss is over the whole mini-batch. (Adam's first step is
    nearly sign(g), so the second step is what tells the gradients' magnitudes apart.)"""
    from orchestrator.models.batch import token_micro_batches

    folder, train, inputs, outputs, opts = actor_train_inputs(tmp_path, 1)
    opts = {**opts, "algo": AlgoConfig(loss_agg=loss_agg)}
    # responses of different lengths make micro means differ from the mini-batch mean
    lengths = outputs["actor_gen"]["response_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1
    budget = 40
    mini = {"prompt_mask": inputs[0]["prompt_mask"][:8], "response_mask": lengths[:8, None]
            >= torch.arange(1, lengths.max() + 1)}  # fmt: skip
    sizes = [len(m) for m in token_micro_batches(mini, 1, 0, budget)]
    assert len(sizes) > 2 and len(set(sizes)) > 1, sizes  # unequal micro-batches
    results = []
    for micro, tokens in ((8, 0), (4, 0), (8, budget)):
        common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4)
        optim = OptimSpec(1e-3, 1, 0.0, 1e9, 0, 8, micro, micro_batch_tokens=tokens)
        spec = RoleSpec("actor", "causal", str(folder), optim=optim, generation_backend="hf",
                        **common)  # fmt: skip
        worker = LocalDevice([spec])
        worker.run(train, opts, *inputs)
        results.append(worker.state_dict("actor"))
    initial = load_causal_lm(folder).state_dict()
    assert any(not torch.equal(initial[k], results[0][k]) for k in initial), "nothing trained"
    # Tolerance: the two sum in different orders (~1e-7 apart); Adam divides by sqrt(v),
    # which magnifies that where v is tiny: up to 3.4e-5 (3% of one step of lr 1e-3) at one
    # weight of 49,152 on this machine. A mean of micro-batch means is off by ~4e-3 here.
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(results[0][k], other[k], rtol=1e-4, atol=1e-4)


def _sft_step(folder: Path, micro: int, strategy: str, batch: dict) -> dict[str, torch.Tensor]:
    from algos.ppo import sft_graph
    from orchestrator.config.schema import ReweightConfig

    common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4)
    spec = RoleSpec("actor", "causal", str(folder), optim=OptimSpec(1e-3, 1, 0.0, 1e9, 0, 8, micro),
                    **common)  # fmt: skip
    worker = LocalDevice([spec])
    opts = {"seed": 0, "step": 5, "reweight": ReweightConfig(strategy=strategy, temperature=0.4)}
    worker.run(sft_graph().call("actor_sft"), opts, batch)
    return worker.state_dict("actor")


def test_reweighted_sft_is_invariant_to_micro_batches_and_differs_from_uniform(
    tmp_path: Path,
) -> None:
    """LinUpper reweighting of an SFT step (16 demonstrations, two Adam steps of 8) gives
    the same weights with each mini-batch as 1 x 8 or 2 x 4: the weights and the token
    normaliser are the mini-batch's. And it is not the uniform (plain) step."""
    from orchestrator.data.text import encode_responses

    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "base", seed=0, max_position_embeddings=32)
    rng = random.Random(2)
    prompts = [task.sample_prompt(rng) for _ in range(16)]
    answers = [task.demonstration(p, rng, 0.5)[: rng.randint(1, 4)] for p in prompts]
    ids, mask = encode_prompts(tok, prompts)
    rids, rmask = encode_responses(tok, answers, 5)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "response_ids": rids, "response_mask": rmask}
    whole = _sft_step(folder, 8, "linupper", batch)
    split = _sft_step(folder, 4, "linupper", batch)
    uniform = _sft_step(folder, 8, "uniform", batch)
    for k in whole:  # same tolerance reasoning as the PPO invariance test above
        torch.testing.assert_close(whole[k], split[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(whole[k], uniform[k], atol=1e-5) for k in whole)


def test_one_expert_pmoe_trains_exactly_like_the_plain_policy(tmp_path: Path) -> None:
    """K = 1 reproduces the plain policy bit for bit: the same PPO actor train call (with
    gradient clipping on) on a plain actor and on a one-expert PMOE actor."""
    from orchestrator.config.schema import PolicyConfig

    folder, train, inputs, outputs, opts = actor_train_inputs(tmp_path, 3)
    results = []
    for experts in (None, 1):
        common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4)
        spec = RoleSpec("actor", "causal", str(folder), optim=OptimSpec(1e-3, 1, 0.0, 0.5, 0, 8, 8),
                        generation_backend="hf", policy_experts=experts, **common)  # fmt: skip
        worker = LocalDevice([spec])
        policy = PolicyConfig(kind="pmoe" if experts else "plain", num_experts=1)
        _, m = worker.run(train, {**opts, "policy": policy}, *inputs)
        results.append((worker.state_dict("actor"), m["loss/policy"]))
    (plain, plain_loss), (one, one_loss) = results
    assert plain.keys() == one.keys() and plain_loss == one_loss
    for k in plain:
        assert torch.equal(plain[k], one[k]), k


def test_reward_model_and_policy_reweighting_run_on_workers(tmp_path: Path) -> None:
    """The reward-model call (Bradley-Terry) and the actor call with a difficulty proxy
    apply their sample weights (largest weight x N above 1) and train."""
    from algos.graph import MFC, CallKind
    from algos.ppo import PAIR, PROMPT, reward_model_graph
    from orchestrator.config.schema import ReweightConfig
    from orchestrator.data.tasks import preference_pair
    from orchestrator.data.text import encode_responses

    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp_path / "tok")
    folder = build_model_folder("tiny", tok, tmp_path / "base", seed=0, max_position_embeddings=32)
    rng = random.Random(4)
    pairs = [preference_pair(task, task.sample_prompt(rng), rng, 0.0) for _ in range(16)]
    ids, mask = encode_prompts(tok, [p for p, _, _ in pairs])
    cids, cmask = encode_responses(tok, [c for _, c, _ in pairs], 5)
    rids, rmask = encode_responses(tok, [r for _, _, r in pairs], 5)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "chosen_ids": cids, "chosen_mask": cmask,
             "rejected_ids": rids, "rejected_mask": rmask}  # fmt: skip
    common = dict(tokenizer_path=str(folder), task_name="sort", task_digits=4)
    rm = LocalDevice([RoleSpec("reward", "value", str(folder),
                               optim=OptimSpec(1e-3, 1, 0.0, 1.0, 0, 8, 4), **common)])  # fmt: skip
    rw = ReweightConfig(strategy="linupper", temperature=0.4)
    call = reward_model_graph().call("reward_train")
    _, m = rm.run(call, {"seed": 0, "step": 0, "reweight": rw}, batch)
    _, m = rm.run(call, {"seed": 1, "step": 1, "reweight": rw}, batch)  # a trained head
    assert m["train/sample_weight_max"] > 1.0 and math.isfinite(m["loss/reward_model"])
    evaluate = MFC("e", "reward", CallKind.INFERENCE, "pair_accuracy", (*PROMPT, *PAIR))
    _, acc = rm.run(evaluate, {}, batch)
    assert 0.0 <= acc["eval/reward_model_accuracy"] <= 1.0

    workers = make_workers(folder, "cpu", 0)
    graph = ppo_graph()
    dataset = task_rows(tok, task, [task.sample_prompt(rng) for _ in range(16)], tmp_path / "data")
    opts = {"seed": 0, "sampling": SamplingParams(6, seed=0), "kl_coef": 0.02,
            "algo": AlgoConfig(), "temperature": 1.0,
            "reweight": ReweightConfig(strategy="linupper", policy_proxy="abs_advantage")}  # fmt: skip
    outputs = rollout(workers, dataset, opts)
    train = graph.call("actor_train")
    _, m = workers.run(train, opts, dataset, *[outputs[p] for p in graph.parents(train)])
    assert m["train/sample_weight_max"] > 1.0 and math.isfinite(m["loss/policy"])
