"""Per-sample checks shared by both backends: readable images, masks of the right size and label set."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .labels import LabelSpace


class BadSampleError(ValueError):
    """An image or mask that cannot be used; the message names the file."""


def image_size(path: str, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the header only (of ``data`` when given: the file's bytes, already read)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return im.size
    except Exception as e:  # PIL raises several types for garbage
        raise BadSampleError(f"{path}: not a readable image ({e})") from None


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()  # decode now so a truncated file fails here, naming the file
            return im.convert("RGB")
    except Exception as e:
        raise BadSampleError(f"{path}: cannot decode image ({e})") from None


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
        raise BadSampleError(f"{path}: mask is {raw.shape[1]}x{raw.shape[0]} but image {image_path} is {size[0]}x{size[1]}")
    try:
        return space.encode(raw)
    except ValueError as e:
        raise BadSampleError(f"{path}: {e}") from None
