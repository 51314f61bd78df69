"""Label spaces of the four datasets: raw file values -> training ids (255 = ignore) and back.

Cityscapes follows ``cityscapesscripts.helpers.labels`` (copied as a table so that the package stays an optional
extra; ``tests/test_labels_tables.py`` checks the copy against the package when it is installed).
ADE20K: 0 ("other") -> 255, k -> k-1. VOC: palette indices are the ids (0..20, 255 = border).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255
INVALID = -1  # a raw value that must not occur in the dataset's masks

# (name, labelId, trainId, category, catId, hasInstances, ignoreInEval, colour); license plate (-1) omitted.
CITYSCAPES_LABELS: tuple[tuple[str, int, int, str, int, bool, bool, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    ("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    ("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    ("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    ("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    ("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    ("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    ("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    ("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    ("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    ("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    ("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    ("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    ("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    ("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    ("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    ("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    ("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    ("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    ("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    ("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    ("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    ("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    ("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    ("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    ("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    ("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    ("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    ("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    ("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    ("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    ("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    ("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    ("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
)


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, (256, 3) uint8 (index 255 = (224, 224, 192))."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


@dataclass(frozen=True)
class LabelSpace:
    """How a dataset's mask values map to training ids.

    ``to_train``: (256,) int16 LUT raw -> train id, 255 = ignore, :data:`INVALID` = must not occur.
    ``to_raw``: (num_classes,) uint8 train id -> raw value written in saved predictions.
    ``palette``: (256, 3) uint8 colours indexed by *raw* value, for palette PNGs.
    """

    num_classes: int
    to_train: np.ndarray
    to_raw: np.ndarray
    palette: np.ndarray
    names: tuple[str, ...]

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask (H, W) uint8 -> train ids (H, W) uint8; raises ValueError listing invalid values."""
        ids = self.to_train[raw]
        if (ids == INVALID).any():
            bad = sorted(set(np.unique(raw[ids == INVALID]).tolist()))
            raise ValueError(f"mask values {bad[:10]} are not labels of this dataset")
        return ids.astype(np.uint8)

    def decode(self, train_ids: np.ndarray) -> np.ndarray:
        """Train ids (H, W) -> raw dataset ids (H, W) uint8 (ignore stays 255)."""
        out = np.full(train_ids.shape, IGNORE, np.uint8)
        valid = train_ids < self.num_classes
        out[valid] = self.to_raw[train_ids[valid]]
        return out


def _voc() -> LabelSpace:
    lut = np.full(256, INVALID, np.int16)
    lut[:21] = np.arange(21)
    lut[IGNORE] = IGNORE
    names = (
        "background",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    )
    return LabelSpace(21, lut, np.arange(21, dtype=np.uint8), voc_palette(), names)


def _cityscapes() -> LabelSpace:
    lut = np.full(256, IGNORE, np.int16)  # unlisted ids are ignored, as in the seed
    to_raw = np.zeros(19, np.uint8)
    pal = np.zeros((256, 3), np.uint8)
    names = [""] * 19
    for name, label_id, train_id, *_, colour in CITYSCAPES_LABELS:
        lut[label_id] = train_id
        pal[label_id] = colour
        if train_id != IGNORE:
            to_raw[train_id], names[train_id] = label_id, name
    return LabelSpace(19, lut, to_raw, pal, tuple(names))


def _ade20k() -> LabelSpace:
    lut = np.full(256, INVALID, np.int16)
    lut[0] = IGNORE
    lut[1:151] = np.arange(150)
    rng = np.random.default_rng(150)  # ADE has no official palette; a fixed one keeps saved PNGs stable
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    pal[0] = 0
    return LabelSpace(150, lut, np.arange(1, 151, dtype=np.uint8), pal, tuple(f"class{k}" for k in range(1, 151)))


LABEL_SPACES: dict[str, LabelSpace] = {"voc": _voc(), "cityscapes": _cityscapes(), "ade20k": _ade20k()}
