"""Relay's GRPO against TRL's `GRPOTrainer` on one machine: seconds per RL step, median
after warm-up, on the same model, batch and lengths, side by side in one run.

The model is a Llama of hidden 512, 8 layers and 8 heads (MLP 1024: about 21M parameters)
over a character tokenizer trained here on the sort task's alphabet, with random weights
(the time of a step does not depend on what it has learnt). A step is 16 prompts x 4
responses of exactly 128 new tokens (no early stop: `min_new_tokens`), a KL term to a
reference copy of the model (TRL `beta=0.04`; Relay's GRPO KL), one optimizer step on the
whole batch of 64, the task's verifier as the reward. TRL runs in one process with
`torch.set_num_threads(<cores>)`, as a user would run it on this machine; Relay runs
`relay train` with its shipped plan (plus any `--relay` overrides). Each runs in a
process of its own, one after the other, `--rounds` times alternating. Writes
benchmarks/results/vs_trl.json.

    .venv/bin/python benchmarks/vs_trl.py [--steps 5] [--rounds 1] [--relay OVERRIDE ...]
        [--overlap]

`--overlap` adds a third run: Relay with the actor's train call on one device and its
generation and the reference on the other, the next step's rollout generated while
this step trains (train.overlap_generation, one step off-policy).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES, NEW_TOKENS, BETA = 16, 4, 128, 0.04
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1024)  # fmt: skip


def build_model(out: Path) -> Path:
    """The benchmark's model folder (weights from seed 0) with its tokenizer."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaForCausalLM

    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import llama_config, train_tokenizer

    tok = train_tokenizer(make_task("sort", 8).alphabet(), out / "tok")
    config = llama_config("medium", tok, max_position_embeddings=256)
    for k, v in SHAPE.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = out / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# TRL's side, run in a process of its own: GRPOTrainer on the sort task's prompts with the
# task's verifier, timing each optimizer step.
TRL = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[3])
folder, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[4]))
import random
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from orchestrator.data.tasks import make_task

task = make_task("sort", 8)
rng = random.Random(0)
prompts = [task.sample_prompt(rng) for _ in range(16 * (steps + 1))]
data = Dataset.from_dict({"prompt": prompts})

def verifier(prompts, completions, **kw):
    return [task.reward(p, c) for p, c in zip(prompts, completions)]

class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.last = [], None
    def on_step_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.last)

tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
args = GRPOConfig(
    output_dir=sys.argv[5], per_device_train_batch_size=64, num_generations=4,
    gradient_accumulation_steps=1, max_completion_length=128, beta=0.04,
    learning_rate=1e-6, temperature=1.0, max_steps=steps, logging_steps=1,
    report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
    generation_kwargs={"min_new_tokens": 128}, dataloader_num_workers=0,
)
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=verifier, args=args, train_dataset=data,
                      processing_class=tok, callbacks=[clock])
t0 = time.perf_counter()
trainer.train()
lengths = [r["completions/mean_length"] for r in trainer.state.log_history
           if "completions/mean_length" in r]
print("RESULT " + json.dumps({"step_s": clock.times, "job_s": time.perf_counter() - t0,
                              "completion_length": lengths}))
"""


def run_trl(folder: Path, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", TRL, str(folder), str(steps), str(REPO), str(threads), out]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"TRL's run failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def relay_overrides(folder: Path, steps: int, out: str) -> list[str]:
    return [
        "algo=grpo", "reward=verifier", "task=sort", "task.num_digits=8",
        f"model.path={folder}", "sft.enabled=false",
        f"train.steps={steps}", f"train.rollout_batch_prompts={PROMPTS}",
        f"train.samples_per_prompt={SAMPLES}", f"train.mini_batch_samples={PROMPTS * SAMPLES}",
        f"generate.max_new_tokens={NEW_TOKENS}", f"generate.min_new_tokens={NEW_TOKENS}",
        f"algo.kl_coef={BETA}", f"train.eval_every_steps={steps + 1}",
        f"run.save_every_steps={steps + 1}", "task.num_eval_prompts=16",
        "logger.wandb_mode=disabled", "logger.progress=false",
        f"run.output_dir={out}", "run.name=bench",
    ]  # fmt: skip


def overlap_plan(folder: Path, steps: int, out: Path) -> list[str]:
    """Overrides for Relay's overlapped run: the actor's train call on device 0, its
    generation and the reference on device 1, and the next step's rollout launched while
    this step trains (train.overlap_generation: one step off-policy)."""
    sys.path.insert(0, str(REPO))
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan
    from planner.plan import to_dict

    cfg = load_config(relay_overrides(folder, steps, str(out)), for_run=False)
    result = make_plan(cfg, "per_role")
    data = to_dict(result.ctx, result.plan, "file", None)
    for name, call in data["calls"].items():
        call.update(mesh="d0" if name == "actor_train" else "d1", dp=1, tp=1, pp=1)
    path = out / "overlap_plan.json"
    path.write_text(json.dumps(data))
    return ["plan=file", f"plan.path={path}", "train.overlap_generation=true"]


def run_relay(folder: Path, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "launch.cli", "train", *relay_overrides(folder, steps, out),
               *extra]  # fmt: skip
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"Relay's run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows = [json.loads(x) for x in (Path(out) / "bench" / "metrics.jsonl").read_text()
                .splitlines()]  # fmt: skip
        plan = json.loads((Path(out) / "bench" / "plan.json").read_text())
    rows = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]
    calls = sorted(k[5:-2] for k in rows[-1] if k.startswith("time/") and k.endswith("_s")
                   and k[5:-2] in plan["calls"])  # fmt: skip
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "per_call_s": {c: [r[f"time/{c}_s"] for r in rows] for c in calls},
        "response_length": [r.get("rollout/response_length_mean") for r in rows],
        "plan": {n: f"{c['mesh']} dp{c['dp']} tp{c['tp']}" for n, c in plan["calls"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first warms up)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--relay", nargs="*", default=[], help="overrides for Relay's run")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--overlap", action="store_true",
                    help="also run Relay with the next step's generation overlapping training")  # fmt: skip
    args = ap.parse_args()
    names = ["trl", "relay"] + (["relay_overlap"] if args.overlap else [])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp))
        overlap = overlap_plan(folder, args.steps, Path(tmp)) if args.overlap else []
        for r in range(args.rounds):
            for name in names:
                print(f"round {r + 1}: {name}", flush=True)
                if name == "trl":
                    res = run_trl(folder, args.steps, args.threads)
                else:
                    extra = args.relay + (overlap if name == "relay_overlap" else [])
                    res = run_relay(folder, args.steps, extra)
                print(json.dumps(res)[:600], flush=True)
                runs[name].append(res)
    med = {n: statistics.median(s for r in rs for s in r["step_s"][1:]) for n, rs in runs.items()}
    calls = runs["relay"][0]["per_call_s"]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "shape": SHAPE,
        "batch": {
            "prompts": PROMPTS,
            "samples_per_prompt": SAMPLES,
            "new_tokens": NEW_TOKENS,
            "beta": BETA,
        },  # fmt: skip
        "trl_threads": args.threads,
        "relay_overrides": args.relay,
        "trl_step_s": med["trl"],
        "relay_step_s": med["relay"],
        "relay_over_trl": med["relay"] / med["trl"],
        "relay_per_call_s": {c: statistics.median(v[1:]) for c, v in calls.items()},
        **(
            {
                "relay_overlap_step_s": med["relay_overlap"],
                "relay_overlap_over_trl": med["relay_overlap"] / med["trl"],
                "relay_overlap_per_call_s": {
                    c: statistics.median(v[1:])
                    for c, v in runs["relay_overlap"][0]["per_call_s"].items()
                },
            }
            if args.overlap
            else {}
        ),  # fmt: skip
        "goal": {"relay_over_trl": 0.5},
        "runs": runs,
    }
    path = REPO / "benchmarks" / "results" / "vs_trl.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("trl_", "relay_"))}))


if __name__ == "__main__":
    main()
