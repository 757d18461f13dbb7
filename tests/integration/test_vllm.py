"""vLLM generation on real DeviceWorkers (Ray actors, one process each, so every engine
shard starts in a process of its own): the same tokens as transformers' greedy decode
(one device, dp2 and tp2), the same sampling options, weights pushed after a train call
and after a checkpoint load, and a tensor-parallel engine fed from a replica's slices.

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from algos.graph import MFC, CallKind
from algos.ppo import GREEDY_RESPONSE, PROMPT, RESPONSE, UNIQUE_PROMPT
from orchestrator.data.tasks import make_task
from orchestrator.data.text import encode_prompts
from orchestrator.engines.generate import SamplingParams
from orchestrator.engines.train import OptimSpec
from orchestrator.engines.vllm_engine import VLLMSpec, vllm_available
from orchestrator.models.hf import build_model_folder, load_causal_lm, train_tokenizer
from orchestrator.workers.spec import RoleSpec
from planner.layout import Layout, Mesh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

CONTEXT = 32
GEN = MFC("actor_gen", "actor", CallKind.GENERATE, "generate", PROMPT, (*RESPONSE, "logprobs"))
SAMPLE = MFC("actor_sample", "actor", CallKind.GENERATE, "generate", PROMPT, RESPONSE)
SFT = MFC("actor_sft", "actor", CallKind.TRAIN, "sft_train", (*PROMPT, *RESPONSE))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny Llama whose LM head is scaled up, so next-token distributions are peaked
    (a fresh model's are almost uniform, where temperature and truncation barely act)."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("vllm")
    task = make_task("sort", 4)
    tok = train_tokenizer(task.alphabet(), tmp / "tok")
    folder = build_model_folder("tiny", tok, tmp / "base", seed=3, max_position_embeddings=CONTEXT)
    lm = load_causal_lm(folder)
    with torch.no_grad():
        lm.lm_head.weight.mul_(4.0)
    lm.save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(str(folder))


ONE = (Mesh(0, 1), Layout(1, 1, 1))


class Devices:
    """An actor role on its own DeviceWorkers, every call under one sharding (the train
    replica is the generating one: a hybrid engine), vLLM shards built when it samples
    with vLLM. Calls return (outputs, metrics) as the runtime merges them."""

    def __init__(self, folder: Path, backend: str, lr: float = 0.0, sharding: Any = ONE) -> None:
        import ray

        from orchestrator.workers.cluster import DeviceCluster

        optim = OptimSpec(lr, 1, 0.0, 1.0, 0, 8, 8) if lr else None
        vllm = VLLMSpec(max_model_len=CONTEXT, kv_cache_bytes=64 * 2**20)
        spec = RoleSpec(
            "actor", "causal", str(folder), tokenizer_path=str(folder), task_name="sort",
            task_digits=4, optim=optim, generation_backend=backend,
            vllm=vllm if backend == "vllm" else None,
        )  # fmt: skip
        mesh, lay = self.sharding = sharding
        self.cluster = DeviceCluster(1, mesh.size, [sharding])
        self.workers = self.cluster.workers
        ray.get([w.host.remote([spec]) for w in self.workers])
        if backend == "vllm":
            ray.get([w.build_engine.remote("actor", lay.tp) for w in self.workers])
        ray.get([w.load.remote("actor", sharding) for w in self.workers])
        self.version = 0

    def run(self, call: MFC, options: dict, batch: dict) -> tuple[dict, dict]:
        import ray

        from orchestrator.models.batch import gather_inputs
        from orchestrator.runtime.metrics import merge_metrics

        if call.kind is CallKind.TRAIN:
            self.version += 1
        opts = {"version": self.version, **options}
        parts = [w.run.options(num_returns=2).remote(call, self.sharding, opts, batch)
                 for w in self.workers]  # fmt: skip
        outs, metrics = zip(*[ray.get(list(p)) for p in parts])
        return gather_inputs(outs), merge_metrics(call.name, list(metrics), [])

    def engine_logprobs(self, batch: dict) -> torch.Tensor:
        import ray

        return ray.get([w.engine_logprobs.remote("actor", self.sharding, batch)
                        for w in self.workers])[0]  # fmt: skip

    def save(self, folder: Path) -> None:
        import ray

        ray.get(self.workers[0].write_model.remote("actor", self.sharding, str(folder)))
        ray.get(self.workers[0].save_rank.remote("actor", self.sharding, str(folder)))

    def load(self, folder: Path) -> None:
        import ray

        self.version += 1
        ray.get(self.workers[0].load_rank.remote("actor", self.sharding, str(folder),
                                                 self.version))  # fmt: skip

    def stop(self) -> None:
        self.cluster.shutdown()


def start(folder: Path, backend: str, lr: float = 0.0, sharding: Any = ONE) -> Devices:
    return Devices(folder, backend, lr, sharding)


@pytest.fixture(scope="module")
def samplers(ray_cluster, model) -> Any:
    """One frozen worker per backend on the same folder, shared by the sampling tests."""

    folder, _ = model
    workers = {"vllm": start(folder, "vllm"), "hf": start(folder, "hf")}
    yield workers
    for w in workers.values():
        w.stop()


def prompts(tok: Any, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    task, rng = make_task("sort", 4), random.Random(seed)
    ids, mask = encode_prompts(tok, [task.sample_prompt(rng) for _ in range(n)])
    return {"prompt_ids": ids, "prompt_mask": mask}


def generate(worker: Devices, call: MFC, batch: dict, params: SamplingParams, **opt: Any) -> tuple:
    return worker.run(call, {"sampling": params, **opt}, batch)


def test_greedy_equals_transformers_token_for_token(samplers, model) -> None:

    _, tok = model
    vllm, hf = samplers["vllm"], samplers["hf"]
    batch = prompts(tok, 48)
    params = SamplingParams(max_new_tokens=12, greedy=True)
    (v, _), (h, _) = [w.run(SAMPLE, {"sampling": params}, batch) for w in (vllm, hf)]
    assert torch.equal(v["response_mask"], h["response_mask"])
    assert torch.equal(v["response_ids"], h["response_ids"])
    # the responses are not trivial: several lengths and tokens
    assert len(set(v["response_mask"].sum(-1).tolist())) > 1
    assert len(set(v["response_ids"][:, 0].tolist())) > 1


def sft_batch(tok: Any, gen: dict, batch: dict) -> dict[str, torch.Tensor]:
    return {**batch, "response_ids": gen["response_ids"], "response_mask": gen["response_mask"]}


def test_weights_reach_the_engine_after_a_train_call(ray_cluster, model) -> None:
    """Log-probs of a fixed sequence: the engine's equal the trainer's before the step,
    after the step (pushed) and after a step whose push was deferred to the next generate;
    and they changed, so a sync that silently did nothing would fail here."""

    folder, tok = model
    worker = start(folder, "vllm", lr=3e-3)
    batch = prompts(tok, 16, seed=1)
    gen, metrics = generate(worker, GEN, batch, SamplingParams(max_new_tokens=10, seed=5))
    fixed = sft_batch(tok, gen, batch)
    trainer_before = gen["logprobs"]
    engine_before = worker.engine_logprobs(fixed)
    mask = fixed["response_mask"].bool()
    assert (engine_before - trainer_before)[mask].abs().max() < 1e-3
    assert metrics["rollout/logprob_diff"] < 1e-3

    # a train call that pushes its weights (as RL's actor_train does)
    _, m = worker.run(SFT, {"seed": 0, "step": 0, "push_weights": True}, fixed)
    assert m["time/weight_sync"] > 0
    engine_after = worker.engine_logprobs(fixed)
    trainer_after, _ = worker.run(*logprob_call(), fixed)
    assert (engine_after - trainer_after["logprobs"])[mask].abs().max() < 1e-3
    assert (engine_after - engine_before)[mask].abs().max() > 0.05

    # a train call without the push (as SFT's steps): the next generate call pushes first
    _, m = worker.run(SFT, {"seed": 1, "step": 1}, fixed)
    assert "time/weight_sync" not in m
    gen2, m2 = generate(worker, GEN, batch, SamplingParams(max_new_tokens=10, seed=6))
    assert m2["time/weight_sync"] > 0
    assert m2["rollout/logprob_diff_max"] < 1e-3
    worker.stop()


def logprob_call() -> tuple[MFC, dict]:
    call = MFC("actor_inf", "actor", CallKind.INFERENCE, "logprobs", (*PROMPT, *RESPONSE),
               ("logprobs",))  # fmt: skip
    return call, {"temperature": 1.0}


def test_restored_weights_reach_the_engine_before_the_first_generation(
    ray_cluster, model, tmp_path: Path
) -> None:
    """Resume: a fresh worker that loads a checkpoint generates from the loaded weights
    (its engine was built from the initial folder)."""

    folder, tok = model
    trained = start(folder, "vllm", lr=3e-3)
    batch = prompts(tok, 16, seed=2)
    gen, _ = generate(trained, GEN, batch, SamplingParams(max_new_tokens=10, seed=1))
    fixed = sft_batch(tok, gen, batch)
    for step in range(3):
        trained.run(SFT, {"seed": step, "step": step, "push_weights": True}, fixed)
    trained.save(tmp_path / "ckpt")
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    want, _ = generate(trained, SAMPLE, batch, greedy)
    trained.stop()

    fresh = start(folder, "vllm", lr=3e-3)
    before, _ = generate(fresh, SAMPLE, batch, greedy)
    assert not torch.equal(before["response_ids"], want["response_ids"]), "training did nothing"
    fresh.load(tmp_path / "ckpt")
    got, m = generate(fresh, SAMPLE, batch, greedy)
    assert m["time/weight_sync"] > 0
    assert torch.equal(got["response_ids"], want["response_ids"])
    fresh.stop()


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square with df degrees of freedom (Wilson-Hilferty:
    (chi2/df)^(1/3) is about normal with mean 1 - 2/(9 df) and variance 2/(9 df); z = 3.09
    is the normal's upper 0.1% point). df = 2 gives 13.77 (exact 13.82)."""
    v = 2.0 / (9.0 * df)
    return df * (1.0 - v + z * math.sqrt(v)) ** 3


def expected_first_token(folder: Path, batch: dict, t: float, k: int, p: float) -> torch.Tensor:
    """The first-token distribution [V] after temperature, top-k and top-p (keep the most
    likely tokens until their mass reaches p), from the transformers model."""
    lm = load_causal_lm(folder)
    with torch.no_grad():
        logits = lm(input_ids=batch["prompt_ids"][:1], attention_mask=batch["prompt_mask"][:1])
    probs = torch.softmax(logits.logits[0, -1] / t, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (k and rank >= k) or mass >= p:
            break
        keep[i] = True
        mass += float(probs[i])
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


@pytest.mark.parametrize("t,k,p", [(0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 0, 1.0)])
def test_sampling_options_mean_the_same_in_both_backends(samplers, model, t, k, p) -> None:
    """2,000 first tokens for one prompt from each backend against the distribution the
    options define (chi-square at the 0.1% level, small categories merged)."""

    folder, tok = model
    one = prompts(tok, 1, seed=4)
    n = 2000
    batch = {key: v.repeat(n, 1) for key, v in one.items()}
    params = SamplingParams(max_new_tokens=1, temperature=t, top_p=p, top_k=k, seed=11)
    expected = expected_first_token(folder, one, t, k, p)
    assert (expected > 0.05).sum() >= 2, "the test needs a distribution with several tokens"
    workers = [samplers["vllm"], samplers["hf"]]
    results = [w.run(SAMPLE, {"sampling": params}, batch) for w in workers]
    for (out, _), name in zip(results, ("vllm", "hf")):
        first = out["response_ids"][:, 0]
        counts = torch.bincount(first, minlength=expected.numel()).float()
        assert counts[expected == 0].sum() == 0, f"{name} sampled a token the options exclude"
        big = expected * n >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]]) * n
        obs, exp = obs[exp > 0], exp[exp > 0]
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        assert chi2 < chi2_critical(len(obs) - 1), (name, chi2, obs.tolist(), exp.tolist())


def test_stop_tokens_lengths_and_seeds(samplers, model) -> None:
    """A stop token ends a response in both backends (kept, masked in, pad after it);
    no response is longer than max_new_tokens; vLLM's seed replays a batch and repeated
    prompts get different samples."""

    _, tok = model
    batch = prompts(tok, 64, seed=5)
    workers = samplers
    plain = SamplingParams(max_new_tokens=8, seed=3)
    out, _ = generate(workers["vllm"], SAMPLE, batch, plain)
    # the most common non-eos token of plain samples becomes the stop token
    ids = out["response_ids"][out["response_mask"].bool()]
    ids = ids[ids != tok.eos_token_id]
    stop = int(torch.bincount(ids).argmax())
    params = SamplingParams(max_new_tokens=8, seed=3, stop_token_ids=(stop,))
    for name, w in workers.items():
        res, m = generate(w, SAMPLE, batch, params)
        rid, rmask = res["response_ids"], res["response_mask"]
        assert rid.shape == (64, 8)
        lengths = rmask.sum(-1)
        last = rid.gather(1, (lengths - 1)[:, None])[:, 0]
        is_stop = (rid == stop) | (rid == tok.eos_token_id)
        # nothing before the last valid token is a stop token
        before_last = is_stop & (torch.arange(8)[None] < (lengths - 1)[:, None])
        assert not before_last.any(), name
        ended = (last == stop) | (last == tok.eos_token_id)
        assert bool((ended | (lengths == 8)).all()), name
        assert int((last == stop).sum()) > 5, f"{name}: the stop token never ended a response"
        assert bool((rid[rmask == 0] == tok.pad_token_id).all()), name
        assert m["rollout/truncated_frac"] == pytest.approx(float((~ended).float().mean()))
    vllm = workers["vllm"]
    again, _ = generate(vllm, SAMPLE, batch, plain)
    assert torch.equal(again["response_ids"], out["response_ids"])
    other, _ = generate(vllm, SAMPLE, batch, SamplingParams(max_new_tokens=8, seed=4))
    assert not torch.equal(other["response_ids"], out["response_ids"])
    same_prompt = {k: v[:1].repeat(32, 1) for k, v in batch.items()}
    rep, _ = generate(vllm, SAMPLE, same_prompt, plain)
    assert len({tuple(r) for r in rep["response_ids"].tolist()}) > 4


@pytest.mark.parametrize("dp,tp", [(2, 1), (1, 2)], ids=["dp2", "tp2"])
def test_sharded_engines_decode_as_transformers(samplers, model, dp: int, tp: int) -> None:
    """Under dp2 (two engines, each on its half of the rows) and tp2 (one engine, a shard
    on each device, fed the replica's slices: nothing gathered), vLLM's greedy tokens are
    transformers' on the whole batch. The tiny model's 16-row vocabulary is split one way
    by the plan (8 + 8 rows) and another by vLLM (16 + 0): the tp2 case also exchanges
    those rows."""
    folder, tok = model
    worker = start(folder, "vllm", sharding=(Mesh(0, 2), Layout(dp, tp, 1)))
    batch = prompts(tok, 32, seed=7)
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    got, _ = generate(worker, SAMPLE, batch, greedy)
    want, _ = generate(samplers["hf"], SAMPLE, batch, greedy)
    assert torch.equal(got["response_ids"], want["response_ids"])
    worker.stop()


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two shards need two cores")
def test_tensor_parallel_engine_takes_the_trained_slices(samplers, model) -> None:
    """A tensor-parallel train replica (tp2) that also generates: after a train call each
    engine shard takes its slices of the new weights from the replica on its device; the
    engine's log-probs are then the trainer's (and moved)."""
    folder, tok = model
    worker = start(folder, "vllm", lr=3e-3, sharding=(Mesh(0, 2), Layout(1, 2, 1)))
    batch = prompts(tok, 32, seed=7)
    gen, _ = generate(worker, GEN, batch, SamplingParams(max_new_tokens=10, seed=2))
    fixed = sft_batch(tok, gen, batch)
    before = worker.engine_logprobs(fixed)
    _, m = worker.run(SFT, {"seed": 0, "step": 0, "push_weights": True}, fixed)
    after = worker.engine_logprobs(fixed)
    trainer, _ = worker.run(*logprob_call(), fixed)
    mask = fixed["response_mask"].bool()
    assert m["time/weight_sync"] > 0
    assert (after - trainer["logprobs"])[mask].abs().max() < 1e-3
    assert (after - before)[mask].abs().max() > 0.05
    worker.stop()


@pytest.mark.gpu
def test_gpu_engine_sleeps_and_wakes_with_fresh_weights(model) -> None:
    """On a GPU the engine frees its memory between calls; after a train step and a push it
    wakes with the new weights (engine log-probs equal the trainer's)."""
    from tests.integration.local_device import LocalDevice

    folder, tok = model
    optim = OptimSpec(3e-3, 1, 0.0, 1.0, 0, 8, 8)
    spec = RoleSpec(
        "actor", "causal", str(folder), tokenizer_path=str(folder), task_name="sort",
        task_digits=4, optim=optim, generation_backend="vllm",
        vllm=VLLMSpec(max_model_len=CONTEXT, kv_cache_bytes=0, gpu_memory_utilization=0.3),
    )  # fmt: skip
    device = LocalDevice([spec], "cuda", engine_tp=1)
    engine = device.worker.engine.engine
    assert engine.awake == set()  # asleep until the first call
    batch = prompts(tok, 16)
    gen, _ = device.run(GEN, {"sampling": SamplingParams(10, seed=1), "version": 0}, batch)
    assert engine.awake == set()
    fixed = {**batch, **{k: gen[k] for k in RESPONSE}}
    device.run(SFT, {"seed": 0, "step": 0, "push_weights": True, "version": 1}, fixed)
    assert engine.awake == {"weights"}  # weights woken and loaded; KV cache still freed
    engine_lp = device.worker.engine_logprobs("actor", ONE, fixed)
    trainer, _ = device.run(*logprob_call(), fixed)
    mask = gen["response_mask"].bool()
    assert (engine_lp - trainer["logprobs"])[mask].abs().max() < 1e-3


GREEDY = MFC("actor_greedy_gen", "actor", CallKind.GENERATE, "generate", UNIQUE_PROMPT,
             GREEDY_RESPONSE, options={"greedy": True})  # fmt: skip


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_fused_sampled_and_greedy_generation_equals_two_calls(samplers, model, backend) -> None:
    """ReMax's sampled and greedy generations as one task (DeviceWorker.run_fused; with
    vLLM one engine batch with per-request parameters) give each call what it gets alone:
    the same tokens (per-row seeds), the same greedy responses, the trainer's log-probs
    and each call's own metrics."""
    import ray

    from orchestrator.models.batch import gather_inputs

    _, tok = model
    w = samplers[backend]
    sampled = prompts(tok, 16, seed=7)
    unique = {f"unique_{k}": v[:8] for k, v in prompts(tok, 8, seed=8).items()}
    batch = {**sampled, **unique}
    params = SamplingParams(max_new_tokens=10, seed=11)
    opts = [{"sampling": params, "version": 0, "metric_prefix": "rollout/"},
            {"sampling": params, "version": 0, "greedy": True,
             "metric_prefix": "rollout/greedy_"}]  # fmt: skip
    alone = [w.run(c, o, batch) for c, o in zip((GEN, GREEDY), opts)]
    parts = ray.get(list(w.workers[0].run_fused.options(num_returns=4)
                         .remote([GEN, GREEDY], w.sharding, opts, batch)))  # fmt: skip
    fused = [(gather_inputs([parts[0]]), parts[1]), (gather_inputs([parts[2]]), parts[3])]
    for (a, am), (f, fm) in zip(alone, fused):
        assert a.keys() == f.keys()
        for k in a:
            if k == "logprobs":
                torch.testing.assert_close(f[k], a[k], atol=1e-5, rtol=0)
            else:
                assert torch.equal(f[k], a[k]), k
        assert {k for k in am if k.startswith("rollout/")} == {
            k for k in fm if k.startswith("rollout/")}  # fmt: skip
    _, gm = fused[1]
    assert gm["rollout/greedy_response_length_mean"] == pytest.approx(
        float(fused[1][0]["greedy_response_mask"].sum(-1).float().mean()))  # fmt: skip
    # the whole batch's time is logged, and each call's share of it
    assert fused[0][1]["time/fused_actor_gen_s"] == fused[1][1]["time/fused_actor_greedy_gen_s"]
    assert fused[0][1]["time/actor_gen_s"] == pytest.approx(
        fused[0][1]["time/fused_actor_gen_s"] * 16 / 24)  # fmt: skip
