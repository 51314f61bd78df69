"""The released ademxapp weight files and their md5 sums (``models/checksum.md5`` of the seed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

RELEASED_MD5: dict[str, str] = {
    "ilsvrc-cls_rna-a1_cls1000_ep-0001.params": "ff21f45d6bf03284100dcbec571edfad",
    "ilsvrc-cls_rna-a_cls1000_ep-0001.params": "2421c1945b6797cecd3f89db14ca73f6",
    "voc_rna-a1_cls21_s8_ep-0001.params": "a34628a63d5f62dcb98c29c4e281f332",
    "voc_rna-a1_cls21_s8_coco_ep-0001.params": "328c0eca0c45b6345ada2f95edce68d4",
    "cityscapes_rna-a1_cls19_s8_ep-0001.params": "226b3e861a6be7d0dc84e537f4eab154",
    "ade20k_rna-a1_cls150_s8_ep-0001.params": "1faf29850bfa194678f0b8e1cbbffa98",
}


class ChecksumError(ValueError):
    """A file named like a released ademxapp file does not have the released md5."""


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_released(path: str | os.PathLike) -> bool:
    """Check ``path`` against the released md5 when its file name is a released one.

    Returns True when checked and matching, False when the name is not a released one; raises
    :class:`ChecksumError` on a mismatch (a truncated download or a different file under that name).
    """
    name = Path(path).name
    expected = RELEASED_MD5.get(name)
    if expected is None:
        return False
    got = md5sum(path)
    if got != expected:
        raise ChecksumError(
            f"{path}: md5 {got} does not match the released {name} ({expected}); the download is corrupt "
            "or the file was renamed. Re-download it, or pass verify=False to skip the check."
        )
    return True
