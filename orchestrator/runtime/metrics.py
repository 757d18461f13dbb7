"""A call's metrics from its ranks', and the step's time accounting (busy, overhead)."""

from __future__ import annotations

from orchestrator.workers.device_worker import REALLOC_KEY


def merge_metrics(
    call: str, ranks: list[dict[str, float]], reallocs: list[dict[str, float]]
) -> dict[str, float]:
    """One call's metrics from its ranks': averaged (times: the slowest rank; spans: the
    earliest start, the latest end), with the reallocation that preceded the call (its
    slowest device's seconds and span, the bytes it moved), from its own tasks or from
    the ranks' `_realloc/` keys when the call's task ran it."""
    reallocs = list(reallocs)
    ranks = [dict(r) for r in ranks]
    for r in ranks:  # a reallocation run inside the call's task
        folded = {k[len(REALLOC_KEY) :]: r.pop(k) for k in list(r) if k.startswith(REALLOC_KEY)}
        if folded:
            reallocs.append(folded)
    m: dict[str, float] = {}
    for key in {k for r in ranks for k in r}:
        vals = [r[key] for r in ranks if key in r]
        if key.endswith("/start"):
            m[key] = min(vals)
        elif key.startswith(("time/", "perf/", "span/")):
            m[key] = max(vals)
        else:
            m[key] = sum(vals) / len(vals)
    if reallocs:
        m[f"time/realloc_{call}_s"] = max(r["seconds"] for r in reallocs)
        m[f"span/realloc_{call}/start"] = min(r["start"] for r in reallocs)
        m[f"span/realloc_{call}/end"] = max(r["end"] for r in reallocs)
        m[f"realloc/{call}_bytes"] = float(sum(r["sent"] + r["local"] for r in reallocs))
    return m


def without_spans(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics to log: the `span/` timestamps (busy_seconds reads them) left out."""
    return {k: v for k, v in metrics.items() if not k.startswith("span/")}


def busy_seconds(metrics: dict[str, float], reallocations: bool = True) -> float:
    """The wall time during which some call (or reallocation) ran: the union of the
    `span/<name>/start` .. `span/<name>/end` intervals (calls on disjoint meshes overlap)."""
    spans = sorted((metrics[k], metrics[k[: -len("start")] + "end"])
                   for k in metrics if k.startswith("span/") and k.endswith("/start")
                   and (reallocations or not k.startswith("span/realloc_")))  # fmt: skip
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
