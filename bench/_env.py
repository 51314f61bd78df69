"""What every results file records: device, versions, commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(commit=commit, dirty=dirty, torch=torch.__version__, triton=triton_version, python=platform.python_version(),
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               device="cpu", triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, cuda=torch.version.cuda, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return env


def write_results(path: str | os.PathLike, results: list[dict], **fields) -> None:
    """A results file: environment (device, versions, commit), any extra fields, then the rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(environment=environment(), **fields, results=results), indent=2) + "\n")
