"""Finding an interface by name: importing this module registers every interface."""

from __future__ import annotations

from orchestrator.interfaces import generate, inference, ppo, sft  # noqa: F401 (registers them)
from orchestrator.interfaces.registry import INTERFACES, Interface


def get_interface(name: str) -> Interface:
    if name not in INTERFACES:
        raise KeyError(f"unknown interface '{name}'; registered: {sorted(INTERFACES)}")
    return INTERFACES[name]
