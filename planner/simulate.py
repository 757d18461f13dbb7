"""List scheduling of tasks on devices.

Each task needs a set of devices for its whole duration and waits for the tasks it
depends on. Repeatedly, of the tasks whose dependencies are all scheduled, the one that
can start earliest is placed (ties go to the task listed first); it starts when its last
dependency has ended and all its devices are free. So tasks on overlapping device sets
run one after another and tasks on disjoint sets run at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    devices: tuple[range, ...]  # device ranges; their union is what the task occupies
    duration_s: float
    deps: tuple[int, ...] = ()  # indices of earlier tasks in the list
    kind: str = "call"  # call | realloc (for drawing)
    iteration: int = 0


@dataclass(frozen=True)
class Slot:
    task: Task
    start_s: float
    end_s: float


def list_schedule(tasks: Sequence[Task], num_devices: int) -> list[Slot]:
    """Start and end of every task (in the order of `tasks`)."""
    free = np.zeros(num_devices)
    slots: list[Slot | None] = [None] * len(tasks)
    waiting = [len(t.deps) for t in tasks]
    users: list[list[int]] = [[] for _ in tasks]
    for i, t in enumerate(tasks):
        for d in t.deps:
            if d >= i:
                raise ValueError(f"task {i} ({t.name}) depends on a later task {d}")
            users[d].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    while ready:
        best: tuple[float, int] | None = None
        for i in ready:
            t = tasks[i]
            start = max((slots[d].end_s for d in t.deps), default=0.0)  # type: ignore[union-attr]
            for r in t.devices:
                if len(r):
                    start = max(start, float(free[r.start : r.stop].max()))
            if best is None or (start, i) < best:
                best = (start, i)
        assert best is not None
        start, i = best
        t = tasks[i]
        end = start + t.duration_s
        for r in t.devices:
            free[r.start : r.stop] = end
        slots[i] = Slot(t, start, end)
        ready.remove(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    return [s for s in slots if s is not None]


def makespan(slots: Sequence[Slot]) -> float:
    return max((s.end_s for s in slots), default=0.0)
