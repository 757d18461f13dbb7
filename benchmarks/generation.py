"""Generation throughput of vLLM against transformers' generate, and the weight push's
share of an RL step.

Throughput: the same model (the `large` preset, about 60M parameters, float32), the same
64 prompts and 128 new tokens per prompt (no early stop, so both write the same number of
tokens), sampled at temperature 1 through Relay's two engines (`HFGenerateEngine` and
`VLLMEngine`), each in a process of its own with the same number of threads. The
processes alternate (hf, vllm, vllm-bf16, hf, ...) so that drift on a shared machine hits
all; each times `--repeats` generations after one warm-up generation of the same size,
and the ratio of medians is reported. The key figure compares float32 with float32 (the
trainer's precision); vLLM with bfloat16 weights (`generate.vllm_dtype=bfloat16`) is
reported beside it. The vLLM processes also time `sync_weights` (the whole model pushed
in place).

Sharded plans: the same generation under a dp2 plan (two devices, each one thread: two
vLLM engines, or transformers on two replicas, each on half the prompts) and a tp2 plan
(one vLLM engine with a shard on each device, fed the replica's slices; transformers on
the tensor-parallel model), run by Relay's runtime (PlanRuntime, a one-call generate
graph), each in a process of its own; vLLM over transformers is reported per plan next to
the unsharded figure.

Sync share: a short PPO run of the default job on the same model (`relay train
model.preset=large sft.enabled=false reward=verifier`, vLLM backend) reads
`time/weight_sync` and `time/step_s` from its metrics.

Writes benchmarks/results/generation.json.

    .venv/bin/python benchmarks/generation.py [--rounds 2] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository first: this folder's planner.py would shadow the planner package
sys.path.insert(0, str(REPO))
PRESET = "large"
BACKENDS = {"hf": ("hf", "float32"), "vllm": ("vllm", "float32"), "vllm_bf16": ("vllm", "bfloat16")}


def build_model(folder: Path, context: int) -> None:
    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import build_model_folder, train_tokenizer

    task = make_task("sort", 8)
    tok = train_tokenizer(task.alphabet(), folder / "tokenizer")
    build_model_folder(PRESET, tok, folder / "model", seed=0, max_position_embeddings=context)


def worker(args: argparse.Namespace) -> None:
    """One backend in this process: warm up, time `repeats` generations, print JSON."""
    import random

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from orchestrator.data.tasks import make_task
    from orchestrator.data.text import encode_prompts
    from orchestrator.engines.generate import HFGenerateEngine, SamplingParams
    from orchestrator.models.hf import load_causal_lm

    folder = Path(args.folder) / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    task, rng = make_task("sort", 8), random.Random(0)
    ids, mask = encode_prompts(tok, [task.sample_prompt(rng) for _ in range(args.prompts)])
    module = load_causal_lm(folder)
    t0 = time.perf_counter()
    if args.worker == "hf":
        engine = HFGenerateEngine(module, tok.eos_token_id, tok.pad_token_id)
    else:
        from orchestrator.engines.vllm_engine import VLLMEngine, VLLMSpec, kv_cache_bytes_for

        context = module.config.max_position_embeddings
        spec = VLLMSpec(
            max_model_len=context,
            kv_cache_bytes=kv_cache_bytes_for(module.config, args.prompts, context),
            max_num_seqs=args.prompts,
            dtype=args.dtype,
        )
        engine = VLLMEngine(folder, tok.eos_token_id, tok.pad_token_id, spec, args.threads)
    start_s = time.perf_counter() - t0
    n = args.new_tokens
    engine.generate(ids, mask, SamplingParams(max_new_tokens=n, min_new_tokens=n, seed=99))
    times = []
    for r in range(args.repeats):
        params = SamplingParams(max_new_tokens=n, min_new_tokens=n, seed=r)
        t0 = time.perf_counter()
        out = engine.generate(ids, mask, params)
        times.append(time.perf_counter() - t0)
        assert int(out.response_mask.sum()) == args.prompts * n, "a response stopped early"
    result = {
        "backend": args.worker,
        "dtype": "float32" if args.worker == "hf" else args.dtype,
        "threads": torch.get_num_threads(),
        "engine_start_s": start_s,
        "generate_s": times,
        "tokens": args.prompts * n,
    }
    if args.worker == "vllm":
        syncs = [engine.sync_weights(module.state_dict().items()) for _ in range(3)]
        result["sync_s"] = syncs
        result["parameters"] = sum(p.numel() for p in module.parameters())
    print("RESULT " + json.dumps(result), flush=True)


PLANS = {"dp2": (2, 1), "tp2": (1, 2)}


def plan_worker(args: argparse.Namespace) -> None:
    """One backend under one two-device plan, through the runtime: time `repeats`
    generate calls after a warm-up one, print JSON."""
    import random

    import ray
    from transformers import AutoTokenizer

    from algos.graph import MFC, CallKind, DataflowGraph
    from algos.ppo import PROMPT, RESPONSE
    from orchestrator.data.tasks import make_task
    from orchestrator.data.text import encode_prompts
    from orchestrator.engines.generate import SamplingParams
    from orchestrator.engines.vllm_engine import VLLMSpec, kv_cache_bytes_for
    from orchestrator.runtime.graph_runner import run_graph
    from orchestrator.runtime.plan_runtime import PlanRuntime
    from orchestrator.workers.spec import RoleSpec
    from planner.layout import Layout, Mesh

    folder = Path(args.folder) / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    task, rng = make_task("sort", 8), random.Random(0)
    ids, mask = encode_prompts(tok, [task.sample_prompt(rng) for _ in range(args.prompts)])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    context = config.max_position_embeddings
    vllm = VLLMSpec(max_model_len=context, max_num_seqs=args.prompts,
                    kv_cache_bytes=kv_cache_bytes_for(config, args.prompts, context))  # fmt: skip
    spec = RoleSpec("actor", "causal", str(folder), str(folder), "sort", 8,
                    generation_backend=args.worker,
                    vllm=vllm if args.worker == "vllm" else None)  # fmt: skip
    call = MFC("actor_gen", "actor", CallKind.GENERATE, "generate", PROMPT, RESPONSE)
    graph = DataflowGraph("generate", [call], dataset_keys=PROMPT)
    dp, tp = PLANS[args.plan]
    ray.init(num_cpus=2, resources={"relay_device": 2}, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    t0 = time.perf_counter()
    runtime = PlanRuntime(graph, {"actor_gen": (Mesh(0, 2), Layout(dp, tp, 1))}, [spec], 1, 2)
    start_s = time.perf_counter() - t0
    n, data = args.new_tokens, {"prompt_ids": ids, "prompt_mask": mask}
    times = []
    for r in range(args.repeats + 1):  # the first is the warm-up
        params = SamplingParams(max_new_tokens=n, min_new_tokens=n, seed=r)
        t0 = time.perf_counter()
        run_graph(graph, runtime, data, {"actor_gen": {"sampling": params, "step": r}})
        times.append(time.perf_counter() - t0)
    runtime.stop()
    ray.shutdown()
    print("RESULT " + json.dumps({"backend": args.worker, "plan": args.plan, "threads": 1,
                                  "engine_start_s": start_s, "generate_s": times[1:],
                                  "tokens": args.prompts * n}), flush=True)  # fmt: skip


def run_plan_worker(backend: str, plan: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--plan", plan, "--folder", str(folder),
           "--repeats", str(args.repeats), "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{backend} {plan} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    print(backend, plan, json.dumps(result), flush=True)
    return result


def run_worker(name: str, folder: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    backend, dtype = BACKENDS[name]
    cmd = [sys.executable, __file__, "--worker", backend, "--folder", str(folder)]
    cmd += ["--dtype", dtype]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    print(name, json.dumps(result), flush=True)
    return result


def sync_share(out: Path, steps: int) -> dict:
    """A short PPO run on the same model with the vLLM backend: weight push against step."""
    from orchestrator.run.tracking import read_metrics

    overrides = [
        f"model.preset={PRESET}", "sft.enabled=false", "reward=verifier",
        "generate.backend=vllm", f"run.output_dir={out}", "run.name=sync",
        f"train.steps={steps}", f"train.eval_every_steps={steps + 1}",
        f"run.save_every_steps={steps + 1}", "task.num_eval_prompts=16",
        "logger.wandb_mode=disabled", "logger.progress=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "launch.cli", "train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"relay train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [
        r
        for r in read_metrics(out / "sync" / "metrics.jsonl")
        if r["stage"] == "rl" and "time/weight_sync" in r and "eval/greedy_accuracy" not in r
    ]
    sync = statistics.mean(r["time/weight_sync"] for r in rows)
    step = statistics.mean(r["time/step_s"] for r in rows)
    return {
        "command": "relay train " + " ".join(overrides),
        "steps_measured": len(rows),
        "weight_sync_s": sync,
        "step_s": step,
        "share": sync / step,
        "logprob_diff": statistics.mean(r["rollout/logprob_diff"] for r in rows),
        "logprob_diff_max": max(r["rollout/logprob_diff_max"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="hf/vllm process pairs")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sync-steps", type=int, default=4)
    parser.add_argument("--worker", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=tuple(PLANS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.worker and args.plan:
        plan_worker(args)
        return
    if args.worker:
        worker(args)
        return
    from orchestrator.models.hf import MODEL_PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder, context=32 + args.new_tokens)
        runs: dict[str, list[dict]] = {name: [] for name in BACKENDS}
        planned: dict[str, list[dict]] = {f"{b}_{p}": [] for p in PLANS for b in ("hf", "vllm")}
        for _ in range(args.rounds):
            for name in BACKENDS:
                runs[name].append(run_worker(name, folder, args))
            for key in planned:
                backend, plan = key.split("_")
                planned[key].append(run_plan_worker(backend, plan, folder, args))
        sync = sync_share(folder / "runs", args.sync_steps)
    tokens = args.prompts * args.new_tokens
    median = {
        b: statistics.median(t for r in rs for t in r["generate_s"]) for b, rs in runs.items()
    }
    tps = {b: tokens / s for b, s in median.items()}
    vllm_sync = [s for r in runs["vllm"] for s in r["sync_s"]]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, no GPU",
        "model": {
            "preset": PRESET,
            **MODEL_PRESETS[PRESET],
            "dtype": "float32",
            "parameters": runs["vllm"][0]["parameters"],
        },  # fmt: skip
        "workload": {
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "temperature": 1.0,
        },  # fmt: skip
        "vllm_over_hf_tokens_per_s": tps["vllm"] / tps["hf"],
        "vllm_bf16_over_hf_tokens_per_s": tps["vllm_bf16"] / tps["hf"],
        "sync_share_of_step": sync["share"],
        "tokens_per_s": tps,
        "median_generate_s": median,
        "engine_start_s": {
            b: statistics.median(r["engine_start_s"] for r in rs) for b, rs in runs.items()
        },  # fmt: skip
        "model_sync_s_median": statistics.median(vllm_sync),
        "plans": {
            plan: {
                "vllm_over_hf_tokens_per_s": statistics.median(
                    t for r in planned[f"hf_{plan}"] for t in r["generate_s"]
                )
                / statistics.median(t for r in planned[f"vllm_{plan}"] for t in r["generate_s"]),
                "tokens_per_s": {
                    b: tokens
                    / statistics.median(t for r in planned[f"{b}_{plan}"] for t in r["generate_s"])
                    for b in ("hf", "vllm")
                },  # fmt: skip
                "engine_start_s": statistics.median(
                    r["engine_start_s"] for r in planned[f"vllm_{plan}"]
                ),  # fmt: skip
            }
            for plan in PLANS
        },
        "sync_run": sync,
        "goal": {"vllm_over_hf_tokens_per_s": 5.0, "sync_share_of_step": 0.05},
        "runs": runs,
        "plan_runs": planned,
    }
    out_path = REPO / "benchmarks" / "results" / "generation.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("vllm_over_hf_tokens_per_s", "vllm_bf16_over_hf_tokens_per_s", "sync_share_of_step",
            "tokens_per_s", "plans")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
