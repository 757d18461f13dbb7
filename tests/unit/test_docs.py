"""docs/ stays true: every config key and every README command is documented/tested."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from orchestrator.config.schema import LEAF_PATHS

REPO = Path(__file__).resolve().parents[2]


def documented_metrics() -> list[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return [re.sub(r"<[a-z]+>", "*", m) for m in re.findall(r"^\| `([^`]+)`", text, re.M)]


def undocumented(keys: set[str]) -> list[str]:
    patterns = documented_metrics()
    return sorted(k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in patterns))


def test_every_config_key_is_documented() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in LEAF_PATHS if f"`{k}`" not in text]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_readme_has_exactly_the_two_setup_commands() -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_benchmark_scripts_put_the_repository_first_on_the_path() -> None:
    """`python benchmarks/<name>.py` puts benchmarks/ first on sys.path, where planner.py
    would shadow the planner package that the orchestrator imports: every script that
    imports the project's packages must insert the repository before them."""
    project = re.compile(r"^\s*(from|import) (orchestrator|planner|launch|algos)\b", re.M)
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        text = script.read_text()
        first = project.search(text)
        if first is None:
            continue
        insert = text.find("sys.path.insert(0, str(REPO))")
        assert 0 <= insert < first.start(), f"{script.name}: insert REPO into sys.path first"


def test_one_script_runs_every_gpu_test() -> None:
    """tests/gpu/run_gpu_checks.sh selects the `gpu` marker over the whole test tree (so a
    new GPU test is in it without a list), bounded in time, and is executable."""
    import os

    script = REPO / "tests" / "gpu" / "run_gpu_checks.sh"
    text = script.read_text()
    assert "-m gpu tests" in text and "timeout 480" in text
    assert os.access(script, os.X_OK)
    marked = [p for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()]
    assert len(marked) >= 3, marked
