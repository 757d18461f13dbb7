"""`relay submit | status | logs | stop`: a Hydra-configured run as a Ray Job.

relay submit [--address URL] [--python P] [key=value ...]   validate, plan, submit; print the id
relay status JOB [--address URL]                the job's status and run folder
relay logs JOB [--follow] [--address URL]       the job's output (followed until it ends)
relay stop JOB [--address URL]                  ask the run to stop (it checkpoints, then exits 0)

The address is the cluster's dashboard (job server), by default RAY_API_SERVER_ADDRESS,
else RAY_ADDRESS, else http://127.0.0.1:8265. The job's runtime environment carries the
project (this source tree, without .venv, runs/ and other outputs) and the config (the
overrides, recomposed on the cluster from the same configs/, and the composed config as
metadata). The cluster's Python must have Relay's dependencies (`make install` there).
The run folder is `run.output_dir` made absolute here, so the cluster must share that
path (one machine, or a shared filesystem); resubmitting the same overrides with
`resume=auto` continues the run and its wandb run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "runs", "outputs", "wandb", "profiles", "*.egg-info",
            "__pycache__", ".pytest_cache", ".ruff_cache", "benchmarks/results"]  # fmt: skip
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(given: str | None) -> str:
    return (
        given
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


def _client(address: str) -> Any:
    """A JobSubmissionClient, or a ConfigError naming the address when it is unreachable."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator.config.schema import ConfigError, Problem

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection errors come in several kinds
        raise ConfigError([Problem("--address", address, f"no Ray job server answers there "
                                   f"({str(e).splitlines()[0]})",
                                   "start the cluster with `ray start --head` (the dashboard "
                                   "serves jobs on port 8265) or pass --address "
                                   "http://<head>:8265")]) from None  # fmt: skip


def submission(overrides: list[str], python: str = "python") -> tuple[str, dict[str, str], Any]:
    """The entrypoint and metadata of a run: overrides validated and planned here first,
    so a bad config never reaches the cluster; run.output_dir made absolute."""
    from launch.overrides import expand
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import to_yaml
    from orchestrator.runtime.planning import plan_for_run

    cfg = load_config(expand(overrides), for_run=False)
    out = str(Path(cfg.run.output_dir).resolve())
    cfg = replace(cfg, run=replace(cfg.run, output_dir=out))  # the job gets the same path
    expanded = [o for o in expand(overrides) if not o.startswith("run.output_dir=")]
    expanded.append(f"run.output_dir={out}")
    plan_for_run(cfg)  # refuse plans the runtime cannot run, before submitting
    entry = f"{shlex.quote(python)} -m launch.cli train " + " ".join(
        shlex.quote(o) for o in expanded
    )
    meta = {"relay_run": cfg.run.name, "relay_run_dir": str(Path(out) / cfg.run.name),
            "relay_overrides": " ".join(expanded), "relay_config": to_yaml(cfg)[:8000]}  # fmt: skip
    return entry, meta, cfg


def submit(argv: list[str]) -> int:
    from orchestrator.config.schema import ConfigError

    ap = argparse.ArgumentParser(prog="relay submit", description="Submit a run as a Ray Job.")
    ap.add_argument("--address", default=None,
                    help=f"job server (default: RAY_ADDRESS or {DEFAULT_ADDRESS})")  # fmt: skip
    ap.add_argument("--python", default="python",
                    help="the cluster's Python with Relay's dependencies (default: python)")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as for train")
    args = ap.parse_args(argv)
    try:
        entry, meta, cfg = submission(args.overrides, args.python)
        address = _address(args.address)
        client = _client(address)
        job_id = client.submit_job(
            entrypoint=entry,
            runtime_env={
                "working_dir": str(REPO),
                "excludes": EXCLUDES,
                "env_vars": {
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "TOKENIZERS_PARALLELISM": "false",
                    # `relay stop` sends SIGTERM; the run finishes its step and writes a
                    # checkpoint before exiting, so give it time before Ray's SIGKILL
                    "RAY_JOB_STOP_WAIT_TIME_S": "300",
                },
            },
            metadata=meta,
        )
    except ConfigError as e:
        print(f"relay submit: {e}", file=sys.stderr)
        return 2
    print(f"relay submit: job {job_id} submitted to {address}")
    print(f"  run folder: {meta['relay_run_dir']}")
    print(f"  follow it:  relay logs {job_id} --follow --address {address}")
    print(f"  status:     relay status {job_id} --address {address}")
    print(f"  stop it:    relay stop {job_id} --address {address}  (checkpoints, then exits)")
    return 0


def _job_args(prog: str, argv: list[str], follow: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("job_id")
    ap.add_argument("--address", default=None)
    if follow:
        ap.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    return ap.parse_args(argv)


def _with_client(prog: str, argv: list[str], follow: bool = False) -> tuple[Any, Any] | int:
    from orchestrator.config.schema import ConfigError

    args = _job_args(prog, argv, follow)
    try:
        return args, _client(_address(args.address))
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def _unknown(prog: str, job_id: str, e: Exception) -> int:
    print(f"{prog}: job_id = {job_id!r}: no such job on this cluster ({e}). Fix: use the id "
          "`relay submit` printed; `ray job list` lists them", file=sys.stderr)  # fmt: skip
    return 2


def status(argv: list[str]) -> int:
    got = _with_client("relay status", argv)
    if isinstance(got, int):
        return got
    args, client = got
    try:
        info = client.get_job_info(args.job_id)
    except RuntimeError as e:
        return _unknown("relay status", args.job_id, e)
    meta = info.metadata or {}
    print(f"job {args.job_id}: {_name(info.status)}")
    if meta.get("relay_run_dir"):
        print(f"  run folder: {meta['relay_run_dir']}")
    if info.message:
        print(f"  {info.message}")
    return 0


def logs(argv: list[str]) -> int:
    got = _with_client("relay logs", argv, follow=True)
    if isinstance(got, int):
        return got
    args, client = got
    try:
        if not args.follow:
            print(client.get_job_logs(args.job_id), end="")
            return 0
        client.get_job_status(args.job_id)  # an unknown id fails here, not mid-stream
    except RuntimeError as e:
        return _unknown("relay logs", args.job_id, e)

    async def stream() -> None:
        async for chunk in client.tail_job_logs(args.job_id):
            print(chunk, end="", flush=True)

    asyncio.run(stream())
    print(f"relay logs: job {args.job_id} ended: {_name(client.get_job_status(args.job_id))}")
    return 0


def stop(argv: list[str]) -> int:
    got = _with_client("relay stop", argv)
    if isinstance(got, int):
        return got
    args, client = got
    try:
        running = client.stop_job(args.job_id)
    except RuntimeError as e:
        return _unknown("relay stop", args.job_id, e)
    if not running:
        print(
            f"relay stop: job {args.job_id} was not running ({client.get_job_status(args.job_id)})"
        )
        return 0
    print(f"relay stop: asked job {args.job_id} to stop; it writes a checkpoint at the end of "
          "the step in flight. Resubmit the same overrides (resume=auto) to continue.")  # fmt: skip
    return 0


def _name(status: Any) -> str:
    """PENDING, RUNNING, ... from a JobStatus (a str enum)."""
    return str(getattr(status, "value", status)).split(".")[-1]


def wait_for(client: Any, job_id: str, states: set[str], timeout_s: float) -> str:
    """Poll until the job's status is one of `states`, or the timeout; returns the last."""
    end = time.monotonic() + timeout_s
    while True:
        st = _name(client.get_job_status(job_id))
        if st in states or time.monotonic() > end:
            return st
        time.sleep(1.0)
