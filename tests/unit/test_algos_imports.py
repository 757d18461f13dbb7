"""algos/ imports with ray, vllm and deepspeed blocked (STYLE rule 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'vllm', 'deepspeed'):
            raise ImportError('blocked: ' + name)
        return None

sys.meta_path.insert(0, Block())
import algos, algos.graph, algos.losses, algos.rewards, algos.advantages, algos.ppo
assert not any(m.split('.')[0] in ('ray', 'vllm', 'deepspeed') for m in sys.modules)
print('ok')
"""


def test_algos_imports_without_ray_vllm_deepspeed() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
