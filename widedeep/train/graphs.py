"""Whole-step CUDA graphs for ``python -m widedeep.train --cuda-graphs``: forward, loss, backward and the SGD step
captured once with :class:`torch.cuda.graph` and replayed for every later step.

The recipe is PyTorch's "whole-network capture" (CUDA semantics notes, *CUDA Graphs*), followed step by step:

1. **Static buffers.** The first batch fixes the input shapes: ``static_x`` / ``static_y`` are allocated once and
   every step copies its batch into them (``copy_``: asynchronous, on the current stream).
2. **Warm-up on a side stream.** The first ``warmup`` steps (3, as in the recipe) run eagerly on a side stream
   that waits for the current stream first and is waited for afterwards. They are real training steps on real
   batches (the recipe: "you must use a few batches of real data", because they include ``optimizer.step()``),
   so nothing is trained twice or skipped. They also do every lazy one-off thing before capture: Triton JIT
   compilation and autotuning (``kernels.conv`` autotunes with ``do_bench``, which synchronises), cuDNN/cuBLAS
   handle and workspace creation, the optimizer's momentum buffers, the GradScaler's scale tensor.
   The same side stream is the capture stream (``torch.cuda.graph(g, stream=s)``), so handles cached per stream
   in warm-up are the ones capture uses. ``capture_error_mode="thread_local"``: the data loader's threads
   (pinning, DALI) keep running during the capture, which the default "global" mode would turn into an error.
3. **Capture.** ``optimizer.zero_grad(set_to_none=True)`` right before capture, so backward creates ``.grad``
   from the graph's private pool and every replay refills those same tensors in place; then forward (autocast
   as in eager), loss, backward and ``optimizer.step()`` inside ``with torch.cuda.graph(g)``.
4. **Replay** per step: copy the batch into the static buffers, ``g.replay()``. The returned loss and
   (correct, counted) tensors are static outputs, overwritten by the next replay.

What makes the step capture-safe, and how each host-side value reaches the graph:

- **Learning rate.** A captured ``optimizer.step()`` bakes Python floats into the graph, so a float lr would
  stay at its capture-time value. :func:`prepare_optimizer` turns each group's ``lr`` into a 0-dim fp32 tensor
  on the device and switches SGD to ``fused=True``: ``torch._fused_sgd_`` has a ``tensor_lr`` overload that reads
  the lr on the device (SGD has no ``capturable`` flag: it keeps no step counter; the foreach path would turn a
  tensor lr into a Python scalar with ``.item()``, a sync). :func:`widedeep.train.optim.set_lr` then writes the
  new value in place (``fill_``), which every later replay reads.
- **Loss.** :func:`step_loss` is the trainer's one loss (``losses.training_loss``) with the OHEM selection swapped
  for :func:`ohem_cross_entropy_static` (equal to ``losses.ohem_cross_entropy``): a fixed-shape ``kthvalue``
  (ignored pixels set above any probability) instead of boolean indexing and ``int(valid.sum())``.
- **BN statistics.** The fused kernels never synchronise (``num_batches_tracked``, momentum=None's factor and the
  running statistics are updated on the device); eager BatchNorm2d likewise.
- **AMP.** bf16 autocast needs no scaler: captured as is. fp16's GradScaler decides on the host whether to skip a
  step, so with ``--amp fp16`` the recipe's other form is used: forward, loss (scaled) and backward are captured,
  ``scaler.step`` / ``scaler.update`` run eagerly after each replay (the static ``.grad`` tensors are their input).

Refused with one line (:func:`refuse`): no CUDA device, several processes (DDP's all-reduce capture needs its own
recipe, not done; gloo collectives cannot be captured at all), ``--compile`` together with it. Shapes must not
change: a batch of another shape than the captured one (the last partial batch of an epoch, a batch thinned by
``--skip-bad``) is dropped with a warning, as ``drop_last`` would (counted in :attr:`GraphedStep.dropped`).
Evaluation stays eager (the trainer evaluates ``model``, never the graph).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from .losses import IGNORE, training_loss

log = logging.getLogger("widedeep.train")

WARMUP_STEPS = 3  # the recipe's count for a single process


class GraphRefused(ValueError):
    """--cuda-graphs cannot work in this configuration; the message says why in one line."""


def refuse(
    device: torch.device, *, world_size: int = 1, compile_mode: str = "off", dist_backend: str | None = None
) -> None:
    """Raise :class:`GraphRefused` where a whole-step graph cannot work (see the module docstring)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise GraphRefused(f"--cuda-graphs needs a CUDA device (this run is on {device.type}); drop the flag")
    if dist_backend is not None and dist_backend != "nccl":
        raise GraphRefused(
            f"--cuda-graphs: {dist_backend} collectives (e.g. sync BN over gloo) cannot be captured "
            "in a CUDA graph; use NCCL or drop the flag"
        )
    if world_size > 1:
        raise GraphRefused(
            f"--cuda-graphs runs one process for now ({world_size} here): capturing DDP's all-reduce "
            "needs its own recipe (not done); train on one GPU or drop the flag"
        )
    if compile_mode != "off":
        raise GraphRefused(
            f"--cuda-graphs with --compile {compile_mode}: pick one (--compile reduce-overhead is "
            "torch.compile's own CUDA graphs)"
        )


def prepare_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """SGD made capture-safe in place: fused kernels and a 0-dim fp32 device tensor lr per group.

    Checkpoints keep the plain form (float lr, no ``fused``; a state_dict post-hook), so a run saved with graphs
    resumes without them and vice versa (call this again after ``load_state_dict``)."""
    if not isinstance(opt, torch.optim.SGD):
        raise GraphRefused(f"--cuda-graphs supports SGD (the seed's optimisers), not {type(opt).__name__}")
    for g in opt.param_groups:
        lr = g["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        g["fused"], g["foreach"] = True, False
    opt._step_supports_amp_scaling = True  # what SGD(fused=True) sets in its constructor
    opt._need_device_dtype_check_for_fused = True
    if not getattr(opt, "_widedeep_plain_state", False):
        opt.register_state_dict_post_hook(_plain_state_dict)
        opt._widedeep_plain_state = True
    return opt


def _plain_state_dict(_opt, state: dict) -> dict:
    for g in state["param_groups"]:  # copies made by state_dict(): the live groups keep their tensors
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])  # a checkpoint is a sync point anyway
        g["fused"], g["foreach"] = None, None
    return state


# ------------------------------------------------------------------------------------------------ capture-safe loss
def ohem_cross_entropy_static(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    thresh: float = 0.6,
    min_kept: int = 256,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
):
    """:func:`widedeep.train.losses.ohem_cross_entropy` with no host read and no data-dependent shape.

    Same selection: valid pixels whose ground-truth probability is <= max(thresh, the ``min_kept``-th smallest
    valid probability) are kept, all valid pixels when there are at most ``min_kept``; mean NLL over the kept
    ones (0 when none). The k-th smallest valid probability is a ``kthvalue`` over all pixels with the ignored
    ones set to 2 (above any probability), so it equals the one over the valid pixels whenever more than
    ``min_kept`` are valid (the only case that reads it). logits (N, C, H, W), target (N, H, W) int64.
    ``reduction="sum"``: (sum over the kept pixels, their count), as ``ohem_cross_entropy``.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(target.shape)} differ in size; "
            "subsample labels (labels_at_feature_resolution) or upsample logits first"
        )
    nll = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    with torch.no_grad():
        valid = target != ignore_index
        prob = torch.exp(-nll.detach())
        flat = torch.where(valid, prob, 2.0).flatten()
        kth = flat.kthvalue(min(min_kept, flat.numel())).values
        hard = valid & (prob <= torch.clamp(kth, min=thresh))
        keep = torch.where(valid.sum() > min_kept, hard, valid)
    total = (nll * keep).sum()
    if reduction == "sum":
        return total, keep.sum()
    return total / keep.sum().clamp(min=1)


def step_loss(
    task: str,
    out: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_resolution: str = "feature",
    ohem: bool = True,
    stride: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's loss (:func:`widedeep.train.losses.training_loss`, its one definition) in its capture-safe
    form: loss and (correct, counted) as device tensors, OHEM with a fixed-shape selection."""
    return training_loss(
        task, out, y, loss_resolution=loss_resolution, ohem=ohem, stride=stride, ohem_sum=ohem_cross_entropy_static
    )


# ------------------------------------------------------------------------------------------------ the graphed step
class GraphedStep:
    """One training step (forward, loss, backward, optimizer) as a CUDA graph after ``warmup`` eager steps.

    ``forward_loss(x, y) -> (loss, extras)``: the step's forward and loss, autocast included, with no host read.
    ``opt`` must be capture-safe (:func:`prepare_optimizer`); ``scaler`` a GradScaler (enabled only for fp16).
    Calling the object trains one step on (x, y) and returns (loss, extras), both static tensors valid until the
    next call, or None for a batch whose shapes differ from the first one (dropped, counted in ``dropped``).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        opt: torch.optim.Optimizer,
        forward_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        *,
        scaler: torch.amp.GradScaler | None = None,
        warmup: int = WARMUP_STEPS,
    ):
        self.net, self.opt, self.forward_loss = net, opt, forward_loss
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.warmup = warmup
        # fp16: GradScaler.step decides on the host whether to skip the step, so it stays out of the graph
        self.optimizer_in_graph = not self.scaler.is_enabled()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.static_x = self.static_y = None
        self.static_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps = 0  # steps trained (warm-up and replays)
        self.dropped = 0

    def _eager_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        loss, extras = self.forward_loss(self.static_x, self.static_y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss, extras

    def _captured_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: forward, loss, (scaled) backward, and the optimizer step unless fp16."""
        loss, extras = self.forward_loss(self.static_x, self.static_y)
        self.scaler.scale(loss).backward()
        if self.optimizer_in_graph:
            self.opt.step()
        return loss, extras

    def _capture(self) -> None:
        g = torch.cuda.CUDAGraph()
        # grads to None first: backward allocates them from the graph's pool; replays refill them in place
        self.opt.zero_grad(set_to_none=True)
        # thread_local: the data loader's threads (pinning, DALI) may call CUDA while this thread captures
        with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
            out = self._captured_step()
        self.graph, self.static_out = g, out
        log.info(
            "--cuda-graphs: step captured after %d warm-up steps (batch %s); replaying it from now on",
            self.steps,
            tuple(self.static_x.shape),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.static_x is None:
            self.static_x = torch.empty_like(x)
            self.static_y = torch.empty_like(y)
            self.stream = torch.cuda.Stream(device=x.device)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape or x.stride() != self.static_x.stride():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "--cuda-graphs: batch %s differs from the captured %s: dropped (%d so far; a last "
                    "partial batch is dropped every epoch, as drop_last would)",
                    tuple(x.shape),
                    tuple(self.static_x.shape),
                    self.dropped,
                )
            return None
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.graph is None and self.steps < self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self._eager_step()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.steps += 1
            return out
        if self.graph is None:
            self.stream.wait_stream(torch.cuda.current_stream())
            self._capture()
            torch.cuda.current_stream().wait_stream(self.stream)
        self.graph.replay()
        if not self.optimizer_in_graph:
            self.scaler.step(self.opt)
            self.scaler.update()
        self.steps += 1
        return self.static_out


# ------------------------------------------------------------------------------------------------ sync detector
# Python-level reads of a tensor's value on the host. On a GPU each waits for the device (a sync, and an error
# inside a capture); on a CPU they are what would sync once the same code runs on a GPU.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
# The ATen ops behind them (and behind C++ reads, e.g. a Tensor given where a Scalar is expected: alpha=-lr).
HOST_READ_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "is_nonzero",
    "unique",
    "_unique",
    "_unique2",
    "equal",
)


# Tensors made from host data: on a GPU a host-to-device copy, which a capture would either refuse or freeze at
# its capture-time value.
HOST_UPLOADS = ("tensor", "as_tensor", "from_numpy")


class HostSyncError(RuntimeError):
    pass


def _in_package(frame, prefixes: tuple[str, ...]) -> bool:
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return True
        frame = frame.f_back
    return False


def _host_read_mode(exclude_packages: tuple[str, ...]):
    """A dispatch mode that raises on the ATen ops in :data:`HOST_READ_OPS` and on boolean-mask indexing (reads
    made inside C++), except below a frame of ``exclude_packages``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            # a boolean mask index has a data-dependent shape: its nonzero runs inside the C++ kernel
            masked = (
                name.startswith(("index", "_index_put"))
                and len(args) > 1
                and isinstance(args[1], (list, tuple))
                and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
            )
            if (name in HOST_READ_OPS or masked) and not (
                exclude_packages and _in_package(sys._getframe(1), exclude_packages)
            ):
                raise HostSyncError(f"host read of a tensor: aten.{name}" + (" with a boolean mask" if masked else ""))
            return func(*args, **(kwargs or {}))

    return _Mode()


@contextlib.contextmanager
def forbid_host_sync(exclude_packages: tuple[str, ...] = ()):
    """Raise :class:`HostSyncError` on any host read of a tensor's value inside the block.

    Two nets: the Tensor methods in :data:`HOST_READS`, ``torch.cuda.synchronize`` and the host-data constructors
    in :data:`HOST_UPLOADS` are patched to raise, and a dispatch mode raises on the ATen ops in
    :data:`HOST_READ_OPS` and on boolean-mask indexing (which also catches reads made inside C++, e.g.
    ``add_(t, alpha=tensor)``). ``exclude_packages``: calls made while a frame of these packages is on
    the stack are allowed; ``("triton",)`` exempts the Triton interpreter, which runs a kernel's *device* code on
    the host with numpy (on a GPU that code runs on the device and reads nothing back).
    """
    mode = _host_read_mode(exclude_packages)
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def allowed() -> bool:
        return bool(exclude_packages) and _in_package(sys._getframe(2), exclude_packages)

    def patched(name, orig):
        def f(self, *a, **k):
            if not allowed():
                raise HostSyncError(f"host read of a tensor: Tensor.{name}")
            return orig(self, *a, **k)

        return f

    sync = torch.cuda.synchronize
    uploads = {name: getattr(torch, name) for name in HOST_UPLOADS}

    def no_sync(*a, **k):
        raise HostSyncError("torch.cuda.synchronize")

    def upload(name, orig):
        def f(*a, **k):
            if not allowed():
                raise HostSyncError(f"tensor made from host data: torch.{name}")
            return orig(*a, **k)

        return f

    for name, orig in saved.items():
        setattr(torch.Tensor, name, patched(name, orig))
    for name, orig in uploads.items():
        setattr(torch, name, upload(name, orig))
    torch.cuda.synchronize = no_sync
    try:
        with mode:
            yield
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
        for name, orig in uploads.items():
            setattr(torch, name, orig)
        torch.cuda.synchronize = sync
