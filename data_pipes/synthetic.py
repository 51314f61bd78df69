"""Small synthetic datasets in the four layouts: real JPEG/PNG files whose pixels carry their labels.

Segmentation: every class is painted in its own colour (VOC/Cityscapes: the dataset palette; ADE20K: a fixed
palette) with noise, on shapes whose masks are written exactly (VOC: palette PNGs with a 255 border like the
real ones; Cityscapes: labelIds plus 16-bit instanceIds; ADE20K: 0 = "other"). Classification: each class has
its own colour and stripe direction. A small net learns both in minutes, so training demos and tests can
check that loss falls and metrics beat chance.

    python -m data_pipes.synthetic voc data/synthetic-voc
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .labels import CITYSCAPES_LABELS, LABEL_SPACES, voc_palette

_MARK = ".synthetic.json"


def _noisy(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 12.0) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)


def _scene(rng: np.random.Generator, w: int, h: int, classes: list[int], background: int, objects: int):
    """A label map (H, W) int32 with ``objects`` rectangles/ellipses of random classes on ``background``."""
    mask = Image.new("I", (w, h), background)
    draw = ImageDraw.Draw(mask)
    for _ in range(objects):
        c = int(rng.choice(classes))
        bw, bh = int(rng.integers(w // 4, w * 3 // 4 + 1)), int(rng.integers(h // 4, h * 3 // 4 + 1))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=c)
    return np.asarray(mask, np.int32)


def _size(rng: np.random.Generator, size: tuple[int, int], aspect: float | None) -> tuple[int, int]:
    w = int(rng.integers(size[0], size[1] + 1))
    h = int(round(w / aspect)) if aspect else int(rng.integers(size[0], size[1] + 1))
    return w, h


def _save_rgb(rgb: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=92) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(
        rgb
    ).save(path)


def _voc(root: Path, rng, counts, size, classes) -> None:
    voc = root / "VOC2012"
    pal = voc_palette()
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    colours = pal.astype(np.int32).copy()
    colours[0] = (40, 40, 40)  # background: dark but not the 255-border colour
    for split, n in counts.items():
        ids = []
        for k in range(n):
            name = f"2007_{split}{k:05d}"
            w, h = _size(rng, size, None)
            lab = _scene(rng, w, h, [c for c in classes if c != 0] or classes, 0, int(rng.integers(1, 4)))
            rgb = _noisy(colours[lab].astype(np.uint8), rng)
            # VOC marks object outlines 255 (ignored): a 1-px band where the label changes
            edge = np.zeros_like(lab, bool)
            edge[1:] |= lab[1:] != lab[:-1]
            edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            lab = np.where(edge, 255, lab).astype(np.uint8)
            _save_rgb(rgb, voc / "JPEGImages" / f"{name}.jpg")
            m = Image.fromarray(lab, "P")
            m.putpalette(pal.tobytes())
            (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            m.save(voc / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (sets / "train_aug.txt").write_text((sets / "train.txt").read_text())


def _cityscapes(root: Path, rng, counts, size, classes) -> None:
    train_ids = [t for t in classes if t < 19]
    by_train = {t: (lid, colour, inst) for _, lid, t, _, _, inst, _, colour in CITYSCAPES_LABELS if t != 255}
    colours = np.zeros((256, 3), np.uint8)
    for _, lid, _, _, _, _, _, colour in CITYSCAPES_LABELS:
        colours[lid] = colour
    colours[0] = (20, 20, 20)
    for split, n in counts.items():
        for k in range(n):
            city = ("aachen", "bochum")[k % 2]
            stem = f"{city}_{k:06d}_000019"
            w, h = _size(rng, (size[1], size[1]), 2.0)
            lab_train = _scene(rng, w, h, train_ids, train_ids[0], int(rng.integers(2, 5)))
            label_ids = np.vectorize(lambda t: by_train[t][0])(lab_train).astype(np.uint8)
            if rng.random() < 0.7:  # some void (ego vehicle) at the bottom, as in the real data
                label_ids[-max(1, h // 10) :] = 1
            inst = label_ids.astype(np.uint16)
            for c in np.unique(label_ids):
                t = LABEL_SPACES["cityscapes"].to_train[c]
                if t != 255 and by_train[int(t)][2]:
                    inst[label_ids == c] = int(c) * 1000 + int(rng.integers(0, 3))
            _save_rgb(_noisy(colours[label_ids], rng), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label_ids, "L").save(gt / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(inst).save(gt / f"{stem}_gtFine_instanceIds.png")


def _ade20k(root: Path, rng, counts, size, classes) -> None:
    pal = LABEL_SPACES["ade20k"].palette
    for split, n in counts.items():
        sub = {"train": "training", "val": "validation"}[split]
        for k in range(n):
            name = f"ADE_{sub[:5] if sub == 'training' else 'val'}_{k + 1:08d}"
            w, h = _size(rng, size, None)
            raw = _scene(rng, w, h, [c + 1 for c in classes], 0, int(rng.integers(2, 5)))  # 0 = "other"
            _save_rgb(_noisy(pal[raw], rng), root / "images" / sub / f"{name}.jpg")
            (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw.astype(np.uint8), "L").save(root / "annotations" / sub / f"{name}.png")


def cls_colour(c: int, n: int) -> np.ndarray:
    hue = c / n
    rgb = np.array([np.cos(2 * np.pi * (hue + s)) for s in (0, 1 / 3, 2 / 3)])
    return (127.5 + 100 * rgb).astype(np.float32)


def _ilsvrc(root: Path, rng, counts, size, classes) -> None:
    wnids = [f"n{9000000 + c:08d}" for c in classes]
    n = len(classes)
    val_lines = []
    for split, count in counts.items():
        for k in range(count):
            c = k % n
            w, h = _size(rng, size, None)
            yy, xx = np.mgrid[0:h, 0:w]
            angle = np.pi * c / n
            stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0)[..., None]
            rgb = _noisy(np.clip(cls_colour(c, n) + 40 * stripes, 0, 255), rng)
            if split == "train":
                _save_rgb(rgb, root / "ILSVRC2012_train" / wnids[c] / f"{wnids[c]}_{k}.JPEG")
            else:
                name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
                _save_rgb(rgb, root / "ILSVRC2012_val" / name)
                val_lines.append(f"{k + 1}\t{c}\t{name}")
    (root / "val.lst").write_text("\n".join(val_lines) + "\n")


_WRITERS = {"voc": _voc, "cityscapes": _cityscapes, "ade20k": _ade20k, "ilsvrc": _ilsvrc}
_DEFAULT_CLASSES = {"voc": 21, "cityscapes": 19, "ade20k": 150, "ilsvrc": 10}


def write_synthetic(
    dataset: str,
    root: str | os.PathLike,
    *,
    num_train: int = 24,
    num_val: int = 8,
    size: tuple[int, int] = (64, 112),
    num_classes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write (or reuse, when the same parameters are already there) a synthetic ``dataset`` under ``root``.

    ``size``: min/max image side in pixels (Cityscapes uses the max as height... width = 2 x height).
    ``num_classes``: how many of the dataset's classes appear (ilsvrc: how many classes exist).
    """
    if dataset not in _WRITERS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(_WRITERS)}")
    root = Path(root)
    n_cls = num_classes or _DEFAULT_CLASSES[dataset]
    params = {
        "dataset": dataset,
        "num_train": num_train,
        "num_val": num_val,
        "size": list(size),
        "num_classes": n_cls,
        "seed": seed,
        "version": 1,
    }
    mark = root / _MARK
    if mark.is_file() and json.loads(mark.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()) and not mark.is_file():
        raise FileExistsError(f"{root}: exists and is not a synthetic dataset; refusing to write into it")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    classes = list(range(n_cls))
    _WRITERS[dataset](root, rng, {"train": num_train, "val": num_val}, size, classes)
    mark.write_text(json.dumps(params))
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipes.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(_WRITERS))
    ap.add_argument("root")
    ap.add_argument("--num-train", type=int, default=24)
    ap.add_argument("--num-val", type=int, default=8)
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(
        write_synthetic(
            a.dataset, a.root, num_train=a.num_train, num_val=a.num_val, num_classes=a.num_classes, seed=a.seed
        )
    )


if __name__ == "__main__":
    main()
