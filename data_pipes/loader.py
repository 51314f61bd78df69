"""``build_loader``: one entry point over both backends, with the seed's recipes and exact epoch coverage."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np
import torch

from . import dali_backend
from .feed import EpochPlan
from .layouts import DatasetIndex, discover
from .photometric import color_jitter, lighting, normalize
from .recipes import ORIGIN_SIZE, SEG_TEST_SCALE, ClsTrain, ClsVal, SegTrain, SegVal
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)
IGNORE = 255


def make_recipe(task: str, dataset: str, train: bool, crop_size: int | None, **recipe: Any):
    """The seed's recipe for a task; ``recipe`` overrides its fields (e.g. ``origin_size``, ``scale``, ``crops``)."""
    if task == "cls":
        if train:
            return ClsTrain(crop=crop_size or 224, **recipe)
        return ClsVal(**({"scale": crop_size} if crop_size else {}), **recipe)
    if train:
        recipe.setdefault("origin_size", ORIGIN_SIZE[dataset])
        return SegTrain(crop=crop_size or 504, **recipe)
    recipe.setdefault("scale", SEG_TEST_SCALE[dataset])
    return SegVal(**recipe)


class Loader:
    """Iterable of finished batches for one shard; ``len()`` is the number of batches per epoch.

    Batches: ``image`` float32 (N, 3, H, W) normalised (ImageNet mean/std), contiguous NCHW, on ``device``;
    ``label`` int64 (N,) or (N, H, W) with 255 = ignore; ``index`` int64 (N,) dataset indices; ``real`` bool (N,)
    (False = padding repeated to even out shards); ``skipped`` int. Classification val with 3 crops gives image
    (N, 3, 3, s, s).
    Segmentation val pads images (with 0 = mean colour) and labels (255) at the bottom/right to the batch's
    largest, and adds ``image_size`` / ``label_size`` (N, 2) = (H, W) before padding.

    Iterating runs epoch :attr:`epoch` and then advances it; :meth:`set_epoch` and ``start_batch`` in
    :meth:`iter_epoch` restore a position (resume).
    """

    def __init__(
        self,
        index: DatasetIndex,
        recipe,
        backend,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shard_id: int,
        num_shards: int,
        even: bool,
        device: torch.device,
    ):
        self.index, self.recipe, self.backend = index, recipe, backend
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shard_id, self.num_shards, self.even, self.device = shard_id, num_shards, even, device
        self.epoch = 0
        self.skipped = 0
        # picklable: DALI's spawned feed workers compute each epoch's order themselves
        self.planner = EpochPlan(len(index), seed, shuffle, shard_id, num_shards, even)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, real) this shard visits in ``epoch`` (see :func:`order.epoch_indices`)."""
        return self.planner(epoch)

    def close(self) -> None:
        """Stop background work now (DALI's threads and feed processes prefetch the next epoch)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __len__(self) -> int:
        n, s = len(self.index), self.num_shards
        samples = -(-n // s) if self.even else len(range(self.shard_id, n, s))  # this shard's share of each epoch
        return -(-samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        yield from self.iter_epoch(self.epoch)
        self.epoch += 1

    def iter_epoch(self, epoch: int, start_batch: int = 0, keep_empty: bool = False) -> Iterator[dict]:
        """Batches of ``epoch`` from batch ``start_batch`` on.

        A batch whose samples were all skipped (``skip_bad``) is left out, or, with ``keep_empty``, yielded as
        ``{"empty": True, "skipped": n}`` so that the k-th item is always batch k (DDP ranks stay in step).
        """
        for raw in self.backend.iterate(epoch, self.planner, self.batch_size, start_batch):
            if raw.get("skipped"):
                self.skipped += raw["skipped"]
                log.warning(
                    "%d bad sample(s) skipped so far in %s %s", self.skipped, self.index.dataset, self.index.split
                )
            if "image" in raw:
                keep = raw["index"] >= 0  # DALI placeholders for all-bad batches have index -1
                if not keep.all():
                    raw = _select(raw, keep)
                if len(raw["index"]):
                    yield self.finish(raw)
                    continue
            if keep_empty:
                yield {"empty": True, "skipped": raw.get("skipped", 0)}

    def finish(self, raw: dict) -> dict:
        """A backend's raw batch -> the batch described in the class docstring.

        Raw images are uint8 (N, H, W, 3) (the torch backend, and DALI for classification training: colour
        jitter, lighting, normalisation and NCHW happen here, on ``device``) or, with ``normalized`` (DALI: done
        in the pipeline), float32 (N, 3, H, W); lists when sizes vary.
        """
        out = {"index": raw["index"].long(), "real": raw["real"].bool(), "skipped": raw.get("skipped", 0)}
        img, lab = raw["image"], raw["label"]
        ready = raw.get("normalized", False)
        if isinstance(img, list) or isinstance(lab, list):  # variable-size segmentation val batch
            # images of different sizes can resize to one size while their labels (original resolution) differ,
            # or the reverse: handle both as lists
            img, lab = list(img), list(lab)
            out["image_size"] = torch.tensor([tuple(t.shape[-2:]) if ready else tuple(t.shape[:2]) for t in img])
            out["label_size"] = torch.tensor([t.shape[:2] for t in lab])
            H, W = out["image_size"].max(0).values.tolist()
            h, w = out["label_size"].max(0).values.tolist()
            x = torch.zeros(len(img), 3, H, W, device=self.device)
            y = torch.full((len(lab), h, w), IGNORE, dtype=torch.long, device=self.device)
            for k, (t, m) in enumerate(zip(img, lab)):
                t = t.to(self.device) if ready else normalize(_chw(t.to(self.device))[None])[0]
                x[k, :, : t.shape[-2], : t.shape[-1]] = t
                y[k, : m.shape[0], : m.shape[1]] = m.to(self.device).reshape(m.shape[:2]).long()
            out.update(image=x, label=y)
            return out
        if ready:
            out["image"] = img.to(self.device, non_blocking=True).contiguous()
        else:
            x = _chw(img.to(self.device, non_blocking=True))
            if isinstance(self.recipe, ClsTrain):
                p = raw["photometric"].to(self.device)
                x = lighting(color_jitter(x, p), p, self.recipe.lighting).clamp_(0, 1)
            out["image"] = normalize(x)
        lab = lab.to(self.device, non_blocking=True).long()
        out["label"] = lab.reshape(lab.shape[:3]) if lab.dim() == 4 else lab  # DALI masks are (N, H, W, 1)
        if isinstance(self.recipe, SegVal):
            out["image_size"] = torch.tensor([tuple(out["image"].shape[-2:])] * len(img))
            out["label_size"] = torch.tensor([lab.shape[1:3]] * len(lab))
        return out


def _select(raw: dict, keep: torch.Tensor) -> dict:
    rows = keep.nonzero().flatten().tolist()
    out = {}
    for k, v in raw.items():
        if isinstance(v, list):
            out[k] = [v[i] for i in rows]
        elif torch.is_tensor(v) and v.dim() and len(v) == len(keep):
            out[k] = v[keep.to(v.device)]
        else:
            out[k] = v
    return out


def _chw(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> contiguous float (..., 3, H, W) in [0, 1].

    Contiguous NCHW on purpose: ``movedim`` alone gives channels_last strides, and oneDNN's backward of a
    strided 1x1 convolution on a channels_last input with few channels crashes on AVX-512 CPUs (torch 2.13).
    Models that want channels_last convert the batch themselves (``--channels-last``).
    """
    return x.movedim(-1, -3).contiguous().float().div_(255)


def build_loader(
    dataset: str,
    data_root: str | os.PathLike,
    split: str,
    *,
    batch_size: int,
    train: bool,
    crop_size: int | None = None,
    device: str | torch.device = "auto",
    backend: str = "auto",
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    workers: int | None = None,
    skip_bad: bool = False,
    even: bool | None = None,
    val_list: str | None = None,
    **recipe: Any,
) -> Loader:
    """Loader for ``split`` of ``dataset`` in the seed's layout under ``data_root``.

    Args:
        dataset: ``ilsvrc``, ``voc``, ``cityscapes`` or ``ade20k``.
        train: training recipe (random crops, shuffling) or the evaluation protocol's preprocessing.
        crop_size: training crop (cls 224, seg 504 = the seed's 500 rounded up to 8) or, for classification
            val, the test scale (shorter side and crop).
        device: where batches go: ``auto`` (CUDA when available), ``cpu``, ``cuda[:k]``. DALI decodes with
            ``mixed`` on a GPU and uses CPU operators with ``device_id=None`` otherwise.
        backend: ``dali``, ``torch`` (DataLoader + Pillow) or ``auto`` (DALI when installed).
        shard_id, num_shards: this rank's disjoint part of each epoch.
        seed: order and augmentation are a function of (seed, epoch, sample).
        workers: DALI threads or DataLoader processes (default: min(4, cpus)).
        skip_bad: skip unreadable samples with a warning (counted) instead of raising.
        even: pad shards to equal length (default: on for training with several shards, for DDP).
        recipe: recipe fields, e.g. ``origin_size``, ``scale_rate_range``, ``scale``, ``crops``, ``flip``.
    """
    index = discover(dataset, data_root, split, val_list=val_list)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    rec = make_recipe(index.task, dataset, train, crop_size, **recipe)
    if backend == "auto":
        backend = "dali" if dali_backend.available() else "torch"
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if backend == "dali":
        impl = dali_backend.DaliBackend(
            index,
            rec,
            seed=seed,
            batch_size=batch_size,
            threads=max(1, workers),
            device="gpu" if dev.type == "cuda" else "cpu",
            skip_bad=skip_bad,
        )
    elif backend == "torch":
        impl = TorchBackend(index, rec, seed=seed, workers=workers, skip_bad=skip_bad)
    else:
        raise ValueError(f"backend must be 'dali', 'torch' or 'auto', got {backend!r}")
    even = (train and num_shards > 1) if even is None else even
    return Loader(
        index,
        rec,
        impl,
        batch_size=batch_size,
        shuffle=train,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        even=even,
        device=dev,
    )
