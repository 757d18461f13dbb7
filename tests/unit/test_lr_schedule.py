"""The learning-rate multiplier: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

import pytest

from orchestrator.engines.train import OptimSpec, lr_factor


def spec(warmup: int, decay: int, floor: float) -> OptimSpec:
    return OptimSpec(1e-3, warmup, 0.0, 1.0, 0, 8, 8, decay_steps=decay, min_lr_ratio=floor)


def test_warmup_then_constant() -> None:
    s = spec(4, 0, 0.0)
    # (step + 1) / 4 during warm-up: the first step already has lr / 4
    assert [lr_factor(i, s) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_after_warmup_reaches_the_floor_at_the_last_step() -> None:
    s = spec(2, 4, 0.1)
    want = [
        0.5,  # warm-up 1/2
        1.0,  # warm-up 2/2
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),  # progress 1/4: 0.868198
        0.1 + 0.9 * 0.5,  # progress 2/4: cos = 0 -> 0.55
        0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)),  # progress 3/4: 0.231802
        0.1,  # progress 4/4: the floor
        0.1,  # past the end: stays at the floor
    ]
    got = [lr_factor(i, s) for i in range(7)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[2] == pytest.approx(0.868198, abs=1e-6)
    assert got[4] == pytest.approx(0.231802, abs=1e-6)
