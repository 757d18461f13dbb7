"""Relay's algorithm core: pure tensor math and graph declarations.

losses (masked reductions, PPO policy and value losses), rewards (KL estimators, shaped
reward, KL controllers), advantages (the estimator registry, GAE), graph and ppo (dataflow
graphs). The core imports torch only, never ray, vllm or deepspeed; this file imports
nothing.
"""
