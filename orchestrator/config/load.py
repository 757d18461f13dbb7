"""Composing a config: Hydra's compose over configs/ with the user's overrides, each
override checked first (misspelled keys, unknown group options, wrong types), then every
rule (orchestrator.config.rules); one ConfigError lists every problem."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from orchestrator.config.rules import validate
from orchestrator.config.schema import (
    CONFIG_DIR,
    GROUP_SCHEMAS,
    LEAF_PATHS,
    ConfigError,
    Problem,
    RelayConfig,
    register_configs,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_overrides(overrides: list[str]) -> list[Problem]:
    """Catch misspelled keys and unknown group options before Hydra composes."""
    problems: list[Problem] = []
    for ov in overrides:
        if "=" not in ov:
            problems.append(
                Problem(ov, ov, "an override has the form key=value", f"write it as {ov}=<value>")
            )
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUP_SCHEMAS:
            options = group_options(key)
            if value not in options:
                problems.append(
                    Problem(
                        key,
                        value,
                        f"the config group '{key}' has no option '{value}'",
                        f"use one of {options}",
                    )
                )
            continue
        if key.startswith("hydra."):
            continue
        if key not in LEAF_PATHS:
            close = difflib.get_close_matches(key, list(LEAF_PATHS), n=1, cutoff=0.6)
            fix = (
                f"did you mean '{close[0]}'?" if close else "see `relay train --help` for the keys"
            )
            problems.append(Problem(key, value, "unknown key", fix))
            continue
        type_problem = _type_problem(key, value, str(LEAF_PATHS[key]))
        if type_problem:
            problems.append(type_problem)
    return problems


def _type_problem(key: str, raw: str, annotation: str) -> Problem | None:
    """A wrong-typed override value (int, float, bool fields; null where optional)."""
    import yaml

    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string; Hydra as a float
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None:
        ok = "None" in kinds
    elif "bool" in kinds:
        ok = isinstance(value, bool)
    elif "int" in kinds and "float" not in kinds:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in kinds:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if ok:
        return None
    want = " or ".join(sorted("null" if k == "None" else k for k in kinds))
    return Problem(key, raw, f"must be {want}", f"give {key} a value of type {want}")


def compose(overrides: list[str]) -> DictConfig:
    """Compose configs/ with the overrides (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def load_config(overrides: list[str], for_run: bool = True) -> RelayConfig:
    """Compose, type-check and validate; raise ConfigError listing every problem.
    for_run=False (`relay plan`) skips the rules of running on this machine."""
    problems = check_overrides(overrides)
    good = [
        o
        for o in overrides
        if not any(o.split("=", 1)[0].lstrip("+~") == p.field for p in problems)
    ]
    try:
        cfg = compose(good)
    except Exception as e:  # Hydra/OmegaConf type or parse errors name the key in the text
        msg = str(e).splitlines()[0]
        problems.append(
            Problem(
                "overrides",
                good,
                f"could not compose the config ({msg})",
                "give each key a value of its declared type",
            )
        )
        raise ConfigError(problems) from None
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RelayConfig)
    problems += validate(obj, for_run)
    if problems:
        raise ConfigError(problems)
    return obj
