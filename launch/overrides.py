"""The `key=value` overrides of every `relay` command: shorthands, and the help text that
lists the config groups and every key."""

from __future__ import annotations

SHORTHANDS = {"resume": "run.resume", "seed": "run.seed", "name": "run.name"}


def expand(overrides: list[str]) -> list[str]:
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        out.append(f"{SHORTHANDS.get(key, key)}{sep}{value}")
    return out


def config_help() -> str:
    from orchestrator.config.load import group_options, load_config
    from orchestrator.config.schema import GROUP_SCHEMAS, to_yaml

    groups = "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in GROUP_SCHEMAS)
    cfg = load_config([])
    return (
        "usage: relay train [group=option ...] [key=value ...]\n\n"
        "Runs SFT, then the RL algorithm, on a local Ray cluster (or the cluster at\n"
        "RAY_ADDRESS / cluster.address). Results go to run.output_dir/run.name.\n\n"
        f"Config groups (configs/):\n{groups}\n\n"
        "Shorthands: resume=auto -> run.resume=auto, seed=N -> run.seed=N, name=X -> run.name=X\n\n"
        "== Config (defaults) ==\n" + to_yaml(cfg)
    )
