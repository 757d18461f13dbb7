"""Workers that die: a stage runs again on new workers, at most run.max_restarts times in
a run. The RL stage continues from its newest complete checkpoint; SFT and the reward
model (no checkpoints) start over."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.run.context import Run
from orchestrator.run.folder import RunError


def with_restarts(
    run: Run, stage: str, body: Callable[[bool], dict[str, float]]
) -> dict[str, float]:
    """body(after_fault) again with new workers whenever a worker dies."""
    import ray

    here = 0  # restarts within this stage
    while True:
        try:
            return body(here > 0)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            run.restarts += 1
            here += 1
            cause = str(e).strip().splitlines()[0][:200]
            newest = run.ckpt.newest_valid() if stage == "rl" else None
            if stage != "rl":
                where = f"the start of the {stage} stage (it keeps no checkpoints)"
            else:
                where = f"checkpoint {newest}" if newest else "the start of the RL stage"
            if run.restarts > run.cfg.run.max_restarts:
                last = run.ckpt.newest_valid()
                resume = (f"The newest complete checkpoint is {last}; resume=auto continues "
                          "from it" if last else f"There is no checkpoint yet; the {stage} "
                          "stage starts over")  # fmt: skip
                raise RunError(
                    f"a model worker died ({cause}) and run.max_restarts = "
                    f"{run.cfg.run.max_restarts} restarts are used up. {resume}. Fix: find "
                    "why workers die (memory, a killed process), then run the same command"
                ) from None
            print(
                f"relay: a model worker died ({cause}); restart {run.restarts} of "
                f"{run.cfg.run.max_restarts}: new workers continue from {where}",
                flush=True,
            )
