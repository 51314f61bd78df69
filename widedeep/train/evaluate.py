"""The seed's test protocols (§11, §12): classification scales/flip/3 crops, segmentation canvas, flip,
shift-and-stitch ``--test-steps``, bicubic upsampling, one dataset-wide confusion matrix."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

STRIDE = 8


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def shift_offsets(steps: int, stride: int = STRIDE) -> list[int]:
    """Input shifts of shift-and-stitch: output cell j of shift d sits over pixel stride*j + stride/2 + d.

    k steps give shifts (stride/k) i + stride/(2k) - stride/2, e.g. k=2: -2, +2 (the seed's windows at 2 and 6
    inside a 4-px padded copy); k=1: 0.
    """
    if steps < 1 or stride % steps or (stride // steps) % 2 and steps > 1:
        raise ValueError(f"--test-steps {steps} must divide the stride {stride} into even sub-strides (1, 2 or 4)")
    sub = stride // steps
    return [sub * i + sub // 2 - stride // 2 for i in range(steps)] if steps > 1 else [0]


@torch.no_grad()
def dense_probs(
    model: nn.Module, canvas: torch.Tensor, *, flip: bool, steps: int, stride: int = STRIDE
) -> torch.Tensor:
    """Softmax probabilities (N, C, H/s', W/s') at stride s' = stride/steps for a (N, 3, H, W) canvas (H, W % stride
    == 0), averaging the mirrored input's (un-mirrored) probabilities when ``flip``."""
    n, _, h, w = canvas.shape
    offs = shift_offsets(steps, stride)
    pad = stride // 2
    padded = F.pad(canvas, (pad, pad, pad, pad))
    views = [padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy in offs for dx in offs]
    x = torch.cat(views)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    p = torch.softmax(model(x).float(), 1)
    if flip:
        half = p.shape[0] // 2
        p = (p[:half] + p[half:].flip(-1)) / 2
    c, hs, ws = p.shape[1], p.shape[2], p.shape[3]
    p = p.view(steps, steps, n, c, hs, ws)
    out = p.new_empty(n, c, hs * steps, ws * steps)
    for i in range(steps):
        for j in range(steps):
            out[:, :, i::steps, j::steps] = p[i, j]
    return out


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] and size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink and mode != "nearest")


@torch.no_grad()
def segment(
    model: nn.Module,
    image: torch.Tensor,
    *,
    scales: Iterable[int | None] = (None,),
    flip: bool = False,
    steps: int = 1,
    canvas_min: int = 0,
    stride: int = STRIDE,
) -> torch.Tensor:
    """Class probabilities (C, H, W) for one normalised image (3, H, W) at its original size.

    Per scale (longer side; None = as is): resize (bicubic), paste top-left into a zero (= mean colour) canvas of
    at least ``canvas_min`` rounded up to the stride, run :func:`dense_probs`, upsample bicubically by the
    prediction stride, crop the image, resize back; scales average their probabilities (our choice: the seed
    implements one scale).
    """
    _, h0, w0 = image.shape
    scales = list(scales)
    acc = None
    for s in scales:
        r = 1.0 if s is None else s / max(h0, w0)
        h, w = max(1, round(h0 * r)), max(1, round(w0 * r))
        x = _resize(image[None], (h, w), "bicubic")
        H, W = (
            max(_ceil_to(h, stride), _ceil_to(canvas_min, stride)),
            max(_ceil_to(w, stride), _ceil_to(canvas_min, stride)),
        )
        canvas = F.pad(x, (0, W - w, 0, H - h))
        p = dense_probs(model, canvas, flip=flip, steps=steps, stride=stride)
        p = F.interpolate(p, size=(H, W), mode="bicubic", align_corners=False)[:, :, :h, :w]
        p = _resize(p, (h0, w0), "bilinear")[0]
        acc = p if acc is None else acc + p
    return acc / len(scales)


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, *, flip: bool = False) -> torch.Tensor:
    """Mean softmax over crops (images (N, K, 3, s, s) or (N, 3, s, s)) and, with ``flip``, their mirrors."""
    if images.dim() == 4:
        images = images[:, None]
    n, k = images.shape[:2]
    x = images.flatten(0, 1)
    p = torch.softmax(model(x).float(), 1)
    if flip:
        p = (p + torch.softmax(model(x.flip(-1)).float(), 1)) / 2
    return p.view(n, k, -1).mean(1)


def canvas_for(dataset: str, crop_size: int) -> int:
    """The seed's test canvas: a fixed crop-size square for VOC / ADE20K; the image itself for Cityscapes."""
    return 0 if dataset == "cityscapes" else crop_size


def nan_to_none(d):
    if isinstance(d, dict):
        return {k: nan_to_none(v) for k, v in d.items()}
    if isinstance(d, list):
        return [nan_to_none(v) for v in d]
    return None if isinstance(d, float) and math.isnan(d) else d


__all__: list[str] = ["segment", "classify", "dense_probs", "shift_offsets", "canvas_for", "nan_to_none"]
