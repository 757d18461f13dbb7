#!/usr/bin/env bash
# GRPO on the generated word problems, from SmolLM2-135M-Instruct, with the built-in math
# reward (the boxed answer against the label) and a small format reward; sized to finish
# in under 20 minutes on a 2-core CPU (README.md has what it measured).
set -euo pipefail
relay train run.name=math-grpo algo=grpo sft.enabled=false \
    model.path=models/smollm2-135m-instruct \
    data.train_files='[data/math/train.jsonl]' data.eval_files='[data/math/eval.jsonl]' \
    reward=function reward.functions='[math,format]' reward.weights='[1.0,0.1]' \
    generate.max_new_tokens=128 generate.backend=vllm \
    train.rollout_batch_prompts=4 train.samples_per_prompt=4 train.mini_batch_samples=16 \
    train.micro_batch_samples_per_device=4 train.actor_lr=5e-6 train.steps=12 \
    train.eval_every_steps=12 cluster.devices_per_node=1 cluster.threads_per_device=2 "$@"
