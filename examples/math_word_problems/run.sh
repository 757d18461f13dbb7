#!/usr/bin/env bash
# GRPO on the generated word problems, from SmolLM2-135M-Instruct, with the built-in math
# reward (the boxed answer against the label) and a small format reward.
set -euo pipefail
relay train run.name=math-grpo algo=grpo sft.enabled=false \
    model.path=models/smollm2-135m-instruct \
    data.train_files='[data/math/train.jsonl]' data.eval_files='[data/math/test.jsonl]' \
    reward=function reward.functions='[math,format]' reward.weights='[1.0,0.1]' \
    generate.max_new_tokens=128 generate.backend=vllm \
    train.rollout_batch_prompts=8 train.samples_per_prompt=4 train.mini_batch_samples=32 \
    train.micro_batch_samples_per_device=4 train.actor_lr=1e-6 train.steps=20 \
    train.eval_every_steps=10 cluster.devices_per_node=1 "$@"
