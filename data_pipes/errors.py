"""Per-sample checks shared by both backends: readable images, masks of the right size and label set."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from .labels import LabelSpace


class BadSampleError(ValueError):
    """An image or mask that cannot be used; the message names the file."""


def image_size(path: str, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the header only (of ``data`` when given: the file's bytes, already read)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return im.size
    except Exception as e:  # PIL raises several types for garbage
        raise BadSampleError(f"{path}: not a readable image ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """PIL's message without the stream it read from (``<_io.BytesIO object at 0x...>`` names no file)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow knows: cannot identify it"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)) or type(e).__name__


def check_complete(path: str, data: bytes) -> None:
    """Refuse a JPEG with no end-of-image marker (FFD9) after its last scan (FFDA): a truncated file.

    Both backends apply this rule before decoding, so they make the same decision in every epoch: whether a
    decoder accepts such a file depends on its buffering (Pillow) or on the crop (DALI's ROI decode stops at the
    window's last row), i.e. on the epoch. FFD9 cannot occur inside entropy-coded data (0xFF is stuffed), and an
    EXIF thumbnail's own EOI comes before the main image's scans."""
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise BadSampleError(
            f"{path}: cannot decode image (truncated JPEG: no end-of-image marker after its last scan)"
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as DALI's decoders give it: the stored pixel grid (the EXIF orientation tag is ignored, as the masks
    are drawn on that grid); 16-bit grayscale scaled to 8 bits by round(v / 257) (Pillow's ``convert`` would clip
    it to white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB on its stored pixel grid (see :func:`to_rgb`, :func:`check_complete`)."""
    try:
        with open(path, "rb") as f:
            check_complete(path, f.read())
        with Image.open(path) as im:
            im.load()  # decode now so a truncated file fails here, naming the file
            return to_rgb(im)
    except BadSampleError:
        raise
    except Exception as e:
        raise BadSampleError(f"{path}: cannot decode image ({_reason(e)})") from None


def load_mask(path: str, space: LabelSpace, size: tuple[int, int], image_path: str) -> np.ndarray:
    """(H, W) uint8 training ids. Palette PNGs are read as indices, never as colours."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise BadSampleError(f"{path}: mask mode {im.mode!r}, expected a single-channel 8-bit PNG (P or L)")
            raw = np.asarray(im)
    except BadSampleError:
        raise
    except Exception as e:
        raise BadSampleError(f"{path}: cannot decode mask ({e})") from None
    if (raw.shape[1], raw.shape[0]) != tuple(size):
        raise BadSampleError(
            f"{path}: mask is {raw.shape[1]}x{raw.shape[0]} but image {image_path} is {size[0]}x{size[1]}"
        )
    try:
        return space.encode(raw)
    except ValueError as e:
        raise BadSampleError(f"{path}: {e}") from None
