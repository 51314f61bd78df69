"""The house style: ``ruff check`` and ``ruff format --check`` over the repository (configuration in
pyproject.toml ``[tool.ruff]``; the test extra pins ruff). Fix with ``ruff check --fix . && ruff format .``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    return [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    p = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"ruff {' '.join(args)}:\n{p.stdout[-6000:]}{p.stderr[-2000:]}"
