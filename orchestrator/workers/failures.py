"""What failed on which worker, in words a user can act on.

Ray reports a worker's trouble in several shapes: an exception raised in a method (a
RayTaskError wrapping the worker's own exception), an actor whose constructor raised, an
actor that died (killed, crashed), a worker its node's memory monitor killed. The runtime
turns each into one of two exceptions, naming the device and the roles it hosts:
- `WorkerBuildError`: a worker failed while it was built (its models, engines): a fault
  of the inputs (a model folder vLLM rejects, a missing file), not of the machine, so the
  run stops at once with the worker's own exception type and message;
- `WorkerLost`: a worker died while the run went on (killed, or killed for memory): the
  stage restarts on new workers (orchestrator.run.faults).
"""

from __future__ import annotations

import functools
import pickle
import re
from collections.abc import Callable
from typing import Any

# Ray's memory monitor's words for a worker it killed (its generic death message also
# names "the OOM killer" among possible causes, which says nothing)
MEMORY_KILL = re.compile(r"running low on memory|memory usage threshold|killed by the memory", re.I)
# Ray's memory monitor: "Memory on the node (...) was 0.82GB used / 23.54GB limit (0.03)"
NODE_MEMORY = re.compile(r"was ([\d.]+)\s*GB(?: used)?\s*/\s*([\d.]+)\s*GB")
THRESHOLD = re.compile(r"threshold of \d+B \(([\d.]+)% of")


class WorkerBuildError(RuntimeError):
    """A worker failed while it was built; the message names it and its own error."""


class WorkerLost(RuntimeError):
    """A worker died while the run went on."""

    def __init__(self, message: str, device: int | None, roles: list[str], memory: bool,
                 node_memory_gb: tuple[float, float] | None = None,
                 threshold_percent: float | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.device, self.roles, self.memory = device, roles, memory
        self.node_memory_gb, self.threshold_percent = node_memory_gb, threshold_percent


class RemoteError(Exception):
    """A worker's exception that cannot cross processes (vLLM's pydantic errors cannot be
    pickled), kept as its type's name and its message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name, self.message = type_name, message

    def __reduce__(self) -> tuple[Any, ...]:
        return RemoteError, (self.type_name, self.message)


def portable(method: Callable[..., Any]) -> Callable[..., Any]:
    """A worker method whose exceptions reach the controller with their type and message
    (a RemoteError in place of one that cannot be pickled)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as e:
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 - whatever pickling raises, send the words
                raise RemoteError(type(e).__name__, str(e)) from None
            raise

    return wrapper


def type_name(error: BaseException) -> str:
    return error.type_name if isinstance(error, RemoteError) else type(error).__name__


def cause_of(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError) and error.actor_init_failed:
        inner = getattr(error, "cause", None) or getattr(error, "_cause", None)
        if inner is not None:
            return cause_of(inner)
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
            return cause
    return error


def first_line(error: BaseException, lines: int = 1) -> str:
    """The first `lines` non-empty lines of the error's message, joined (at most 600
    characters)."""
    kept = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()][:lines]
    return " ".join(kept)[:600] if kept else type(error).__name__


def _init_message(error: BaseException) -> str:
    """The constructor's own error of an actor that died in its creation task."""
    text = str(error)
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return tail[-1][:400] if tail else type(error).__name__


def classify(error: BaseException, device: int | None, roles: list[str], what: str) -> Exception:
    """The runtime's exception for `error`, raised by `what` ("building ...", "the call
    actor_train") on `device` (None: unknown), which hosts `roles`."""
    import ray

    where = f"device {device}" if device is not None else "a device"
    hosting = f" (roles {', '.join(roles)})" if roles else ""
    memory = isinstance(error, ray.exceptions.OutOfMemoryError) or (
        isinstance(error, ray.exceptions.RayActorError)
        and not error.actor_init_failed
        and bool(MEMORY_KILL.search(str(error)))
    )
    if memory:
        found, limit = NODE_MEMORY.search(str(error)), THRESHOLD.search(str(error))
        node = (float(found.group(1)), float(found.group(2))) if found else None
        return WorkerLost(f"the worker of {where}{hosting} was killed for memory during {what}",
                          device, roles, True, node,
                          float(limit.group(1)) if limit else None)  # fmt: skip
    if isinstance(error, ray.exceptions.RayActorError) and error.actor_init_failed:
        return WorkerBuildError(f"the worker of {where}{hosting} failed while it was built "
                                f"({what}): {_init_message(error)}")  # fmt: skip
    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
        return WorkerLost(f"the worker of {where}{hosting} died during {what} "
                          f"({first_line(error)})", device, roles, False)  # fmt: skip
    cause = cause_of(error)
    return WorkerBuildError(f"the worker of {where}{hosting} failed {what}: "
                            f"{type_name(cause)}: {first_line(cause, 3)}")  # fmt: skip


def gather(
    labelled: list[tuple[Any, int]], roles_on: Any, what: str, lost_only: bool = False
) -> list[Any]:
    """The values of every reference, each labelled with the device running it, as they
    finish; the first failure becomes the runtime's exception for that device
    (`classify`) at once (its peers may be left waiting on it in a collective). With
    `lost_only` (work of a running stage, not of building), only a dead worker becomes
    the runtime's exception (WorkerLost); any other error is raised as Ray gives it."""
    import ray

    device_of = {ref: device for ref, device in labelled}
    values: dict[Any, Any] = {}
    pending = list(device_of)
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        try:
            values[ref] = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - Ray wraps the worker's errors in many kinds
            device = device_of[ref]
            failure = classify(e, device, roles_on(device), what)
            if lost_only and not isinstance(failure, WorkerLost):
                raise
            raise failure from None
    return [values[ref] for ref, _ in labelled]
