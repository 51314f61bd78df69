"""What every results file records: device, versions, commit."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo "model name", else lscpu "Model name", else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def device_slug() -> str:
    """``nvidia-h100`` / ``cpu-amd-epyc``: the device part of a results file name."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip()
        words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
        return "nvidia-" + "-".join(words[:2] if words and words[0] in ("geforce", "rtx", "tesla") else words[:1])
    words = [w for w in re.split(r"[^a-z0-9]+", cpu_model().lower()) if w and w not in ("r", "tm", "cpu", "processor")]
    return "cpu-" + "-".join(words[:2]) if words else "cpu"


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
    env = dict(
        commit=commit,
        dirty=dirty,
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        device="cpu",
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    try:
        from importlib.metadata import version

        env["dali"] = version("nvidia-dali-cuda120")
    except Exception:  # noqa: BLE001 - any missing/odd install: no DALI
        env["dali"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, cuda=torch.version.cuda, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return env


def write_results(path: str | os.PathLike, results: list[dict], **fields) -> None:
    """A results file: environment (device, versions, commit), any extra fields, then the rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(environment=environment(), **fields, results=results), indent=2) + "\n")
