"""Finding an interface by name: importing this module registers every interface."""

from __future__ import annotations

from typing import Any

from orchestrator.interfaces import generate, inference, ppo, sft  # noqa: F401 (registers them)
from orchestrator.interfaces.registry import FUSED, INTERFACES, Interface


def get_interface(name: str) -> Interface:
    if name not in INTERFACES:
        raise KeyError(f"unknown interface '{name}'; registered: {sorted(INTERFACES)}")
    return INTERFACES[name]


def get_fused(name: str) -> Any:
    """The interface `name` over several calls at once (registry.FUSED)."""
    if name not in FUSED:
        raise KeyError(f"interface '{name}' has no fused form; fused: {sorted(FUSED)}")
    return FUSED[name]


def fusable(name: str) -> bool:
    return name in FUSED
