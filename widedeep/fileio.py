"""Atomic file writes: readers see the old file or the whole new one, never a half-written file."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


log = logging.getLogger(__name__)
# .<name>.tmp-<host>-<pid>: the host, so that a cleanup on one machine never judges another machine's pids
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)$")
STALE_AFTER_S = 24 * 3600  # another machine's temporary this old is left from a killed run there


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """The sibling :func:`atomic_open` writes through (the name :func:`remove_stale_temporaries` knows)."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid() if pid is None else pid}")


class NoSpaceError(OSError):
    """The disk (or quota) filled up while writing a file; the file's previous version is untouched."""


def _no_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch.save reports a failed write as a RuntimeError ("unexpected
    pos ...") whose context holds the OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Binary file to write ``path`` through: a temporary sibling, fsync'd, then renamed over ``path``.

    A full disk raises :class:`NoSpaceError` (one line naming ``path``); the temporary is removed and ``path``
    keeps its previous content."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if not _no_space(e):
            raise
        kept = f"{path} still holds its previous version" if path.exists() else "nothing was written there"
        err = NoSpaceError(f"no space left on device writing {path} ({kept}); free some space and run again")
        err.errno = errno.ENOSPC
        raise err from None
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
    """Delete the temporaries that :func:`atomic_open` left when its process was killed.

    This machine's are removed when their process is gone; another machine's (a shared file system) only
    when untouched for :data:`STALE_AFTER_S`. Files of a live writer (another rank, another run) are kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m["pid"])
        if m["host"] == _HOST:
            stale = pid != os.getpid() and not _alive(pid)
        else:
            stale = now - p.stat().st_mtime > STALE_AFTER_S
        if stale:
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info(
            "removed %d unfinished file(s) of a killed run in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed[:4]),
        )
    return removed
