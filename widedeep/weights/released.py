"""The released ademxapp weight files and their md5 sums (``models/checksum.md5`` of the seed).

A file whose *name* is a released one is md5-checked. The trainer exports its own weights under the same
kind of names (``<label>_ep-0001.params``), so by default a mismatch only warns and the file loads as the
user's own; ``verify="strict"`` turns a mismatch into :class:`ChecksumError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("widedeep.weights")

RELEASED_MD5: dict[str, str] = {
    "ilsvrc-cls_rna-a1_cls1000_ep-0001.params": "ff21f45d6bf03284100dcbec571edfad",
    "ilsvrc-cls_rna-a_cls1000_ep-0001.params": "2421c1945b6797cecd3f89db14ca73f6",
    "voc_rna-a1_cls21_s8_ep-0001.params": "a34628a63d5f62dcb98c29c4e281f332",
    "voc_rna-a1_cls21_s8_coco_ep-0001.params": "328c0eca0c45b6345ada2f95edce68d4",
    "cityscapes_rna-a1_cls19_s8_ep-0001.params": "226b3e861a6be7d0dc84e537f4eab154",
    "ade20k_rna-a1_cls150_s8_ep-0001.params": "1faf29850bfa194678f0b8e1cbbffa98",
}
# The released Model A: its reference accuracy needs caffe-style (pad 0) max-pools.
RELEASED_MODEL_A = "ilsvrc-cls_rna-a_cls1000_ep-0001.params"

# verify= values: True/"warn" (check released names, warn on a mismatch), "strict" (raise), False/"off"
VERIFY_MODES = {True: "warn", "warn": "warn", "strict": "strict", False: "off", "off": "off", None: "off"}
SKIP_HINT = "verify=False (on the command line: --no-verify-weights)"


class ChecksumError(ValueError):
    """A file named like a released ademxapp file does not have the released md5 (only with ``verify="strict"``)."""


def verify_mode(verify: bool | str | None) -> str:
    try:
        return VERIFY_MODES[verify]
    except (KeyError, TypeError):
        raise ValueError(f"verify must be True, False or 'strict', got {verify!r}") from None


_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """md5 of a file; cached by (real path, size, mtime) so deciding several things from it reads it once."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _MD5_CACHE:
        return _MD5_CACHE[key]
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _MD5_CACHE[key] = digest = h.hexdigest()
    return digest


def check_released(path: str | os.PathLike, verify: bool | str = True) -> str:
    """md5-check ``path`` when its file name is a released one.

    Returns ``"verified"`` (released name, released md5), ``"mismatch"`` (released name, other md5: logged
    as a warning and treated as the user's own file) or ``"unchecked"`` (not a released name, or
    ``verify=False``). With ``verify="strict"`` a mismatch raises :class:`ChecksumError`.
    """
    mode = verify_mode(verify)
    name = Path(path).name
    expected = RELEASED_MD5.get(name)
    if mode == "off" or expected is None:
        return "unchecked"
    got = md5sum(path)
    if got == expected:
        return "verified"
    if mode == "strict":
        raise ChecksumError(
            f"{path}: md5 {got} does not match the released {name} ({expected}); the download is corrupt "
            f"or the file was renamed. Re-download it, or pass verify=True to load it as your own file, or "
            f"{SKIP_HINT} to skip the check."
        )
    log.warning(
        "%s: md5 %s does not match the released %s (%s): loading it as your own file, not the released "
        "one (re-download it if you meant the released file)",
        path,
        got,
        name,
        expected,
    )
    return "mismatch"


def verify_released(path: str | os.PathLike, *, strict: bool = False) -> bool:
    """True when ``path`` has a released name and the released md5; False otherwise (a mismatch warns).

    ``strict=True``: a mismatch raises :class:`ChecksumError` (a truncated download or another file under
    that name).
    """
    return check_released(path, "strict" if strict else True) == "verified"


def is_released_model_a(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds the released Model A weights, decided by its md5 (whatever its name)."""
    return md5sum(path) == RELEASED_MD5[RELEASED_MODEL_A]
