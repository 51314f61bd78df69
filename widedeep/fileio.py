"""Atomic file writes: readers see the old file or the whole new one, never a half-written file."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


log = logging.getLogger(__name__)
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Binary file to write ``path`` through: a temporary sibling, fsync'd, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the name remove_stale_temporaries knows
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files that :func:`atomic_open` left when its process was killed.

    Files of a process that is still running (another rank, another run writing now) are kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d unfinished file(s) of a killed run in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed[:4]))
    return removed
