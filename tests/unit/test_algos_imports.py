"""algos/ imports with ray, vllm and deepspeed blocked (STYLE rule 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib
import pkgutil
import sys

BLOCKED = ('ray', 'vllm', 'deepspeed')


class Block:
    # refuses ray, vllm, deepspeed and every submodule of them (ray.util, vllm.config, ...)
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked: ' + name)
        return None


sys.meta_path.insert(0, Block())

import algos.losses, algos.rewards, algos.advantages, algos.graph, algos.ppo  # noqa: E401

# any module added to algos/ later is held to the same rule
import algos
for info in pkgutil.walk_packages(algos.__path__, 'algos.'):
    importlib.import_module(info.name)

loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
if loaded:
    sys.exit('heavy modules were imported: %s' % loaded)

# the blocker works, so the imports above really ran without these packages
for name in ('ray', 'vllm', 'deepspeed', 'ray.util', 'deepspeed.ops'):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    sys.exit('the import blocker let %s through' % name)
print('ok')
"""


def test_algos_imports_without_ray_vllm_deepspeed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_importing_the_package_itself_loads_nothing_heavy() -> None:
    # algos/__init__.py is a docstring: importing the package loads not even torch
    script = "import sys, algos; sys.exit('torch was imported' if 'torch' in sys.modules else 0)"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr


def test_planner_imports_without_torch() -> None:
    """planner/ is pure Python (numpy at most): every module imports with torch, ray,
    vllm and deepspeed blocked, so plans for large clusters are made anywhere."""
    script = (
        "import importlib, pkgutil, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'ray', 'vllm', 'deepspeed'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import planner\n"
        "for info in pkgutil.walk_packages(planner.__path__, 'planner.'):\n"
        "    importlib.import_module(info.name)\n"
        "from planner.search import symmetric\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
