"""Find the samples of a split in the seed's dataset layouts (``--data-root`` is the dataset folder).

=========== ======================================================================================
ilsvrc      ``ILSVRC2012_train/<wnid>/*.JPEG``; ``ILSVRC2012_val/<wnid>/*`` or flat ``ILSVRC2012_val/*`` with a
            list file (``val.lst`` as the seed: ``id<TAB>label<TAB>path``, or ``path label``); labels are
            indices of the sorted WNIDs of the train folder (the seed's and torchvision's order).
voc         ``VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}``; ``train+`` reads
            ``ImageSets/Segmentation/train_aug.txt`` with masks from ``SegmentationClassAug`` when it exists.
cityscapes  ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``;
            ``train+`` adds ``train_extra`` with ``gtCoarse``.
ade20k      ``{images,annotations}/{training,validation}`` (or the same under ``ADEChallengeData2016/``).
=========== ======================================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .labels import LABEL_SPACES, LabelSpace

DATASETS = ("ilsvrc", "voc", "cityscapes", "ade20k")
SPLITS = {
    "ilsvrc": ("train", "val"),
    "voc": ("train", "train+", "val"),
    "cityscapes": ("train", "train+", "val"),
    "ade20k": ("train", "val"),
}
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """A dataset folder, list or file is not what the layout expects."""


@dataclass(frozen=True)
class Sample:
    image: str
    target: int | str  # class index (classification) or mask path (segmentation)


@dataclass
class DatasetIndex:
    """The samples of one split. ``label_space`` is set for segmentation datasets."""

    dataset: str
    split: str
    root: str
    samples: list[Sample]
    num_classes: int
    class_names: tuple[str, ...] = ()
    label_space: LabelSpace | None = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return "seg" if self.label_space is not None else "cls"

    def __len__(self) -> int:
        return len(self.samples)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} folder")
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _read_list(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found")
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _ilsvrc(root: Path, split: str, val_list: str | None) -> DatasetIndex:
    train = _require_dir(root / "ILSVRC2012_train", "ILSVRC2012_train (class folders define the label order)")
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not wnids:
        raise DatasetError(f"{train}: no class folders")
    index = {w: i for i, w in enumerate(wnids)}
    samples: list[Sample] = []
    if split == "train":
        for w in wnids:
            samples += [Sample(str(p), index[w]) for p in _images_in(train / w)]
        return DatasetIndex("ilsvrc", split, str(root), samples, len(wnids), tuple(wnids))
    val = _require_dir(root / "ILSVRC2012_val", "ILSVRC2012_val")
    subdirs = sorted(p.name for p in val.iterdir() if p.is_dir())
    if subdirs and val_list is None:
        for w in subdirs:
            if w not in index:
                raise DatasetError(f"{val / w}: class folder {w!r} is not a class of {train}")
            samples += [Sample(str(p), index[w]) for p in _images_in(val / w)]
        return DatasetIndex("ilsvrc", split, str(root), samples, len(wnids), tuple(wnids))
    candidates = [Path(val_list)] if val_list else [root / n for n in ("val.lst", "ILSVRC2012_val.lst", "val.txt")]
    lst = next((c for c in candidates if c.is_file()), None)
    if lst is None:
        raise DatasetError(f"{val}: flat validation folder needs a label list; tried {[str(c) for c in candidates]}")
    for n, fields in enumerate(_read_list(lst), 1):
        if len(fields) == 3:  # the seed's val.lst: id, label, path
            label, rel = fields[1], fields[2]
        elif len(fields) == 2:  # caffe val.txt: path, label
            rel, label = fields
        else:
            raise DatasetError(f"{lst}:{n}: expected 'id<TAB>label<TAB>path' or 'path label', got {fields}")
        try:
            cls = int(float(label))
        except ValueError:
            raise DatasetError(f"{lst}:{n}: label {label!r} is not an integer") from None
        if not 0 <= cls < len(wnids):
            raise DatasetError(f"{lst}:{n}: label {cls} outside 0..{len(wnids) - 1}")
        samples.append(Sample(str(val / Path(rel).name), cls))
    return DatasetIndex("ilsvrc", split, str(root), samples, len(wnids), tuple(wnids))


def _voc(root: Path, split: str) -> DatasetIndex:
    voc = _require_dir(root / "VOC2012", "VOC2012")
    sets = voc / "ImageSets" / "Segmentation"
    name = {"train": "train.txt", "val": "val.txt", "train+": "train_aug.txt"}[split]
    mask_dir = "SegmentationClass"
    if split == "train+" and (voc / "SegmentationClassAug").is_dir():
        mask_dir = "SegmentationClassAug"
    samples = []
    for n, fields in enumerate(_read_list(sets / name), 1):
        if len(fields) == 1:
            samples.append(
                Sample(str(voc / "JPEGImages" / f"{fields[0]}.jpg"), str(voc / mask_dir / f"{fields[0]}.png"))
            )
        elif len(fields) == 2:  # DeepLab style: /JPEGImages/x.jpg /SegmentationClassAug/x.png
            samples.append(Sample(str(voc / fields[0].lstrip("/")), str(voc / fields[1].lstrip("/"))))
        else:
            raise DatasetError(f"{sets / name}:{n}: expected an image id or 'image mask', got {fields}")
    return DatasetIndex("voc", split, str(root), samples, 21, LABEL_SPACES["voc"].names, LABEL_SPACES["voc"])


def _cityscapes(root: Path, split: str) -> DatasetIndex:
    parts = [("train", "gtFine"), ("train_extra", "gtCoarse")] if split == "train+" else [(split, "gtFine")]
    samples = []
    for sub, gt in parts:
        img_root = _require_dir(root / "leftImg8bit" / sub, f"leftImg8bit/{sub}")
        for city in sorted(p for p in img_root.iterdir() if p.is_dir()):
            for img in sorted(city.glob("*_leftImg8bit.png")):
                stem = img.name[: -len("_leftImg8bit.png")]
                samples.append(Sample(str(img), str(root / gt / sub / city.name / f"{stem}_{gt}_labelIds.png")))
    space = LABEL_SPACES["cityscapes"]
    return DatasetIndex("cityscapes", split, str(root), samples, 19, space.names, space)


def _ade20k(root: Path, split: str) -> DatasetIndex:
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    sub = {"train": "training", "val": "validation"}[split]
    images = _images_in(_require_dir(root / "images" / sub, f"images/{sub}"))
    samples = [Sample(str(p), str(root / "annotations" / sub / f"{p.stem}.png")) for p in images]
    space = LABEL_SPACES["ade20k"]
    return DatasetIndex("ade20k", split, str(root), samples, 150, space.names, space)


def discover(dataset: str, data_root: str | os.PathLike, split: str, *, val_list: str | None = None) -> DatasetIndex:
    """List a split's samples; every referenced file must exist. Raises :class:`DatasetError` otherwise."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: expected one of {DATASETS}")
    if split not in SPLITS[dataset]:
        raise DatasetError(f"{dataset}: unknown split {split!r}, expected one of {SPLITS[dataset]}")
    root = Path(data_root)
    _require_dir(root, f"{dataset} data root (--data-root)")
    if dataset == "ilsvrc":
        index = _ilsvrc(root, split, val_list)
    else:
        index = {"voc": _voc, "cityscapes": _cityscapes, "ade20k": _ade20k}[dataset](root, split)
    if not index.samples:
        raise DatasetError(f"{root}: split {split!r} of {dataset} has no samples")
    for s in index.samples:
        for path in (s.image, s.target) if isinstance(s.target, str) else (s.image,):
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: listed in {dataset} {split!r} but missing")
    return index
