"""Relay's algorithm core: losses, advantage estimators, KL and graph declarations.

Imports torch only (never ray, vllm or deepspeed); nothing heavy is imported here.
"""
