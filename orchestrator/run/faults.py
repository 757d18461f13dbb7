"""Failures, said as what failed and what to do.

- A worker that dies (killed, crashed, killed for memory): the stage runs again on new
  workers, at most run.max_restarts times in a run. The RL stage continues from its
  newest complete checkpoint; SFT and the reward model (no checkpoints) start over. A
  worker killed for memory is reported as such: which device and roles, the node's
  memory then, what the plan expected on that device, and the fixes.
- A worker that fails while it is built (its model folder, its engine): the run stops at
  once with that worker's own exception type and message; nothing is retried.
- A call that raises (a bug, not a death): the run stops with the call's exception.
Each ends as a RunError: one message, no traceback, a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.run.context import Run
from orchestrator.run.folder import RunError
from orchestrator.workers.failures import (
    WorkerBuildError,
    WorkerLost,
    cause_of,
    classify,
    first_line,
    type_name,
)

GIB = 2**30


def with_restarts(
    run: Run, stage: str, body: Callable[[bool], dict[str, float]]
) -> dict[str, float]:
    """body(after_fault) again with new workers whenever a worker dies."""
    import ray

    here = 0  # restarts within this stage
    while True:
        try:
            return body(here > 0)
        except WorkerBuildError as e:
            raise RunError(f"{e}. Fix that, then run the same command (the run folder keeps "
                           "everything done so far)") from None  # fmt: skip
        except (WorkerLost, ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError) as e:  # fmt: skip
            lost = e if isinstance(e, WorkerLost) else classify(e, None, [], f"the {stage} stage")
            if isinstance(lost, WorkerBuildError):
                raise RunError(f"{lost}. Fix that, then run the same command") from None
            assert isinstance(lost, WorkerLost)
            run.restarts += 1
            here += 1
            report(run, stage, lost)
        except ray.exceptions.RayTaskError as e:
            cause = cause_of(e)
            newest = run.ckpt.newest_valid()
            after = f"; the newest checkpoint is {newest}" if newest else ""
            raise RunError(f"the {stage} stage failed: {type_name(cause)}: "
                           f"{first_line(cause, 3)}{after}. Fix the cause, then run the same "
                           "command") from None  # fmt: skip


def memory_report(run: Run, stage: str, lost: WorkerLost) -> str:
    """The node's memory when the worker was killed, and what the plan expected there."""
    parts = []
    if lost.node_memory_gb is not None:
        used, total = lost.node_memory_gb
        limit = (
            f", over Ray's limit of {lost.threshold_percent:g}%" if lost.threshold_percent else ""
        )
        parts.append(f"the node used {used:.2f} of {total:.1f} GB{limit}")
    else:
        import psutil

        vm = psutil.virtual_memory()
        parts.append(f"the node uses {(vm.total - vm.available) / 1e9:.1f} of "
                     f"{vm.total / 1e9:.1f} GB now")  # fmt: skip
    if stage == "rl" and lost.device is not None:
        expected = float(run.plan.estimate.memory_bytes[lost.device])
        parts.append(f"the plan expected {expected / GIB:.2f} GiB on device {lost.device}")
    return "; ".join(parts)


MEMORY_FIX = (
    "lower what the run holds (smaller train.rollout_batch_prompts or "
    "train.micro_batch_samples_per_device, plan.offload=always, fewer or smaller models per "
    "device), or leave Ray more room (other programs' memory; Ray's memory monitor kills "
    "workers above RAY_memory_usage_threshold, 0.95 of the node's memory)"
)


def report(run: Run, stage: str, lost: WorkerLost) -> None:
    """Say what was lost and where the stage continues; RunError past run.max_restarts."""
    what = str(lost)
    if lost.memory:
        what = f"{what} ({memory_report(run, stage, lost)})"
    newest = run.ckpt.newest_valid() if stage == "rl" else None
    if stage != "rl":
        where = f"the start of the {stage} stage (it keeps no checkpoints)"
    else:
        where = f"checkpoint {newest}" if newest else "the start of the RL stage"
    if run.restarts > run.cfg.run.max_restarts:
        last = run.ckpt.newest_valid()
        resume = (f"The newest complete checkpoint is {last}; resume=auto continues from it"
                  if last else f"There is no checkpoint yet; the {stage} stage starts over")  # fmt: skip
        fix = MEMORY_FIX if lost.memory else "find why workers die (memory, a killed process)"
        raise RunError(
            f"{what}, and run.max_restarts = {run.cfg.run.max_restarts} restarts are used up. "
            f"{resume}. Fix: {fix}, then run the same command"
        ) from None
    print(f"relay: {what}; restart {run.restarts} of {run.cfg.run.max_restarts}: new workers "
          f"continue from {where}", flush=True)  # fmt: skip
