"""The DALI backend's per-sample feed: runs in DALI's Python worker processes (``external_source(parallel=True)``).

Each call gets DALI's ``SampleInfo`` (epoch and index within it) and returns one sample's encoded bytes plus the
recipe's parameters drawn from ``(seed, epoch, dataset index)``, so the order, sharding, augmentation and resume
are those of the torch backend whatever the number of workers. Masks are read here (palette PNGs as indices:
DALI's decoder would return palette colours). Bad samples never raise in a worker: they come back as a
placeholder (dataset index -1) whose ``error`` output carries the message, and the main process raises or skips
(a raise in a worker reaches the main process only as text inside DALI's own exception).

Torch-free on purpose: ``spawn`` workers (needed once CUDA is initialised) import this module, and importing torch
would add seconds to every worker start.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import BadSampleError, check_complete, image_size, load_mask
from .labels import LabelSpace
from .order import epoch_indices
from .recipes import ClsTrain, ClsVal, SegTrain, sample_rng

# Per-sample outputs of the feed: (name, numpy dtype, ndim, DALI layout). Scalars are 0-d arrays.
_HEAD = [("encoded", np.uint8, 1, "")]
_TAIL = [("index", np.int64, 0, ""), ("real", np.bool_, 0, ""), ("error", np.uint8, 1, "")]
_WINDOW = [("anchor", np.int32, 1, ""), ("shape", np.int32, 1, ""), ("flip", np.int32, 0, "")]
_MASK = [("mask", np.uint8, 3, "HWC")]
_LABEL = [("label", np.int64, 0, "")]


def outputs(recipe) -> list[tuple[str, type, int, str]]:
    """The feed's outputs for ``recipe``, in order: (name, numpy dtype, ndim, layout)."""
    if isinstance(recipe, ClsTrain):
        # colour jitter + PCA lighting parameters: applied by the loader in torch, on the batch's device
        return _HEAD + _WINDOW + [("photometric", np.float32, 1, "")] + _LABEL + _TAIL
    if isinstance(recipe, ClsVal):
        return (
            _HEAD
            + [("size", np.float32, 1, "")]
            + [(f"start{k}", np.int32, 1, "") for k in range(recipe.crops)]
            + _LABEL
            + _TAIL
        )
    if isinstance(recipe, SegTrain):
        return _HEAD + _MASK + _WINDOW + _TAIL
    return _HEAD + _MASK + [("size", np.float32, 1, "")] + _TAIL


@dataclass(frozen=True)
class EpochPlan:
    """Picklable ``epoch -> (indices, real)`` of one shard (see :func:`order.epoch_indices`)."""

    n: int
    seed: int
    shuffle: bool
    shard_id: int = 0
    num_shards: int = 1
    even: bool = False

    def __call__(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_indices(
            self.n,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            even=self.even,
        )


_PLACEHOLDER: bytes | None = None


def placeholder_png() -> bytes:
    """An 8x8 black RGB PNG: what a padded or bad slot decodes (the loader drops it: index -1)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        _PLACEHOLDER = buf.getvalue()
    return _PLACEHOLDER


class SampleFeed:
    """Per-sample callback for ``fn.external_source(batch=False, parallel=True)``.

    ``images`` / ``targets``: the split's files and labels (class index, or mask path for segmentation);
    ``plan``: the shard's epoch order; the pipeline's epoch 0 is ``base_epoch`` and starts at batch
    ``start_batch`` (resume); ``bad``: dataset indices known to fail DALI's decoder (found by the main process),
    fed as placeholders. Each epoch is padded with placeholders to whole batches: DALI drops a partial batch in
    per-sample mode. Returns the arrays of :func:`outputs` (recipe) for one sample.
    """

    def __init__(
        self,
        images: list[str],
        targets: list,
        label_space: LabelSpace | None,
        recipe,
        seed: int,
        plan: EpochPlan,
        batch_size: int,
        base_epoch: int = 0,
        start_batch: int = 0,
        bad: frozenset[int] = frozenset(),
    ):
        self.images, self.targets, self.label_space = images, targets, label_space
        self.recipe, self.seed, self.plan, self.batch_size = recipe, seed, plan, batch_size
        self.base_epoch, self.start_batch, self.bad = base_epoch, start_batch, frozenset(bad)
        self.names = [name for name, *_ in outputs(recipe)]
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:  # a worker sees at most two epochs at once (the current one and prefetch)
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self.plan(epoch)
        return self._plans[epoch]

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch = self.base_epoch + info.epoch_idx
        indices, real = self.epoch_plan(epoch)
        first = self.start_batch * self.batch_size if info.epoch_idx == 0 else 0
        left = max(0, len(indices) - first)
        if info.idx_in_epoch >= -(-left // self.batch_size) * self.batch_size:
            raise StopIteration
        j = first + info.idx_in_epoch
        if j >= len(indices):
            return self._pack(self._sample(epoch, -1, False))
        i = int(indices[j])
        if i in self.bad:
            out = self._sample(epoch, -1, False)
            out["error"] = _message(f"{self.images[i]}: cannot decode image (DALI's decoder failed on it)")
            return self._pack(out)
        try:
            return self._pack(self._sample(epoch, i, bool(real[j])))
        except BadSampleError as e:
            out = self._sample(epoch, -1, False)
            out["error"] = _message(str(e))
            return self._pack(out)

    def _pack(self, out: dict) -> tuple[np.ndarray, ...]:
        return tuple(out[k] for k in self.names)

    def _sample(self, epoch: int, i: int, real: bool) -> dict:
        r = self.recipe
        if i < 0:
            data, size, target = placeholder_png(), (8, 8), 0
            mask = np.full((8, 8), 255, np.uint8)
        else:
            path, target = self.images[i], self.targets[i]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise BadSampleError(f"{path}: cannot read ({e.strerror})") from None
            check_complete(path, data)  # the torch backend's rule, so both refuse the same files every epoch
            size = image_size(path, data)  # header only: DALI decodes
            mask = load_mask(target, self.label_space, size, path) if isinstance(target, str) else None
        w, h = size
        p = r.draw(sample_rng(self.seed, epoch, max(i, 0)), w, h)
        out = {
            "encoded": np.frombuffer(data, np.uint8),
            "index": np.array(i, np.int64),
            "real": np.array(real, np.bool_),
            "error": np.zeros(0, np.uint8),
        }
        if isinstance(r, (ClsTrain, ClsVal)):
            out["label"] = np.array(target, np.int64)
        else:
            out["mask"] = mask[:, :, None]
        if isinstance(r, (ClsTrain, SegTrain)):
            x0, y0, cw, ch = p["window"]
            out.update(
                anchor=np.array([y0, x0], np.int32),
                shape=np.array([ch, cw], np.int32),
                flip=np.array(int(p["flip"]), np.int32),
            )
            if isinstance(r, ClsTrain):
                out["photometric"] = p["photometric"]
        else:
            out["size"] = np.array(p["resize"], np.float32)
            for k, st in enumerate(p.get("starts", [])):
                out[f"start{k}"] = np.array(st, np.int32)
        return out


def _message(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "replace"), np.uint8).copy()
