"""The architecture, enforced: every module's imports (those inside functions too) point one
way, algos <- planner <- orchestrator <- launch, and inside the orchestrator its
subpackages likewise (data <- models <- engines <- config <- interfaces <- workers <-
runtime <- run); no import closes a circle; algos/ and planner/ import no Ray, vLLM or
DeepSpeed; no source file is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("algos", "planner", "orchestrator", "launch")
SUBPACKAGES = ("data", "models", "engines", "config", "interfaces", "workers", "runtime", "run")
HEAVY = ("ray", "vllm", "deepspeed")
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports anywhere in its body: project modules by their dotted
    name (`from a.b import c` is a.b.c when c is a module), others by their top name."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name if a.name in known else a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
            if node.module not in known:
                out = {m for m in out if m != node.module} | {node.module.split(".")[0]}
    return out


def rank(module: str) -> tuple[int, int]:
    """(package layer, orchestrator subpackage layer) of a project module."""
    parts = module.split(".")
    layer = PACKAGES.index(parts[0])
    sub = SUBPACKAGES.index(parts[1]) if parts[0] == "orchestrator" and len(parts) > 2 else -1
    return layer, sub


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def test_imports_point_one_way() -> None:
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            if dep.split(".")[0] not in PACKAGES:
                continue
            (a, sa), (b, sb) = rank(module), rank(dep)
            if b > a or (a == b == PACKAGES.index("orchestrator") and sa >= 0 and sb > sa):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_algos_and_planner_import_no_runtime_library() -> None:
    wrong = [f"{m} -> {d}" for m, deps in graph().items() if m.split(".")[0] in ("algos", "planner")
             for d in deps if d in HEAVY]  # fmt: skip
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    g = {m: {d for d in deps if d in set(modules())} for m, deps in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_over_600_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, long


def test_the_checker_sees_imports_inside_functions() -> None:
    known = modules()
    deps = imports(REPO / "orchestrator" / "run" / "controller.py", known)
    assert "orchestrator.runtime.planning" in deps  # imported inside Controller.__init__
