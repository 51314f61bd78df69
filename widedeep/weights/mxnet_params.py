"""Read and write MXNet NDArray-list ``.params`` files without MXNet.

File layout (little-endian, no padding), as written by ``mx.nd.save`` / ``NDArray::Save``::

    uint64 0x112 (list magic) | uint64 0 (reserved) | uint64 N | N x record | uint64 K | K x (uint64 len, bytes)

A record is one of three generations, told apart by its first uint32:

* legacy (MXNet 0.8/0.9, what the released ademxapp files hold): the word *is* ``ndim``; uint32 dims;
* V1 ``0xF993FAC8``: int32 ndim, int64 dims;
* V2 ``0xF993FAC9`` / V3 ``0xF993FACA``: int32 storage type, (sparse: storage shape), int32 ndim, int64 dims.

then ``int32 dev_type, int32 dev_id, int32 dtype_code`` and C-order data. Sparse arrays are refused with a
clear error: no released model uses them. MXNet 2.x ``.npz``/``.npy`` files are read through numpy.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from widedeep.fileio import atomic_write_bytes  # noqa: F401  (re-exported: weights API)

from .errors import WeightsFormatError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

# mshadow::TypeFlag -> (numpy dtype used for the raw bytes, torch dtype of the result)
_DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    0: (np.dtype("<f4"), torch.float32),
    1: (np.dtype("<f8"), torch.float64),
    2: (np.dtype("<f2"), torch.float16),
    3: (np.dtype("u1"), torch.uint8),
    4: (np.dtype("<i4"), torch.int32),
    5: (np.dtype("i1"), torch.int8),
    6: (np.dtype("<i8"), torch.int64),
    7: (np.dtype("?"), torch.bool),
    8: (np.dtype("<i2"), torch.int16),
    9: (np.dtype("<u2"), torch.uint16),
    10: (np.dtype("<u4"), torch.uint32),
    11: (np.dtype("<u8"), torch.uint64),
    12: (np.dtype("<u2"), torch.bfloat16),  # raw bits, reinterpreted below
}
_CODE_OF: dict[torch.dtype, int] = {t: code for code, (_, t) in _DTYPES.items()}
_STYPES = {1: "row_sparse", 2: "csr"}


class ParamsFormatError(WeightsFormatError):
    """A ``.params`` file is not what it should be; the message names the file and the problem."""


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer; errors name the file and offset."""

    def __init__(self, data: memoryview, path: str):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ParamsFormatError(
                f"{self.path}: truncated file: needed {n} bytes for {what} at offset {self.pos}, "
                f"but the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))


def _read_shape(cur: _Cursor, what: str, legacy_ndim: int | None = None) -> tuple[int, ...]:
    if legacy_ndim is not None:
        ndim = legacy_ndim
        return tuple(cur.unpack(f"<{ndim}I", f"{what} dims")) if ndim else ()
    (ndim,) = cur.unpack("<i", f"{what} ndim")
    if ndim < 0:  # V3 "unknown shape"
        return (-1,)
    if ndim > 32:
        raise ParamsFormatError(f"{cur.path}: implausible ndim {ndim} for {what} at offset {cur.pos - 4}")
    return tuple(cur.unpack(f"<{ndim}q", f"{what} dims")) if ndim else ()


def _read_record(cur: _Cursor, index: int) -> torch.Tensor | None:
    what = f"array #{index}"
    (word,) = cur.unpack("<I", f"{what} header")
    if word in (V2_MAGIC, V3_MAGIC):
        (stype,) = cur.unpack("<i", f"{what} storage type")
        if stype not in (0, -1):
            raise ParamsFormatError(
                f"{cur.path}: {what} is a sparse array ({_STYPES.get(stype, stype)}); only dense arrays are supported"
            )
        shape = _read_shape(cur, what)
        if (word == V2_MAGIC and len(shape) == 0) or shape == (-1,):
            return None
    elif word == V1_MAGIC:
        shape = _read_shape(cur, what)
        if len(shape) == 0:
            return None
    else:
        if word > 32:
            raise ParamsFormatError(
                f"{cur.path}: {what} at offset {cur.pos - 4} starts with 0x{word:08X}: not an NDArray record "
                "(expected a magic 0xF993FAC8/9/A or a legacy ndim <= 32)"
            )
        shape = _read_shape(cur, what, legacy_ndim=word)
        if len(shape) == 0:
            return None
    _dev_type, _dev_id, code = cur.unpack("<iii", f"{what} context and dtype")
    if code not in _DTYPES:
        raise ParamsFormatError(f"{cur.path}: {what} has unknown dtype code {code}")
    np_dtype, torch_dtype = _DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    raw = cur.take(count * np_dtype.itemsize, f"{what} data ({count} x {np_dtype})")
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    tensor = torch.from_numpy(arr)
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    elif tensor.dtype != torch_dtype:
        tensor = tensor.to(torch_dtype)
    return tensor


def read_params(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an MXNet ``.params`` file into ``{name: tensor}`` (names keep their ``arg:``/``aux:`` prefix).

    Arrays keep their stored dtype and shape; order follows the file. Empty arrays map to empty tensors.
    Raises :class:`ParamsFormatError` naming the file on a bad magic, truncation, sparse arrays or a
    name/array count mismatch.
    """
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    try:
        if data[:4] == b"PK\x03\x04":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        if data[:6] == b"\x93NUMPY":
            return {"0": torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))}
    except Exception as e:  # a zip that is not an .npz, e.g. a torch.save file under a .params name
        raise ParamsFormatError(
            f"{path}: a zip/numpy file that numpy cannot read as MXNet 2.x arrays ({type(e).__name__}: {e}); "
            "a torch.save checkpoint should be named .pth"
        ) from None
    cur = _Cursor(memoryview(data), path)
    if len(data) < 24:
        raise ParamsFormatError(f"{path}: truncated file: {len(data)} bytes, a .params header needs 24")
    magic, _reserved, count = cur.unpack("<QQQ", "header")
    if magic != LIST_MAGIC:
        raise ParamsFormatError(
            f"{path}: bad magic 0x{magic:X}: not an MXNet NDArray list file (expected 0x{LIST_MAGIC:X})"
        )
    if count > len(data):
        raise ParamsFormatError(f"{path}: header claims {count} arrays in a {len(data)}-byte file")
    arrays = [_read_record(cur, i) for i in range(count)]
    (n_names,) = cur.unpack("<Q", "name count")
    if n_names not in (0, count):
        raise ParamsFormatError(f"{path}: {count} arrays but {n_names} names")
    names = []
    for i in range(n_names):
        (length,) = cur.unpack("<Q", f"length of name #{i}")
        names.append(bytes(cur.take(length, f"name #{i}")).decode("utf-8"))
    if cur.pos != len(data):
        raise ParamsFormatError(f"{path}: {len(data) - cur.pos} unexpected trailing bytes after the name list")
    if not names:
        names = [str(i) for i in range(count)]
    if len(set(names)) != len(names):
        raise ParamsFormatError(f"{path}: duplicate array names")
    return {n: (a if a is not None else torch.empty(0)) for n, a in zip(names, arrays)}


def _encode_record(tensor: torch.Tensor, fmt: str) -> bytes:
    t = tensor.detach().cpu().contiguous()
    if t.is_sparse:
        raise ValueError("sparse tensors cannot be written to .params by this writer")
    if t.dtype not in _CODE_OF:
        raise ValueError(f"dtype {t.dtype} has no MXNet type code")
    code = _CODE_OF[t.dtype]
    raw = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().astype(_DTYPES[code][0], copy=False)
    shape = tuple(t.shape)
    if fmt == "legacy":
        head = struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    elif fmt == "v2":
        head = struct.pack(f"<Iii{len(shape)}q", V2_MAGIC, 0, len(shape), *shape)
    else:
        raise ValueError(f"unknown .params record format {fmt!r}: expected 'v2' or 'legacy'")
    if not shape:  # MXNet (non-numpy mode) treats ndim 0 as "no data"
        return head
    return head + struct.pack("<iii", 1, 0, code) + raw.tobytes()


def write_params(path: str | os.PathLike, arrays: Mapping[str, torch.Tensor], *, fmt: str = "v2") -> None:
    """Write ``{name: tensor}`` as an MXNet NDArray-list file, atomically (temp file + rename).

    ``fmt="v2"`` writes what MXNet 1.x writes (magic 0xF993FAC9, dense); ``fmt="legacy"`` writes the
    MXNet 0.8/0.9 records of the released ademxapp files. Both load in MXNet 1.9.
    """
    body = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    body += [_encode_record(t, fmt) for t in arrays.values()]
    body.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        enc = name.encode("utf-8")
        body.append(struct.pack("<Q", len(enc)) + enc)
    atomic_write_bytes(path, b"".join(body))
