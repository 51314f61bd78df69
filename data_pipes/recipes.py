"""The seed's augmentation recipes as per-sample *parameters*, drawn once from ``(seed, epoch, index)``.

Both backends (DALI and torch/Pillow) execute the same parameters, so their outputs agree geometrically, a
resumed run draws the same augmentations, and the number of workers or threads never changes the data.
Geometry is in pixels of the decoded image; windows may extend past the image (padding fills them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_RGB_255 = tuple(m * 255 for m in MEAN)  # padding colour: 0 after normalisation
FEATURE_STRIDE = 8
ORIGIN_SIZE = {"voc": 500, "cityscapes": 2048, "ade20k": 512}
SEG_TEST_SCALE = {"voc": 500, "cityscapes": 2048, "ade20k": 500}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent stream per (seed, epoch, sample): order- and worker-independent augmentation."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


@dataclass(frozen=True)
class ClsTrain:
    """Inception random-resized crop, fb.resnet colour jitter, AlexNet PCA lighting, flip (seed §9.2)."""

    crop: int = 224
    area: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    lighting: float = 0.1
    flip: bool = True

    def draw(self, rng: np.random.Generator, width: int, height: int) -> dict:
        window = None
        for _ in range(10):
            area = rng.uniform(*self.area) * width * height
            aspect = rng.uniform(*self.ratio)
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if rng.random() < 0.5:
                w, h = h, w
            if 0 < w <= width and 0 < h <= height:
                window = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
                break
        if window is None:  # shorter side, centred
            s = min(width, height)
            window = ((width - s) // 2, (height - s) // 2, s, s)
        return {
            "window": window,  # x0, y0, w, h
            "flip": bool(self.flip and rng.random() < 0.5),
            "photometric": photometric_params(rng, self.jitter, self.lighting),
        }


def photometric_params(rng: np.random.Generator, jitter: float, lighting: float) -> np.ndarray:
    """(9,) float32: brightness, contrast, saturation factors; their order (a permutation of 0..2); PCA alphas."""
    factors = 1.0 + rng.uniform(-jitter, jitter, 3) if jitter > 0 else np.ones(3)
    order = rng.permutation(3)
    alpha = rng.normal(0.0, lighting, 3) if lighting > 0 else np.zeros(3)
    return np.concatenate([factors, order, alpha]).astype(np.float32)


@dataclass(frozen=True)
class ClsVal:
    """Shorter side to ``scale`` (bicubic), then 1 centre crop or 3 crops along the longer side (seed §11)."""

    scale: int = 320
    crops: int = 1

    def draw(self, rng: np.random.Generator | None, width: int, height: int) -> dict:
        s = self.scale
        if width <= height:
            rw, rh = s, max(s, int(round(height * s / width)))
        else:
            rw, rh = max(s, int(round(width * s / height))), s
        long_extra = max(rw, rh) - s
        offsets = [math.ceil(long_extra / 2)] if self.crops == 1 else [0, math.ceil(long_extra / 2), long_extra]
        starts = [(0, o) if rw > rh else (o, 0) for o in offsets]  # (y0, x0)
        return {"resize": (rh, rw), "starts": starts}


@dataclass(frozen=True)
class SegTrain:
    """The seed's ``FileIter._read``: scale jitter of the longer side around ``origin_size``, a square window
    of ``crop / rate`` original pixels (mean-colour / 255 padding outside), resized to ``crop``, flip (§10.2)."""

    crop: int = 504
    origin_size: int = 500
    scale_rate_range: tuple[float, float] = (0.7, 1.3)
    flip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "crop", -(-self.crop // FEATURE_STRIDE) * FEATURE_STRIDE)  # 500 -> 504
        lo, hi = self.scale_rate_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_rate_range must be 0 < lo <= hi, got {self.scale_rate_range}")

    def draw(self, rng: np.random.Generator, width: int, height: int) -> dict:
        lo, hi = self.scale_rate_range
        target = int(rng.integers(int(lo * self.origin_size), int(hi * self.origin_size) + 1))
        rate = target / max(width, height)
        side = max(1, int(self.crop / rate))
        margin = max(1, int(FEATURE_STRIDE / rate / 2))

        def start(extent: int) -> int:
            # The seed pastes the image at ``margin`` in a padded canvas and draws the window's canvas start from
            # [0, max(1, 8 / rate, margin + extent - side + 1)) (numpy truncates the float bound): a window larger
            # than the image still starts up to 8 / rate - 1 - margin pixels inside it.
            high = max(1, int(FEATURE_STRIDE / rate), margin + extent - side + 1)
            return int(rng.integers(0, high)) - margin

        x0, y0 = start(width), start(height)
        return {"window": (x0, y0, side, side), "flip": bool(self.flip and rng.random() < 0.5)}


@dataclass(frozen=True)
class SegVal:
    """Longer side to ``scale`` (None keeps the size); labels stay at the original resolution (§12)."""

    scale: int | None = 500

    def draw(self, rng: np.random.Generator | None, width: int, height: int) -> dict:
        if self.scale is None or self.scale == max(width, height):
            return {"resize": (height, width)}
        r = self.scale / max(width, height)
        return {"resize": (max(1, int(round(height * r))), max(1, int(round(width * r))))}


def adaptive_filter(src: tuple[int, int], dst: tuple[int, int]) -> str:
    """The seed's interpolation choice: 'bicubic' when enlarging both sides, else 'bilinear' (antialiased)."""
    return "bicubic" if dst[0] > src[0] and dst[1] > src[1] else "bilinear"
