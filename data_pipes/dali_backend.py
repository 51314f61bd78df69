"""NVIDIA DALI backend: decode, crop, resize, flip, colour and normalisation in DALI (GPU ``mixed`` decode on a GPU).

The Python side runs in DALI's worker processes: a parallel per-sample external source (:mod:`data_pipes.feed`)
reads each file, parses its header, reads the mask (palette PNGs as indices: DALI's decoder would return palette
colours) and draws the recipe's parameters from ``(seed, epoch, index)``, so order, sharding, augmentation and
resume are those of the torch backend. The main process's Python only schedules the workers and hands finished
batches over (zero-copy). Bad samples: the feed reports header/mask problems per sample (no exception crosses
DALI); a file DALI cannot decode fails its batch, and only then does the main process decode that batch's files
with Pillow to name the culprit (``skip_bad``: the pipeline restarts at that batch with the file fed as a
placeholder; nothing is ever decoded twice otherwise).

Outputs per batch (:func:`contract`): ``image`` float32 normalised (ImageNet mean/std), layout CHW: (N, 3, H, W),
(N, K, 3, s, s) for K classification val crops, or a list of (3, h, w) for segmentation val; classification
training gives uint8 (N, 224, 224, 3) HWC plus ``photometric`` (N, 9): its colour jitter, PCA lighting and
normalisation run in torch on the batch's device, the same code as for the torch backend (on a CPU, cheaper than
DALI's arithmetic operators: see ``bench.data_throughput.profile``). ``label`` int64 (N,) or uint8 (N, H, W, 1)
(segmentation val: a list of (h, w, 1)); ``index`` int64 (N,) (-1 = placeholder); ``real`` bool (N,). Images are
resized bicubic where an axis is enlarged and bilinear with antialiasing where it shrinks: the seed's adaptive
choice (:func:`recipes.adaptive_filter`), taken per axis; classification val is bicubic, as in the seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import BadSampleError, load_rgb
from .feed import EpochPlan, SampleFeed, outputs
from .layouts import DatasetIndex
from .recipes import MEAN, MEAN_RGB_255, STD, ClsTrain, ClsVal, SegTrain

log = logging.getLogger(__name__)
_DTYPE_NAMES = {np.uint8: "UINT8", np.int32: "INT32", np.int64: "INT64", np.float32: "FLOAT", np.bool_: "BOOL"}


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def contract(recipe, gpu: bool) -> dict[str, tuple[str, str, int, str]]:
    """The pipeline's outputs, in order: name -> (device, DALI dtype name, ndim, layout); checked at every run by
    DALI (``output_dtype`` / ``output_ndim``) and statically by :func:`check_graph`."""
    dev = "gpu" if gpu else "cpu"
    crops = isinstance(recipe, ClsVal) and recipe.crops > 1
    image = (dev, "FLOAT", 4 if crops else 3, "FCHW" if crops else "CHW")
    if isinstance(recipe, ClsTrain):
        image = (dev, "UINT8", 3, "HWC")
    label = ("cpu", "INT64", 0, "") if isinstance(recipe, (ClsTrain, ClsVal)) else (dev, "UINT8", 3, "HWC")
    out = {"image": image, "label": label}
    if isinstance(recipe, ClsTrain):
        out["photometric"] = ("cpu", "FLOAT", 1, "")
    return {**out, "index": ("cpu", "INT64", 0, ""), "real": ("cpu", "BOOL", 0, ""), "error": ("cpu", "UINT8", 1, "")}


# Decode the stored pixel grid: DALI's decoders would apply the EXIF orientation tag (adjust_orientation=True),
# Pillow (the torch backend), torchvision and the seed's loaders do not, the masks are drawn on the stored grid,
# and the feed's crop windows are computed from the stored (header) size.
_STORED_GRID = dict(adjust_orientation=False)


def _graph(recipe, nodes: dict, gpu: bool) -> dict:
    """The DALI graph from the feed's nodes to the outputs of :func:`contract` (the same graph on CPU and GPU:
    placement only)."""
    from nvidia.dali import fn, types

    decoder = "mixed" if gpu else "cpu"
    # one pass: mirror, HWC -> CHW, float, normalise; 0..255 input so mean/std scale by 255
    norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
    # the seed's adaptive filter, per axis: bicubic when enlarging, antialiased bilinear when shrinking
    adaptive = dict(mag_filter=types.INTERP_CUBIC, min_filter=types.INTERP_LINEAR, antialias=True)
    out = {}
    if isinstance(recipe, ClsTrain):
        # ROI decode: only the random-resized-crop window is decoded (libjpeg-turbo / nvJPEG skip the rest)
        img = fn.decoders.image_slice(
            nodes["encoded"],
            start=nodes["anchor"],
            shape=nodes["shape"],
            axes=[0, 1],
            device=decoder,
            output_type=types.RGB,
            **_STORED_GRID,
        )
        img = fn.resize(img, size=[recipe.crop, recipe.crop], **adaptive)
        out["image"] = fn.flip(img, horizontal=nodes["flip"])
        out["label"], out["photometric"] = nodes["label"], nodes["photometric"]
    elif isinstance(recipe, ClsVal):
        img = fn.decoders.image(nodes["encoded"], device=decoder, output_type=types.RGB, **_STORED_GRID)
        img = fn.resize(img, size=nodes["size"], interp_type=types.INTERP_CUBIC, antialias=True)  # seed: bicubic
        crops = [
            fn.crop_mirror_normalize(
                fn.slice(img, start=nodes[f"start{k}"], shape=[recipe.scale] * 2, axes=[0, 1]), **norm
            )
            for k in range(recipe.crops)
        ]
        out["image"] = crops[0] if recipe.crops == 1 else fn.stack(*crops, axis_name="F")
        out["label"] = nodes["label"]
    elif isinstance(recipe, SegTrain):
        img = fn.decoders.image(nodes["encoded"], device=decoder, output_type=types.RGB, **_STORED_GRID)
        mask = nodes["mask"].gpu() if gpu else nodes["mask"]
        fill = [float(round(c)) for c in MEAN_RGB_255]  # normalises to ~0, as the torch backend's canvas
        window = dict(start=nodes["anchor"], shape=nodes["shape"], axes=[0, 1], out_of_bounds_policy="pad")
        img = fn.resize(fn.slice(img, fill_values=fill, **window), size=[recipe.crop] * 2, **adaptive)
        mask = fn.resize(
            fn.slice(mask, fill_values=255, **window),
            size=[recipe.crop] * 2,
            interp_type=types.INTERP_NN,
            antialias=False,
        )
        out["image"] = fn.crop_mirror_normalize(img, mirror=nodes["flip"], **norm)
        out["label"] = fn.flip(mask, horizontal=nodes["flip"])
    else:
        img = fn.decoders.image(nodes["encoded"], device=decoder, output_type=types.RGB, **_STORED_GRID)
        out["image"] = fn.crop_mirror_normalize(fn.resize(img, size=nodes["size"], **adaptive), **norm)
        out["label"] = nodes["mask"].gpu() if gpu else nodes["mask"]
    for k in ("index", "real", "error"):
        out[k] = nodes[k]
    return out


def make_pipeline(
    feed: SampleFeed,
    recipe,
    *,
    batch_size: int,
    threads: int,
    py_workers: int,
    device: str,
    device_id: int | None,
    start_method: str = "fork",
    prefetch: int = 2,
):
    """An unbuilt DALI pipeline over ``feed`` (the outputs of :func:`contract`, in that order).

    ``py_workers`` feed processes (0: the feed runs in the main thread); ``device`` ``gpu`` puts decoding on
    ``mixed`` and everything after it on the GPU. Building needs a GPU then; :func:`check_graph` does not. The
    pipeline's ``feed_metadata`` maps the feed's graph nodes to their declared (ndim, dtype name, layout).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    spec = outputs(recipe)
    want = contract(recipe, gpu)
    declared: dict[str, tuple[int, str, str]] = {}

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        exec_dynamic=True,
        prefetch_queue_depth=prefetch,
        py_num_workers=py_workers,
        py_start_method=start_method,
        output_dtype=[getattr(types, d) for _, d, _, _ in want.values()],
        output_ndim=[n for _, _, n, _ in want.values()],
    )
    def pipe():
        # dtype/ndim/layout declared: DALI checks each sample the workers return against them
        parallel = dict(parallel=True, prefetch_queue_depth=prefetch) if py_workers > 0 else {}
        nodes = fn.external_source(
            source=feed,
            num_outputs=len(spec),
            batch=False,
            **parallel,
            dtype=[getattr(types, _DTYPE_NAMES[t]) for _, t, _, _ in spec],
            ndim=[n for _, _, n, _ in spec],
            layout=[lay for *_, lay in spec],
        )
        declared.update({node.name: (ndim, _DTYPE_NAMES[t], lay) for node, (_, t, ndim, lay) in zip(nodes, spec)})
        out = _graph(recipe, dict(zip([name for name, *_ in spec], nodes)), gpu)
        return tuple(out[k] for k in want)

    p = pipe()
    p.feed_metadata = declared
    return p


def check_graph(pipe, want: dict[str, tuple[str, str, int, str]] | None = None) -> dict:
    """Validate an unbuilt pipeline's graph without a GPU (and without running it), with DALI's own checks.

    1. ``pipe.serialize()`` (no device needed) builds the graph and hands every operator to DALI's C++
       pipeline, which checks the operator schemas, arguments and input placement (a CPU or ``mixed`` operator
       fed GPU data, ...).
    2. Each operator is registered for its placement (``RegisteredCPUOps`` / ``RegisteredGPUOps`` /
       ``RegisteredMixedOps``): an operator without a GPU kernel passes step 1 and fails only at build on a GPU.
    3. Output (ndim, dtype, layout) are propagated from the external sources' declared metadata
       (``pipe.feed_metadata``: node name -> (ndim, dtype name, layout), as :func:`make_pipeline` sets it) by
       the schemas' own rules (``OpSpec.InferOutputMetadata``, which also rejects unsupported input layouts and
       dimensionalities) and compared with ``want``: name -> (device, dtype name, ndim, layout), in output order
       (see :func:`contract`).

    Returns ``{"ops": [(name, schema, device)], "outputs": [(device, ndim, dtype, layout)], "problems": [...]}``;
    an empty ``problems`` list means the graph passed.
    """
    import nvidia.dali.backend as b
    from nvidia.dali import types

    try:
        pipe.serialize()
    except RuntimeError as e:
        return {"ops": [], "outputs": [], "problems": [f"DALI rejected the graph: {_first_line(e)}"]}
    registry = {
        "cpu": set(b.RegisteredCPUOps(True)),
        "gpu": set(b.RegisteredGPUOps(True)),
        "mixed": set(b.RegisteredMixedOps(True)),
    }
    sources = getattr(pipe, "feed_metadata", {})
    meta: dict[str, tuple] = {}
    problems: list[str] = []
    ops = []
    for op in pipe._ops:  # DALI 2.x internals: the operators in topological order, as serialize() built them
        schema, dev, spec = op._op.schema, op._op.device, op.spec
        name, nreg = schema.Name(), spec.NumRegularInput()
        ops.append((op.name, name, dev))
        if name not in registry.get(dev, ()):
            problems.append(f"{op.name}: {name} has no {dev} implementation")
        if name == "ExternalSource":
            ndim, dtype, layout = sources.get(spec.OutputName(0), (None, None, None))
            meta[spec.OutputName(0)] = (ndim, getattr(types, dtype) if dtype else None, layout)
            continue
        if name == "_ArithmeticGenericOp":  # no schema rule: numpy-like broadcasting and type promotion
            ins = [meta.get(spec.InputDesc(i)[0]) or (None, None, None) for i in range(nreg)]
            ins = [m for m in ins if m[0] is not None] or [(None, None, None)]
            top = max(ins, key=lambda m: m[0] or 0)
            dtype = types.FLOAT if any(m[1] == types.FLOAT for m in ins) else top[1]
            meta[spec.OutputName(0)] = (top[0], dtype, top[2])
            continue
        probe = op._op.spec.copy()  # the operator's scalar arguments, without inputs
        for i in range(nreg):
            src, in_dev, *_ = spec.InputDesc(i)
            ndim, dtype, layout = meta.get(src) or (None, None, None)
            probe.AddInput(src, in_dev, ndim, dtype, None if layout is None else str(layout))
        for i in range(spec.NumOutput()):
            probe.AddOutput(spec.OutputName(i), spec.OutputDevice(i))
        try:
            probe.InferOutputMetadata()
        except (RuntimeError, ValueError) as e:
            problems.append(f"{op.name}: {name}: {' '.join(str(e).split())[:200]}")
        for i in range(spec.NumOutput()):
            _, _, ndim, dtype, layout = probe.OutputDesc(i)
            meta[spec.OutputName(i)] = (ndim, dtype, None if layout is None else str(layout))
    outs = []
    for node in pipe._graph_outputs:
        ndim, dtype, layout = meta.get(node.name) or (None, None, None)
        outs.append((node.device, ndim, None if dtype is None else dtype.name, layout))
    for (name, (dev, dtype, ndim, layout)), got in zip((want or {}).items(), outs):
        if got != (dev, ndim, dtype, layout):
            problems.append(
                f"output {name}: inferred (device, ndim, dtype, layout) {got}, "
                f"the contract says {(dev, ndim, dtype, layout)}"
            )
    return {"ops": ops, "outputs": outs, "problems": problems}


def _to_torch(tl, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A DALI TensorList -> one stacked tensor (uniform shapes) or a list (variable shapes)."""
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        def one(t):
            dtype = {"UINT8": torch.uint8, "FLOAT": torch.float32}[t.dtype.name]
            out = torch.empty(t.shape(), dtype=dtype, device=device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
            return out

        return one(tl.as_tensor()) if tl.is_dense_tensor() else [one(tl[i]) for i in range(len(tl))]
    # zero-copy: with exec_dynamic DALI never recycles an output buffer that is still referenced (the numpy view
    # keeps DALI's tensor alive), so a batch stays valid while the training step holds it
    if tl.is_dense_tensor():
        return torch.from_numpy(np.asarray(tl.as_tensor()))
    return [torch.from_numpy(np.asarray(tl[i])) for i in range(len(tl))]


def _close(pipe) -> None:
    """Stop a pipeline's threads and its feed processes now (not at garbage collection)."""
    if pipe is None:
        return
    pool = getattr(pipe, "_py_pool", None)
    pipe._shutdown()
    if pool is not None:
        pool.close()


def _worker_error(e: BaseException) -> bool:
    return "Exception traceback received from worker" in str(e)


class DaliBackend:
    """Raw batches from a DALI pipeline (CPU operators with ``device_id=None``, or GPU with mixed decode).

    ``threads`` DALI threads and ``py_workers`` feed processes (default: as many as threads). The workers are
    forked while this process has no CUDA context, and spawned (fresh interpreters, the feed pickled) once it has.
    """

    name = "dali"

    def __init__(
        self,
        index: DatasetIndex,
        recipe,
        *,
        seed: int,
        batch_size: int,
        threads: int,
        device: str,
        skip_bad: bool,
        py_workers: int | None = None,
    ):
        if not available():
            raise RuntimeError(
                "backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 (Linux x86-64/aarch64)"
            )
        self.index, self.recipe, self.seed, self.skip_bad = index, recipe, seed, skip_bad
        self.batch_size, self.threads, self.device = batch_size, max(1, threads), device
        self.py_workers = self.threads if py_workers is None else py_workers
        self.pipe = None
        self.next_epoch: int | None = None
        self.bad: set[int] = set()  # dataset indices DALI could not decode (skip_bad), fed as placeholders

    def start_method(self) -> str:
        # fork is fast, but forking a process that holds a CUDA context is unsupported
        return "spawn" if self.device == "gpu" or torch.cuda.is_initialized() else "fork"

    def pipeline(self, plan: EpochPlan, epoch: int = 0, start_batch: int = 0, device_id: int | None = None):
        """The unbuilt pipeline for ``epoch`` from ``start_batch`` on (see :func:`make_pipeline`)."""
        samples = self.index.samples
        feed = SampleFeed(
            [s.image for s in samples],
            [s.target for s in samples],
            self.index.label_space,
            self.recipe,
            self.seed,
            plan,
            self.batch_size,
            epoch,
            start_batch,
            frozenset(self.bad),
        )
        return make_pipeline(
            feed,
            self.recipe,
            batch_size=self.batch_size,
            threads=self.threads,
            py_workers=self.py_workers,
            device=self.device,
            device_id=device_id,
            start_method=self.start_method(),
        )

    def check_graph(self, plan: EpochPlan) -> dict:
        """:func:`check_graph` of this backend's pipeline (for ``device='gpu'`` too: no GPU needed)."""
        return check_graph(self.pipeline(plan), contract(self.recipe, self.device == "gpu"))

    def close(self) -> None:
        _close(self.pipe)
        self.pipe, self.next_epoch = None, None

    def _open(self, plan: EpochPlan, epoch: int, start_batch: int) -> None:
        self.close()
        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self.pipe = self.pipeline(plan, epoch, start_batch, device_id)
        self.pipe.build()

    def iterate(self, epoch: int, plan: EpochPlan, batch_size: int, start_batch: int = 0):
        """Batches of ``epoch``; at its end the pipeline goes on prefetching ``epoch + 1``."""
        assert batch_size == self.batch_size
        if self.pipe is None or self.next_epoch != epoch or start_batch:
            self._open(plan, epoch, start_batch)
        out_device = torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")
        names = list(contract(self.recipe, self.device == "gpu"))
        b = start_batch
        self.next_epoch = None  # an abandoned epoch leaves the pipeline mid-way: rebuild next time
        while True:
            try:
                outs = self.pipe.run()
            except StopIteration:
                break
            except Exception as e:  # DALI raises plain RuntimeErrors (and Exception for worker failures)
                self.close()
                if _worker_error(e):  # a bug in the feed, not a bad file: keep the worker's traceback
                    raise
                found = self._locate_bad(plan, epoch, b)
                if found and self.skip_bad:
                    self.bad.update(found)
                    self._open(plan, epoch, b)  # the same batch again, the culprits as placeholders
                    continue
                if found:
                    raise BadSampleError(next(iter(found.values()))) from e
                files = [
                    self.index.samples[int(i)].image for i in plan(epoch)[0][b * batch_size : (b + 1) * batch_size]
                ]
                raise BadSampleError(f"DALI failed on a batch with files {files}: {_first_line(e)}") from e
            outs = dict(zip(names, outs))
            error = outs.pop("error")
            batch = {
                k: _to_torch(v, out_device if k in ("image", "label") else torch.device("cpu")) for k, v in outs.items()
            }
            errors = [bytes(np.asarray(error[i])).decode("utf-8", "replace") for i in range(len(error))]
            errors = [m for m in errors if m]
            if errors and not self.skip_bad:
                self.close()
                raise BadSampleError(errors[0])
            for m in errors:
                log.warning("skipping bad sample: %s", m)
            batch["skipped"], batch["normalized"] = len(errors), not isinstance(self.recipe, ClsTrain)
            b += 1
            yield batch
        self.next_epoch = epoch + 1
        self.pipe.reset()  # starts prefetching epoch + 1

    def _locate_bad(self, plan: EpochPlan, epoch: int, b: int) -> dict[int, str]:
        """Pillow-decode batch ``b`` and the two DALI may have been prefetching: {dataset index: message}."""
        indices = plan(epoch)[0]
        found = {}
        for j in range(b * self.batch_size, min(len(indices), (b + 3) * self.batch_size)):
            i = int(indices[j])
            if i in self.bad or i in found:
                continue
            try:
                load_rgb(self.index.samples[i].image)
            except BadSampleError as e:
                found[i] = str(e)
        return found


def _first_line(e: BaseException) -> str:
    """The line of a DALI error that says what failed (DALI puts it after the operator's traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for k, ln in enumerate(lines[:-1]):
        if ln == "encountered:":
            return lines[k + 1]
    return lines[0] if lines else type(e).__name__
