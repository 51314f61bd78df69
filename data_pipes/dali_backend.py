"""NVIDIA DALI backend: decode, crop, resize and flip in DALI's C++ threads (GPU ``mixed`` decode when present).

A Python external source feeds the encoded bytes plus the recipe's per-sample parameters (drawn from
``(seed, epoch, index)`` as in the torch backend), so the order, sharding and augmentation are ours and
identical across backends; DALI does the pixel work. Masks are read by Pillow in the source (palette PNGs as
indices: DALI's image decoder would return palette colours) and then cropped/resized/flipped in DALI with
nearest-neighbour interpolation, sharing the image's parameters.

Images use cubic interpolation with antialiasing (DALI cannot pick the filter per sample; the seed's
adaptive choice is bicubic for enlarging and an antialiased filter for shrinking, which this matches closely).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import BadSampleError, image_size, load_mask, load_rgb
from .layouts import DatasetIndex
from .recipes import MEAN_RGB_255, ClsTrain, ClsVal, SegTrain, SegVal, sample_rng

log = logging.getLogger(__name__)


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


class _Source:
    """Batch-mode external source: one call per batch; raises StopIteration at the end of the epoch."""

    def __init__(self, index: DatasetIndex, recipe, seed: int, batch_size: int, skip_bad: bool):
        self.index, self.recipe, self.seed, self.batch_size, self.skip_bad = index, recipe, seed, batch_size, skip_bad
        self.base_epoch, self.start_batch = 0, 0
        self.plan_fn = None  # epoch -> (indices, real)
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self.checked: set[int] = set()

    def _good(self, i: int) -> bool:
        if not self.skip_bad or i in self.checked:
            return True
        s = self.index.samples[i]
        try:
            w, h = load_rgb(s.image).size
            if isinstance(s.target, str):
                load_mask(s.target, self.index.label_space, (w, h), s.image)
        except BadSampleError as e:
            log.warning("skipping bad sample: %s", e)
            return False
        self.checked.add(i)
        return True

    def __call__(self, info):
        epoch = self.base_epoch + info.epoch_idx
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, *self.plan_fn(epoch))
        _, indices, real = self._plan
        b = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        chunk = range(b * self.batch_size, min(len(indices), (b + 1) * self.batch_size))
        if not chunk:
            raise StopIteration
        cols: dict[str, list] = {}
        skipped = 0
        for j in chunk:
            i = int(indices[j])
            if not self._good(i):
                skipped += 1
                continue
            for k, v in self._sample(epoch, i, bool(real[j])).items():
                cols.setdefault(k, []).append(v)
        if not cols:  # DALI cannot take an empty batch: send one placeholder, dropped by the loader (index -1)
            for k, v in self._placeholder(epoch).items():
                cols.setdefault(k, []).append(v)
        cols["skipped"] = [np.array(skipped, np.int32)] + [np.array(0, np.int32)] * (len(cols["index"]) - 1)
        return [cols[k] for k in self.outputs]

    @property
    def outputs(self) -> list[str]:
        r = self.recipe
        if isinstance(r, ClsTrain):
            return ["encoded", "start", "shape", "flip", "label", "photometric", "index", "real", "skipped"]
        if isinstance(r, ClsVal):
            return ["encoded", "size"] + [f"start{k}" for k in range(r.crops)] + ["label", "index", "real", "skipped"]
        if isinstance(r, SegTrain):
            return ["encoded", "mask", "start", "shape", "flip", "index", "real", "skipped"]
        return ["encoded", "mask", "size", "index", "real", "skipped"]

    def _placeholder(self, epoch: int) -> dict:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        return self._sample(epoch, -1, False, buf.getvalue(), (8, 8), np.full((8, 8), 255, np.uint8), 0)

    def _sample(self, epoch: int, i: int, real: bool, data: bytes | None = None, size=None, mask=None,
                target=None) -> dict:
        if data is None:
            s = self.index.samples[i]
            with open(s.image, "rb") as f:
                data = f.read()
            size = image_size(s.image, data)
            if isinstance(s.target, str):
                mask = load_mask(s.target, self.index.label_space, size, s.image)
            target = s.target
        w, h = size
        out = {"encoded": np.frombuffer(data, np.uint8), "index": np.array(i, np.int64), "real": np.array(real, np.bool_)}
        p = self.recipe.draw(sample_rng(self.seed, epoch, max(i, 0)), w, h)
        r = self.recipe
        if isinstance(r, (SegTrain, SegVal)):
            out["mask"] = mask[:, :, None]
        else:
            out["label"] = np.array(target, np.int64)
        if isinstance(r, (ClsTrain, SegTrain)):
            x0, y0, cw, ch = p["window"]
            out.update(start=np.array([y0, x0], np.int32), shape=np.array([ch, cw], np.int32),
                       flip=np.array(int(p["flip"]), np.int32))
            if isinstance(r, ClsTrain):
                out["photometric"] = p["photometric"]
        else:
            out["size"] = np.array(p["resize"], np.float32)
            for k, st in enumerate(p.get("starts", [])):
                out[f"start{k}"] = np.array(st, np.int32)
        return out


def _build(source: _Source, recipe, batch_size: int, threads: int, device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    names = source.outputs

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=2)
    def pipe():
        nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                                   batch_info=True, parallel=False)))
        decoder = "mixed" if gpu else "cpu"
        img = fn.decoders.image(nodes["encoded"], device=decoder, output_type=types.RGB)
        outs = {}
        if isinstance(recipe, ClsTrain):
            img = fn.slice(img, nodes["start"], nodes["shape"], axes=[0, 1])
            img = fn.resize(img, size=[recipe.crop, recipe.crop], interp_type=types.INTERP_CUBIC, antialias=True)
            outs["image"] = fn.flip(img, horizontal=nodes["flip"])
        elif isinstance(recipe, ClsVal):
            img = fn.resize(img, size=nodes["size"], interp_type=types.INTERP_CUBIC, antialias=True)
            crops = [fn.slice(img, nodes[f"start{k}"], [recipe.scale, recipe.scale], axes=[0, 1])
                     for k in range(recipe.crops)]
            outs["image"] = crops[0] if recipe.crops == 1 else fn.stack(*crops)
        elif isinstance(recipe, SegTrain):
            mask = nodes["mask"].gpu() if gpu else nodes["mask"]
            fill = [float(round(c)) for c in MEAN_RGB_255]
            img = fn.slice(img, nodes["start"], nodes["shape"], axes=[0, 1], out_of_bounds_policy="pad", fill_values=fill)
            mask = fn.slice(mask, nodes["start"], nodes["shape"], axes=[0, 1], out_of_bounds_policy="pad", fill_values=255)
            img = fn.resize(img, size=[recipe.crop, recipe.crop], interp_type=types.INTERP_CUBIC, antialias=True)
            mask = fn.resize(mask, size=[recipe.crop, recipe.crop], interp_type=types.INTERP_NN, antialias=False)
            outs["image"] = fn.flip(img, horizontal=nodes["flip"])
            outs["label"] = fn.flip(mask, horizontal=nodes["flip"])
        else:
            outs["image"] = fn.resize(img, size=nodes["size"], interp_type=types.INTERP_CUBIC, antialias=True)
            outs["label"] = nodes["mask"]
        for k in ("label", "photometric", "index", "real", "skipped"):
            if k in nodes and k not in outs:
                outs[k] = nodes[k]
        return tuple(outs.values())

    p = pipe()
    p.build()
    keys = ["image", "label"] + [k for k in ("photometric", "index", "real", "skipped") if k in names]
    return p, keys


def _to_torch(tl, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A DALI TensorList -> one stacked tensor (uniform shapes) or a list (variable shapes)."""
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        def one(t):
            out = torch.empty(t.shape(), dtype=torch.uint8 if t.dtype.name == "UINT8" else torch.float32, device=device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
            return out
        return one(tl.as_tensor()) if tl.is_dense_tensor() else [one(tl[i]) for i in range(len(tl))]
    if tl.is_dense_tensor():
        return torch.from_numpy(np.array(tl.as_tensor()))
    return [torch.from_numpy(np.array(tl[i])) for i in range(len(tl))]


class DaliBackend:
    """Raw batches from a DALI pipeline (CPU operators with ``device_id=None``, or GPU with mixed decode)."""

    name = "dali"

    def __init__(self, index: DatasetIndex, recipe, *, seed: int, batch_size: int, threads: int, device: str,
                 skip_bad: bool):
        if not available():
            raise RuntimeError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 (Linux x86-64/aarch64)")
        self.index, self.recipe, self.seed, self.skip_bad = index, recipe, seed, skip_bad
        self.batch_size, self.threads, self.device = batch_size, max(1, threads), device
        self.pipe = None
        self.next_epoch: int | None = None

    def iterate(self, epoch: int, plan_fn, batch_size: int, start_batch: int = 0):
        """Batches of ``epoch``; ``plan_fn(epoch) -> (indices, real)`` also lets DALI prefetch the next epoch."""
        assert batch_size == self.batch_size
        if self.pipe is None or self.next_epoch != epoch or start_batch:
            self.source = _Source(self.index, self.recipe, self.seed, self.batch_size, self.skip_bad)
            self.source.base_epoch, self.source.start_batch, self.source.plan_fn = epoch, start_batch, plan_fn
            device_id = torch.cuda.current_device() if self.device == "gpu" else None
            self.pipe, self.keys = _build(self.source, self.recipe, self.batch_size, self.threads, self.device, device_id)
        out_device = torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")
        indices = plan_fn(epoch)[0]
        b = start_batch
        self.next_epoch = None  # an abandoned epoch leaves the pipeline mid-way: rebuild next time
        while True:
            try:
                outs = self.pipe.run()
            except StopIteration:
                break
            except BadSampleError:
                self.pipe = None
                raise
            except Exception as e:
                chunk = [self.index.samples[int(i)].image for i in indices[b * batch_size:(b + 1) * batch_size]]
                self.pipe = None
                raise BadSampleError(f"DALI failed on a batch with files {chunk}: {str(e).splitlines()[0]}") from e
            batch = {k: _to_torch(v, out_device if k in ("image", "label") else torch.device("cpu"))
                     for k, v in zip(self.keys, outs)}
            batch["skipped"] = int(batch["skipped"].sum())
            b += 1
            yield batch
        self.next_epoch = epoch + 1
        self.pipe.reset()  # starts prefetching epoch + 1
