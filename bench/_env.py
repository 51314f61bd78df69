"""What every results file records: device, versions, commit."""

from __future__ import annotations

import os
import platform
import subprocess

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
