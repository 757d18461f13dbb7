"""`relay`: the command-line entry point.

relay train [key=value ...]     run the configured job (SFT -> RL) on Ray
relay train --help              the config groups, their options and every key
relay config [key=value ...]    print the composed, validated config
relay plan [key=value ...]      the execution plan and its estimated cost, without running
relay profile [--out F]         measure this machine's per-layer costs for the planner
relay profile --calls [OVERRIDES]  measure this job's calls under each layout (planner)
relay submit [key=value ...]    the run as a Ray Job on a cluster; status, logs, stop follow it
relay convert FILE.gguf FOLDER  a GGUF model file as a model folder for model.path
"""

from __future__ import annotations

import os
import sys
from typing import Any

USAGE = """usage: relay <command> [key=value ...]

commands:
  train     run a Hydra-configured job on a local Ray cluster (or RAY_ADDRESS)
  config    print the composed and validated configuration, then exit
  plan      the execution plan of the same overrides: table, estimate per mode, Gantt chart
  profile   measure this machine's per-layer costs (profiles/cpu.json) for the planner;
            with --calls, this job's calls under each layout (cluster.calls_profile)
  submit    send the run to a Ray cluster as a Ray Job (--address); prints the job id
  status    a submitted run's status (relay status JOB)
  logs      a submitted run's output (relay logs JOB [--follow])
  stop      stop a submitted run at its next step boundary, with a checkpoint
  convert   a GGUF file (llama.cpp's format) as a model folder: relay convert F.gguf OUT

`relay <command> --help` shows the configuration and its groups.
Examples:
  relay train                                   # the default job: SFT -> PPO on the sort task
  relay train train.steps=20 run.name=quick     # override any key
  relay train run.name=quick resume=auto        # continue a run from its newest checkpoint
"""


def _setup_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    # tasks whose inputs died with a worker: the runtime reports the worker, once
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")


def init_ray(cfg: object) -> None:
    """Join cluster.address / RAY_ADDRESS, or start a local Ray with CPU device slots."""
    import ray

    from orchestrator.config.schema import ConfigError, Problem

    c = cfg.cluster  # type: ignore[attr-defined]
    address = c.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray raises several kinds here
            raise ConfigError(
                [
                    Problem(
                        "cluster.address",
                        address,
                        f"cannot reach a Ray cluster ({e})",
                        "start it with `ray start --head` or fix the address",
                    )
                ]
            ) from None
        have = ray.cluster_resources().get("relay_device" if c.device == "cpu" else "GPU", 0)
        need = c.num_nodes * c.devices_per_node
        if have < need:
            raise ConfigError(
                [
                    Problem(
                        "cluster.devices_per_node",
                        c.devices_per_node,
                        f"the config asks for {need} devices, the Ray cluster at "
                        f"{address} has {int(have)}",
                        "start the nodes with --resources='{\"relay_device\": N}' or "
                        "ask for fewer devices",
                    )
                ]
            )
        return
    ray.init(
        address="local",  # a new instance: never a `ray start` cluster met by chance
        num_cpus=os.cpu_count() or 1,
        resources={"relay_device": c.devices_per_node},
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="warning",
    )


def train(argv: list[str]) -> int:
    from launch.overrides import config_help, expand
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError
    from orchestrator.run.controller import Controller, RunError
    from orchestrator.runtime.planning import plan_for_run

    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        return 0
    try:
        cfg = load_config(expand(argv))
    except ConfigError as e:
        print(f"relay train: {e}", file=sys.stderr)
        return 2
    import ray

    from orchestrator.run.context import install_stop_handler

    install_stop_handler()  # before Ray starts, so an early SIGTERM is a graceful stop too
    try:
        plan = plan_for_run(cfg)
        init_ray(cfg)
        summary = Controller(cfg, plan).run()
    except (ConfigError, RunError) as e:
        print(f"relay train: {e}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if summary.get("stopped"):
        print(f"relay train: stopped on request. Run folder: {summary['run_dir']}")
        return 0
    print(f"relay train: done. Run folder: {summary['run_dir']}")
    for stage in ("sft", "rl"):
        if stage in summary:
            vals = " ".join(
                f"{k}={v:.4g}" for k, v in sorted(summary[stage].items()) if k.startswith("eval/")
            )
            print(f"  {stage}: {vals}")
    return 0


def show_config(argv: list[str]) -> int:
    from launch.overrides import config_help, expand
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError, to_yaml

    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        return 0
    try:
        print(to_yaml(load_config(expand(argv))))
    except ConfigError as e:
        print(f"relay config: {e}", file=sys.stderr)
        return 2
    return 0


def plan(argv: list[str]) -> int:
    from launch.plan import plan as run

    return run(argv)


def profile(argv: list[str]) -> int:
    if "--calls" in argv:  # this job's calls under each layout (launch/profile_calls.py)
        from launch.profile_calls import profile_calls

        return profile_calls([a for a in argv if a != "--calls"])
    from launch.profile import profile as run

    return run(argv)


def convert(argv: list[str]) -> int:
    """`relay convert FILE.gguf FOLDER [--force]`: 0, or 2 with the reason."""
    import argparse

    from orchestrator.models.gguf import ConvertError, convert_gguf

    parser = argparse.ArgumentParser(
        prog="relay convert",
        description="A GGUF model file as a Hugging Face folder for model.path (float32, "
        "the tokenizer and its chat template; no quantization_config).",
    )
    parser.add_argument("gguf_file")
    parser.add_argument("folder")
    parser.add_argument("--force", action="store_true", help="replace a non-empty folder")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        out = convert_gguf(args.gguf_file, args.folder, args.force)
    except ConvertError as e:
        print(f"relay convert: {e}", file=sys.stderr)
        return 2
    print(f"relay convert: wrote {out}; use it with model.path={out}")
    return 0


def _jobs(name: str) -> Any:
    def run(argv: list[str]) -> int:
        from launch import jobs

        return getattr(jobs, name)(argv)

    return run


COMMANDS = {
    "train": train,
    "config": show_config,
    "plan": plan,
    "profile": profile,
    "convert": convert,
    **{name: _jobs(name) for name in ("submit", "status", "logs", "stop")},
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_env()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(
            f"relay: unknown command '{cmd}'; commands: {', '.join(COMMANDS)}\n\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
