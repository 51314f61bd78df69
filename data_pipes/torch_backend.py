"""Reference backend: torch DataLoader workers running Pillow ops on the recipe's per-sample parameters.

Used where DALI is not installed and as the reference the DALI pipelines are tested against. Output per sample:
``image`` uint8 (H, W, 3) (or (K, s, s, 3) for K val crops), ``label`` int or uint8 (H, W) training ids.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .errors import BadSampleError, load_mask, load_rgb
from .layouts import DatasetIndex
from .recipes import MEAN_RGB_255, ClsTrain, ClsVal, SegTrain, adaptive_filter, sample_rng

log = logging.getLogger(__name__)
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _resize(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    if img.size == (size_hw[1], size_hw[0]):
        return img
    return img.resize((size_hw[1], size_hw[0]), _FILTERS[adaptive_filter(img.size[::-1], size_hw)])


def process(index: DatasetIndex, recipe, seed: int, epoch: int, i: int) -> dict:
    """Load and augment sample ``i`` exactly as the recipe's parameters for (seed, epoch, i) say."""
    sample = index.samples[i]
    img = load_rgb(sample.image)
    w, h = img.size
    p = recipe.draw(sample_rng(seed, epoch, i), w, h)
    out: dict = {"index": i}
    if isinstance(recipe, ClsTrain):
        x0, y0, cw, ch = p["window"]
        img = _resize(img.crop((x0, y0, x0 + cw, y0 + ch)), (recipe.crop, recipe.crop))
        if p["flip"]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out.update(image=np.asarray(img), label=sample.target, photometric=p["photometric"])
    elif isinstance(recipe, ClsVal):
        img = np.asarray(img.resize(p["resize"][::-1], Image.BICUBIC))
        s = recipe.scale
        crops = [img[y : y + s, x : x + s] for y, x in p["starts"]]
        out.update(image=crops[0] if recipe.crops == 1 else np.stack(crops), label=sample.target)
    else:
        mask = load_mask(sample.target, index.label_space, (w, h), sample.image)
        if isinstance(recipe, SegTrain):
            x0, y0, side, _ = p["window"]
            canvas = Image.new("RGB", (side, side), tuple(int(round(c)) for c in MEAN_RGB_255))
            canvas.paste(img, (-x0, -y0))
            lab = Image.new("L", (side, side), 255)
            lab.paste(Image.fromarray(mask), (-x0, -y0))
            img = _resize(canvas, (recipe.crop, recipe.crop))
            lab = lab.resize((recipe.crop, recipe.crop), Image.NEAREST)
            if p["flip"]:
                img, lab = img.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT)
            out.update(image=np.asarray(img), label=np.asarray(lab))
        else:
            out.update(image=np.asarray(_resize(img, p["resize"])), label=mask)
    return out


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, index: DatasetIndex, recipe, seed: int, skip_bad: bool):
        self.index, self.recipe, self.seed, self.skip_bad = index, recipe, seed, skip_bad

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, bool]) -> dict | None:
        epoch, i, real = key
        try:
            out = process(self.index, self.recipe, self.seed, epoch, i)
        except BadSampleError as e:
            if not self.skip_bad:
                raise
            log.warning("skipping bad sample: %s", e)
            return None
        out["real"] = real
        return out


def collate(items: list[dict | None]) -> dict:
    """Stack what has a common shape; variable-size val images and masks stay lists."""
    good = [it for it in items if it is not None]
    batch: dict = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    for key in good[0]:
        vals = [it[key] for it in good]
        if isinstance(vals[0], np.ndarray):
            if all(v.shape == vals[0].shape for v in vals):
                batch[key] = torch.from_numpy(np.stack(vals))
            else:
                batch[key] = [torch.from_numpy(np.array(v)) for v in vals]
        else:
            batch[key] = torch.tensor(vals)
    return batch


class TorchBackend:
    """Yields raw batches (uint8 images) for the given per-epoch index list; ``workers`` loader processes."""

    name = "torch"

    def __init__(self, index: DatasetIndex, recipe, *, seed: int, workers: int, skip_bad: bool):
        self.dataset = _Dataset(index, recipe, seed, skip_bad)
        self.workers = workers

    def iterate(self, epoch: int, plan_fn, batch_size: int, start_batch: int = 0):
        """Batches of ``epoch``; ``plan_fn(epoch) -> (indices, real)``."""
        indices, real = plan_fn(epoch)
        keys = [(epoch, int(i), bool(r)) for i, r in zip(indices, real)]
        batches = [keys[b : b + batch_size] for b in range(start_batch * batch_size, len(keys), batch_size)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.workers else None,
            generator=torch.Generator().manual_seed(epoch),  # never draw from the global RNG (exact resume)
        )
        yield from loader
