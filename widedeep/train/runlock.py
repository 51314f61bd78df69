"""One run per run folder: a lock held while a run is live, and no fresh run over a used folder.

The lock is ``<run>/.lock``, taken with ``flock`` by rank 0 and held until the process exits (the kernel drops it
when the process dies, even on SIGKILL, so a killed run never leaves a stale lock). The file records the host, pid
and start time of its holder for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

# what a training run writes into its run folder (and what --overwrite removes)
RUN_FILES = ("last.pt", "best.pt", "summary.csv", "curves.png", "log.txt", "metrics-val.json")


class RunFolderError(ValueError):
    """The run folder is in use by a live run, or holds a finished/killed run and no --resume/--overwrite."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"--output: {self.path.parent} is in use by another run ({holder}); wait for it to finish, or give "
                "this run another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
        )
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays (removing it would race with the next holder)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']} pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "host and pid unknown"


def check_fresh(run_dir: Path, output: Path, label: str, *, resume: bool, overwrite: bool, remove: bool) -> list[Path]:
    """Refuse a fresh training run (no --resume) into a folder that holds another run's checkpoint or summary;
    with ``overwrite`` the old run's files (and its ``<label>_ep-NNNN.params`` exports) are removed when
    ``remove`` (rank 0). Returns what was (or would be) removed."""
    run_dir, output = Path(run_dir), Path(output)
    used = [run_dir / n for n in ("last.pt", "best.pt", "summary.csv") if (run_dir / n).is_file()]
    if resume or not used:
        return []
    if not overwrite:
        raise RunFolderError(
            f"--output: {run_dir} already holds a run ({', '.join(p.name for p in used)}); continue it with --resume, "
            "start over with --overwrite (removes that run's files and exports), or give another --output"
        )
    old = [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()] + sorted(output.glob(f"{label}_ep-*.params"))
    if remove:
        for p in old:
            p.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    return old
