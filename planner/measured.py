"""Call times measured on the cluster at hand (`relay profile --calls`), for the planner.

The roofline of planner.cost predicts a GPU's large calls well, but not a call whose time
is mostly fixed costs (a small model's Python, kernel launches, gloo's latency, DeepSpeed's
step), nor several device workers sharing a CPU's cores. So the profile runs the job's own
graph for a few steps under each candidate layout, every call on the same mesh (the
symmetric plan of that layout on the first m devices), and records each call's mean time
with the threads it computed with. The planner then costs a call by:

1. the measured time of the call at its mesh size, data- and tensor-parallel degrees,
   scaled by the roofline from one micro-batch to the plan's count;
2. else the roofline, scaled by the median ratio of measured to roofline time of the
   calls of the same kind (generate, inference, train) in the profile.

Either is then scaled from the cores the call had when measured to the cores it has under
the plan (planner.threads: its own threads, or a share of the node's cores when the plan
keeps more devices busy at once than the node has cores), and every step pays the
profile's measured orchestration overhead (dispatch, transfers, logging).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, int, int, int]  # call, mesh size, dp, tp


@dataclass(frozen=True)
class Measured:
    seconds: float  # mean time of the call (one micro-batch)
    cores: float  # cores each of its devices computed with (planner.threads)


@dataclass
class CallProfile:
    """A `relay profile --calls` file: what it measured, for which job."""

    job: dict[str, Any]  # what the times are of: graph, shapes, batch, lengths, backend
    calls: dict[Key, Measured]
    kind_ratio: dict[str, float]  # call kind -> median measured / roofline time
    step_overhead_s: float
    cores_per_node: int
    source: str = ""
    measured_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def lookup(self, call: str, size: int, dp: int, tp: int) -> Measured | None:
        return self.calls.get((call, size, dp, tp))

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "cores_per_node": self.cores_per_node,
            "step_overhead_s": self.step_overhead_s,
            "kind_ratio": self.kind_ratio,
            "measured_at": self.measured_at,
            "calls": [
                {
                    "call": k[0],
                    "mesh_size": k[1],
                    "dp": k[2],
                    "tp": k[3],
                    "seconds": m.seconds,
                    "cores": m.cores,
                }  # fmt: skip
                for k, m in sorted(self.calls.items())
            ],
            **self.extra,
        }


def read_call_profile(path: str | Path) -> CallProfile:
    data = json.loads(Path(path).read_text())
    calls = {
        (c["call"], int(c["mesh_size"]), int(c["dp"]), int(c["tp"])): Measured(
            float(c["seconds"]), float(c["cores"])
        )
        for c in data["calls"]
    }
    known = {"job", "cores_per_node", "step_overhead_s", "kind_ratio", "measured_at", "calls"}
    return CallProfile(
        data["job"], calls, {k: float(v) for k, v in data["kind_ratio"].items()},
        float(data["step_overhead_s"]), int(data["cores_per_node"]), str(path),
        data.get("measured_at", ""), {k: v for k, v in data.items() if k not in known},
    )  # fmt: skip


def median_ratios(pairs: list[tuple[str, float, float]]) -> dict[str, float]:
    """Call kind -> median of measured / roofline over (kind, measured, roofline)."""
    kinds = {k for k, _, _ in pairs}
    return {k: statistics.median(m / r for kk, m, r in pairs if kk == k and r > 0) for k in kinds}
