"""``python -m bench.host``: the host cost of a training step, fused vs eager, without a GPU (issue 20, item 1).

    python -m bench.host                     # both models, ~1-2 min on 2 shared cores; JSON in bench/results/
    python -m bench.host --smoke             # one model, few repetitions (CI: tests/test_bench_host.py)
    python -m bench.host --update-readme     # also rewrite the host table in bench/README.md
    python -m bench.host --strict            # exit 1 when a target fails (for after the lean-launcher work)

What it measures, per model (A1 = ``ilsvrc-cls_rna-a1_cls1000``, A1-s8 = ``voc_rna-a1_cls21_s8``) and BN mode
(``batch``: batch statistics; ``frozen``: ``model.freeze_bn_stats()``, running statistics with trainable gamma/beta;
``sync``: ``model.set_sync_bn()`` on a one-process gloo group, so the all_gather / all_reduce really run, on CPU),
for ``eager`` (``create_model(fused=False)``: BatchNorm2d + ReLU; plain BN in the sync mode too, torch's
SyncBatchNorm being CUDA-only) and ``fused`` (``create_model(fused=True)``):

- **Triton launches per step** (and per BN: launches / the model's 37 BatchNorm2d), by kernel name; collectives
  (``c10d`` ops: sync BN's all_gather / all_reduce) counted apart;
- **aten ops per step**: a ``TorchDispatchMode`` count of the aten ops below autograd and autocast (forward,
  backward, optimizer), split into kernels (ops that launch device work), allocations (``empty*``) and host syncs;
  views and metadata-only ops (``OpOverload.is_view``, ``detach``, ``alias``, size/stride queries) are not counted;
- **host syncs per step**: ``_local_scalar_dense`` (``item``/``bool``), ``nonzero``, ``masked_select``,
  ``unique``, ``equal`` at the dispatcher plus Python-level ``Tensor.cpu``/``tolist``/``numpy`` calls; a fused step
  must make none (``sync-free``: nothing stops CUDA-graph capture or makes the host wait for the device);
- **host time per step**: forward + cross-entropy + backward + SGD (momentum) step + ``zero_grad``, median of
  ``--iters`` repetitions, as the calling thread's CPU time (``time.thread_time``);
- **host time per BN-ReLU forward+backward**: ``kernels.bn_relu(x, bn)`` vs eager ``F.relu(bn(x))`` (the eager
  model's own ops: ``F.batch_norm`` + ``relu``), then ``y.backward(g)``, on the same ``BN_SHAPE``, batch and frozen;
- ratios fused / eager and the targets of issue 20 (:data:`TARGETS`) as pass/fail columns (the sync mode has a
  launch target but no host-time one: gloo's collectives are CPU work that NCCL would enqueue).

How the fused path reaches Triton without a GPU (:mod:`bench.stub_driver` has the details): a stand-in
``DriverBase`` is made Triton's active driver; its target is CUDA sm_90 (``GPUTarget("cuda", 90, 32)``), so every
kernel really compiles for sm_90 (TTIR -> PTX -> cubin with Triton's bundled ptxas, cached in ``~/.triton/cache``)
and each launch runs Triton's real ``JITFunction.run`` (binder, specialisation, cache lookup) and the real
``CudaLauncher.__call__``; the module load and the C launch are no-ops and the launch is counted. The run happens
in a child process started with ``TRITON_INTERPRET=0`` before ``kernels`` is imported (``kernels._runtime`` would
otherwise select the interpreter on a machine without CUDA). Patched in the child, and nothing else:

- ``torch.Tensor.is_cuda`` -> ``True`` (a property on the Python class): the kernels' launchers choose the
  compiled-Triton path for CUDA tensors (``backend="auto"``); the tensors stay CPU tensors, so the allocations the
  launchers make (``torch.empty(..., device=x.device)``) are real, tiny CPU allocations;
- ``torch.cuda.get_device_properties`` -> an H100 SXM's (132 SMs): the reduction grids' ``num_programs_hint``;
- for launchers that ask torch, not Triton's driver, for the device or stream (none today): ``torch.cuda``'s
  ``get_device_capability`` -> (9, 0), ``current_device`` -> 0, ``current_stream`` -> the null stream (``cuda_stream``
  0), and ``torch._C._cuda_getCurrentRawStream`` -> 0. (Triton's driver answers device 0, stream 0 itself.)

``torch.cuda.is_available`` is *not* patched (torch's optimizer would then query CUDA stream capture). If a launcher
decides "CUDA" some other way (``x.device.type``), the fused step makes no Triton launch and the run stops with an
error naming this list.

Fairness. Both sides run in the same process, under the same patches, on the same tiny CPU tensors
(:data:`CASES`: width 1/64, A1 at 32 px, A1-s8 at 24 px, batch 2; the GPU shapes, A1 at 224 px batch 64 and A1-s8
at 504 px batch 4, would only add CPU arithmetic, not host work), with the GPU campaign's settings (bf16 autocast,
channels_last), one thread, denormals flushed, the garbage collector paused while timing, and repetitions
interleaved (eager, fused, eager, ... in a rotating order) so that load on a shared machine hits both alike. Time
is the thread's CPU time, not wall time (descheduled time on the shared cores is not counted). What remains
unequal, and in whose favour:

- eager's numbers include the CPU arithmetic of its own BN/ReLU kernels; the fused launches compute nothing; and
  the convolutions' arithmetic, on both sides, pulls the ratio towards 1. At these sizes both are a few percent
  (halving the spatial size again moves eager's step by ~2%); both favour fused;
- neither side pays a driver launch (``cuLaunchKernel``, ~2-4 us of host time each on a GPU): eager's aten ops run
  as CPU kernels, Triton's C launch is a no-op. The fused step launches more kernels in all (Triton + aten), so
  this omission also favours fused;
- CPU ``oneDNN`` convolutions have their own host overheads (primitive cache lookups) in both steps: they dilute
  the ratio alike. The absolute milliseconds are this CPU's, not an H100 host's; the ratios are the result.

Supported Triton versions: :data:`bench.stub_driver.SUPPORTED` (3.6 and 3.9); elsewhere it prints why and exits 0
with a ``skipped`` JSON (no numbers).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
A1, S8 = "ilsvrc-cls_rna-a1_cls1000", "voc_rna-a1_cls21_s8"

# Width 1/64 (8-64 channels) and the smallest sizes that keep every BN's batch statistics defined: there the steps
# are host work (measured, interleaved, eager A1-s8: 12.8 ms at width 1/32 and 48 px, 11.2 ms at 1/64 and 24 px,
# 11.0 ms at 1/64 and 16 px; fused 26.1, 24.4, 24.1 ms)
CASES = {
    "A1": dict(label=A1, width=1 / 64, size=32, batch=2, gpu_shape="224 px, batch 64"),
    "A1-s8": dict(label=S8, width=1 / 64, size=24, batch=2, gpu_shape="504 px, batch 4"),
}
# N, C, H, W of the per-BN-ReLU measurement (channels_last, fp32): 64 channels take the launchers' wide-channel tiles;
# eager measured 90 / 83 / 77 us at 2x64x8x8 / 2x64x4x4 / 2x16x4x4 (fused 269 / 263 / 260 us)
BN_SHAPE = (2, 64, 4, 4)
# training-step modes; "sync": fused with set_sync_bn() on a one-rank gloo group (its eager partner is plain BN:
# torch's SyncBatchNorm is CUDA-only), timed but without a host-time target (gloo's collectives are CPU work)
MODES = ("batch", "frozen", "sync")
BN_MODES = ("batch", "frozen")  # the per-BN-ReLU rows
# issue 20: item 2 (host time) and item 3 (launches per BN per training step; sync BN: plus its collectives)
TARGETS = dict(step_ratio=1.3, bn_ratio=1.2, launches_per_bn={"batch": 5, "frozen": 3, "sync": 5})
CONFIGS = {
    "default": dict(models=["A1", "A1-s8"], modes=list(MODES), iters=31, warmup=2, bn_iters=301),
    "smoke": dict(models=["A1-s8"], modes=list(MODES), iters=3, warmup=1, bn_iters=11),
}
CHILD_ENV = "WIDEDEEP_BENCH_HOST_CHILD"


# ---------------------------------------------------------------------------------------------------------------
# patches and counters


class _Props:
    """What ``torch.cuda.get_device_properties`` returns in the child: an H100 SXM's numbers."""

    name = "bench.host stand-in (H100 SXM, sm_90)"
    major, minor = 9, 0
    multi_processor_count = 132
    total_memory = 80 * 2**30
    warp_size = 32


class _Stream:
    """What ``torch.cuda.current_stream`` returns in the child: the null stream of device 0."""

    cuda_stream = 0
    device_index = 0


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, stand-in): every patch of the child, the list the docstring and bench/README.md give."""
    import torch

    return [
        (torch.Tensor, "is_cuda", property(lambda self: True)),
        (torch.cuda, "get_device_properties", lambda device=None: _Props),
        (torch.cuda, "get_device_capability", lambda device=None: (_Props.major, _Props.minor)),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "current_stream", lambda device=None: _Stream),
        (torch._C, "_cuda_getCurrentRawStream", lambda device_index=0: 0),
    ]


@contextlib.contextmanager
def cuda_lookalike():
    """CPU tensors that the kernels' launchers take for CUDA tensors (see the module docstring for the list)."""
    missing = object()
    saved = []
    for owner, attr, value in _patches():
        # class attributes: only what the class itself defines (is_cuda lives on torch._C.TensorBase)
        saved.append(
            (
                owner,
                attr,
                owner.__dict__.get(attr, missing) if isinstance(owner, type) else getattr(owner, attr, missing),
            )
        )
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if old is missing:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)


SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
}
# ops that neither launch device work nor sync: allocations are counted apart, the rest not at all
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
META_OPS = {
    "detach",
    "alias",
    "lift_fresh",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "size",
    "stride",
    "is_same_size",
    "_has_same_storage_numel",
    "resize_",
    "set_",
    "_version",
    "is_contiguous",
}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _is_collective(func) -> bool:
    return func._schema.name.split("::")[0] in ("c10d", "_c10d_functional")


class AtenCounter:
    """Counts aten ops (``TorchDispatchMode``) and Python-level host syncs while active."""

    def __init__(self):
        self.kernels: collections.Counter = collections.Counter()
        self.allocs = 0
        self.syncs: collections.Counter = collections.Counter()
        self.collectives: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def active(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = _op_name(func)
                if _is_collective(func):
                    counter.collectives[name] += 1
                elif name in SYNC_OPS:
                    counter.syncs[name] += 1
                elif name in ALLOC_OPS:
                    counter.allocs += 1
                elif not (getattr(func, "is_view", False) or name in META_OPS):
                    counter.kernels[name] += 1
                return func(*args, **(kwargs or {}))

        originals = {m: getattr(torch.Tensor, m) for m in ("cpu", "tolist", "numpy")}

        def counted(m):
            def f(t, *a, **k):
                counter.syncs[f"Tensor.{m}"] += 1
                return originals[m](t, *a, **k)

            return f

        for m in originals:
            setattr(torch.Tensor, m, counted(m))
        try:
            with Mode():
                yield self
        finally:
            for m, f in originals.items():
                setattr(torch.Tensor, m, f)


# ---------------------------------------------------------------------------------------------------------------
# the measured callables


def _model(name: str, impl: str, mode: str):
    import torch
    from widedeep.models import create_model

    c = CASES[name]
    torch.manual_seed(0)
    model = create_model(c["label"], fused=impl == "fused", width=c["width"]).train()
    model = model.to(memory_format=torch.channels_last)
    if mode == "frozen":
        model.freeze_bn_stats(True)
    if mode == "sync" and impl == "fused":
        model.set_sync_bn(True)
    return model


@contextlib.contextmanager
def _one_rank_group():
    """A one-process gloo group (sync BN's collectives then run for real, on CPU); yields why not, or None."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        yield "torch.distributed with gloo is not available"
        return
    if dist.is_initialized():
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield None
        finally:
            dist.destroy_process_group()


def _step_fn(model, name: str):
    """One training step as the GPU campaign makes it (bench.impls): bf16 autocast (CPU here), channels_last."""
    import torch

    from bench.impls import inputs, loss_fn

    c = CASES[name]
    x, y = inputs(model, c["batch"], c["size"], "cpu")
    x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss_fn(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _bn_fns(mode: str):
    """(eager, fused) callables: BN-ReLU forward + backward on BN_SHAPE, channels_last fp32, no autocast."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import kernels

    N, C, H, W = BN_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BN_SHAPE, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(BN_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    bns = [nn.BatchNorm2d(C).train() for _ in range(2)]
    if mode == "frozen":
        for bn in bns:
            bn.eval()  # running statistics, gamma/beta still trainable: what freeze_bn_stats does

    def eager():
        F.relu(bns[0](x)).backward(dy)
        x.grad = None

    def fused():
        kernels.bn_relu(x, bns[1]).backward(dy)
        x.grad = None

    return eager, fused


FLOOR_SHAPE = (2, 8, 4, 4)  # one BN-ReLU-conv (3x3, C -> C) of the floor probe: dispatch-dominated, as in a step


def _floor_fns():
    """(eager, fused, floor) callables: one BN-ReLU-conv forward + backward (batch statistics, channels_last fp32).

    ``floor`` is the host cost the fused path could reach with every per-call decision made once: a hand-written
    autograd Function that makes the fused call's allocations, the same five Triton launches (recorded from one
    real ``kernels.bn_relu_conv`` call, entered through their compiled kernels' direct entries with the argument
    tuples prepared once) and the same torch convolutions, and nothing else: no checks, keys, BNParams or layers.
    It computes nothing meaningful (it reuses the recorded statistics and scratch tensors; the stand-in driver
    launches nothing anyway): a measurement of what is left above the kernels, not an implementation.
    Returns None (with why) where the launches have no direct entry (other Triton versions)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import kernels
    from kernels import launch

    N, C, H, W = FLOOR_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(FLOOR_SHAPE, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(FLOOR_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    bns = [nn.BatchNorm2d(C).train() for _ in range(3)]
    convs = [nn.Conv2d(C, C, 3, padding=1, bias=False).to(memory_format=torch.channels_last) for _ in range(3)]

    calls = []
    real = launch.Slot.__call__

    def spy(slot, *args):
        calls.append((slot, args))
        return real(slot, *args)

    launch.Slot.__call__ = spy
    try:
        for _ in range(2):  # the second call runs on the slots' direct entries
            calls.clear()
            kernels.bn_relu_conv(x, bns[2], [convs[2]])[0].backward(dy)
            x.grad = None
    finally:
        launch.Slot.__call__ = real
    names = [s.kernel.__name__ for s, _ in calls]
    if len(calls) != 5 or any(s.direct is None for s, _ in calls):
        return None, f"the fused call made launches {names} without direct entries on this Triton"
    (st, a_st), (ap, a_ap), _recompute, (su, a_su), (dxs, a_dx) = calls
    stream = 0  # the stand-in driver's stream (bench.host: cuda_lookalike)
    st_l, ap_l, su_l, dx_l = ((s.direct, *s.grid, stream) for s in (st, ap, su, dxs))  # (direct, gx, gy, gz, stream)
    st_tail, ap_tail, su_tail, dx_tail = a_st[4:], a_ap[2:], a_su[3:], a_dx[3:]
    part, tick = a_st[1], a_st[2]
    bn = bns[1]

    def run(launch_, *args):
        launch_[0](*launch_[1:], *args)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, w):
            stats = torch.empty((5, C), dtype=torch.float32)
            run(st_l, x, part, tick, stats, *st_tail)
            y = torch.empty_like(x)
            run(ap_l, x, y, *ap_tail)
            ctx.save_for_backward(x, w)
            return F.conv2d(y, w, None, (1, 1), (1, 1))

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            a = torch.empty_like(x)
            run(ap_l, x, a, *ap_tail)
            ga, gw, _ = torch.ops.aten.convolution_backward(
                gy, a, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
            )
            red = torch.empty((4, C), dtype=torch.float32)
            run(su_l, x, ga, x, *su_tail)
            dx = torch.empty_like(x)
            run(dx_l, x, ga, dx, *dx_tail)
            r = red.unbind(0)
            return dx, r[2], r[3], gw

    def eager():
        convs[0](F.relu(bns[0](x))).backward(dy)
        x.grad = None

    def fused():
        kernels.bn_relu_conv(x, bns[1], [convs[1]])[0].backward(dy)
        x.grad = None

    def floor():
        Floor.apply(x, bn.weight, bn.bias, convs[1].weight).backward(dy)
        x.grad = None

    return dict(eager=eager, fused=fused, floor=floor), None


def _interleaved(fns: dict, iters: int) -> dict:
    """{key: [thread-CPU seconds per call]} with calls interleaved in a rotating order, GC paused."""
    keys = list(fns)
    out: dict = {k: [] for k in keys}
    gc.collect()
    gc.disable()
    try:
        for r in range(iters):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.thread_time_ns()
                fns[k]()
                out[k].append((time.thread_time_ns() - t0) / 1e9)
    finally:
        gc.enable()
    return out


def _triton_launch_floor(iters: int = 2000) -> dict:
    """Host us of one launch of a 12-argument kernel: ``kernel[grid](...)`` through ``JITFunction.run`` vs the cached
    ``CompiledKernel``'s ``run`` called directly (what a launch plan would pay), on the stand-in driver."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(a, b, c, d, e, f, R, L, C, s, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
        o = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        tl.store(b + o, tl.load(a + o, mask=o < L) * s, mask=o < L)

    t = [torch.empty(1024) for _ in range(6)]
    args = (*t, 64, 1024, 16, 0.5)
    grid = (4, 1, 1)
    ck = _probe[grid](*args, BLOCK_R=16, BLOCK_L=64)
    bound = (*args, 16, 64)  # JITFunction.run passes every bound argument, constexprs too (the C launch skips them)

    def via_run():
        _probe[grid](*args, BLOCK_R=16, BLOCK_L=64)

    def direct():
        ck.run(4, 1, 1, 0, ck.function, ck.packed_metadata, None, None, None, *bound)

    res = {}
    for k, fn in (("jit_run_us", via_run), ("compiled_run_us", direct)):
        for _ in range(50):
            fn()
        ts = _interleaved({k: fn}, iters)[k]
        res[k] = round(statistics.median(ts) * 1e6, 2)
    return res


# ---------------------------------------------------------------------------------------------------------------
# the child: everything measured


def _check(value, limit) -> str:
    return "PASS" if value <= limit else "FAIL"


def measure(cfg: dict, log=print) -> dict:
    import torch
    import torch.nn as nn

    from bench.stub_driver import LaunchCounter, install

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    counter = LaunchCounter()
    install(counter)
    res: dict = dict(models=[], bn_relu=[], notes=[])
    with cuda_lookalike(), _one_rank_group() as no_dist:
        import kernels

        if kernels.INTERPRET:
            raise RuntimeError(
                "kernels was imported with TRITON_INTERPRET=1: bench.host must run in a fresh process "
                "(python -m bench.host starts one)"
            )
        res["triton_launch"] = _triton_launch_floor()
        log(f"  Triton launch host cost (us): {res['triton_launch']}")
        for name in cfg["models"]:
            c = CASES[name]
            for mode in cfg.get("modes", MODES):
                if mode == "sync" and no_dist:
                    res["notes"].append(f"{name} sync: skipped ({no_dist})")
                    continue
                models = {impl: _model(name, impl, mode) for impl in ("eager", "fused")}
                n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in models["eager"].modules())
                steps = {impl: _step_fn(m, name) for impl, m in models.items()}
                t0 = time.perf_counter()
                for _ in range(cfg["warmup"]):  # the first fused step compiles each kernel variant for sm_90
                    for fn in steps.values():
                        fn()
                warm_s = time.perf_counter() - t0
                rows = {}
                for impl, fn in steps.items():
                    counter.reset()
                    fn()
                    launches = counter.snapshot()
                    ac = AtenCounter()
                    with ac.active():
                        fn()
                    rows[impl] = dict(
                        model=name,
                        label=c["label"],
                        mode=mode,
                        impl=impl,
                        width=c["width"],
                        size=c["size"],
                        batch=c["batch"],
                        gpu_shape=c["gpu_shape"],
                        bn_count=n_bn,
                        triton_launches=sum(launches.values()),
                        launches_by_kernel=dict(launches),
                        aten_kernels=sum(ac.kernels.values()),
                        aten_allocs=ac.allocs,
                        host_syncs=sum(ac.syncs.values()),
                        syncs_by_op=dict(ac.syncs),
                        collectives=sum(ac.collectives.values()),
                        collectives_by_op=dict(ac.collectives),
                        aten_top=dict(ac.kernels.most_common(12)),
                    )
                if rows["fused"]["triton_launches"] == 0:
                    raise RuntimeError(
                        "the fused step made no Triton launch: the kernels no longer take the patched "
                        "tensors for CUDA tensors (bench.host patches torch.Tensor.is_cuda, not "
                        "x.device; the full list is in its docstring)"
                    )
                times = _interleaved(steps, cfg["iters"])
                for impl, ts in times.items():
                    r = rows[impl]
                    r.update(
                        host_ms=round(statistics.median(ts) * 1e3, 3),
                        host_ms_min=round(min(ts) * 1e3, 3),
                        host_ms_max=round(max(ts) * 1e3, 3),
                        iters=len(ts),
                    )
                for r in rows.values():  # everything a GPU would run: Triton launches + aten kernels
                    r["all_kernels"] = r["triton_launches"] + r["aten_kernels"]
                f, e = rows["fused"], rows["eager"]
                per_bn = f["triton_launches"] / n_bn
                limit = TARGETS["launches_per_bn"][mode]
                f.update(
                    host_ratio=round(f["host_ms"] / e["host_ms"], 3),
                    launches_per_bn=round(per_bn, 2),
                    launch_target=limit * n_bn,
                    check_host="-" if mode == "sync" else _check(f["host_ms"] / e["host_ms"], TARGETS["step_ratio"]),
                    check_launches=_check(f["triton_launches"], limit * n_bn),
                    check_sync_free="PASS" if f["host_syncs"] == 0 else "FAIL",
                    aten_ratio=round(f["aten_kernels"] / max(1, e["aten_kernels"]), 3),
                    all_kernels_ratio=round(f["all_kernels"] / max(1, e["all_kernels"]), 3),
                )
                res["models"] += [e, f]
                log(
                    f"  {name} {mode}: eager {e['host_ms']} ms, fused {f['host_ms']} ms ({f['host_ratio']}x, "
                    f"{f['check_host']}); launches {f['triton_launches']} ({per_bn:.2f}/BN, target <= {limit}: "
                    f"{f['check_launches']}); aten kernels eager {e['aten_kernels']} fused {f['aten_kernels']}; "
                    f"collectives {f['collectives']}; syncs {f['host_syncs']}; warm-up {warm_s:.1f} s"
                )
        for mode in BN_MODES:
            fns = dict(zip(("eager", "fused"), _bn_fns(mode)))
            for fn in fns.values():
                fn()
                fn()
            counter.reset()
            fns["fused"]()
            launches = counter.snapshot()
            counts = {}
            for impl, fn in fns.items():
                ac = AtenCounter()
                with ac.active():
                    fn()
                counts[impl] = ac
            times = _interleaved(fns, cfg["bn_iters"])
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            row = dict(
                shape=list(BN_SHAPE),
                layout="channels_last",
                dtype="float32",
                mode=mode,
                eager_us=round(us["eager"], 1),
                fused_us=round(us["fused"], 1),
                ratio=round(us["fused"] / us["eager"], 3),
                check=_check(us["fused"] / us["eager"], TARGETS["bn_ratio"]),
                triton_launches=sum(launches.values()),
                launches_by_kernel=dict(launches),
                aten_kernels_eager=sum(counts["eager"].kernels.values()),
                aten_kernels_fused=sum(counts["fused"].kernels.values()),
                aten_allocs_eager=counts["eager"].allocs,
                aten_allocs_fused=counts["fused"].allocs,
                iters=cfg["bn_iters"],
            )
            res["bn_relu"].append(row)
            log(
                f"  BN-ReLU fwd+bwd {mode}: eager {row['eager_us']} us, fused {row['fused_us']} us "
                f"({row['ratio']}x, {row['check']}); {row['triton_launches']} launches"
            )
        fns, why = _floor_fns()
        if fns is None:
            res["notes"].append(f"floor probe: skipped ({why})")
        else:
            for fn in fns.values():
                for _ in range(20):
                    fn()
            launched = {}
            for k in ("fused", "floor"):  # the floor must make the fused call's launches, no fewer
                counter.reset()
                fns[k]()
                launched[k] = dict(counter.snapshot())
            us = {k: statistics.median(v) * 1e6 for k, v in _interleaved(fns, cfg["bn_iters"]).items()}
            res["floor"] = dict(
                launches_fused=launched["fused"],
                launches_floor=launched["floor"],
                shape=list(FLOOR_SHAPE),
                what="BN-ReLU-conv3x3 forward + backward, batch statistics, channels_last fp32",
                **{f"{k}_us": round(v, 1) for k, v in us.items()},
                fused_ratio=round(us["fused"] / us["eager"], 3),
                floor_ratio=round(us["floor"] / us["eager"], 3),
                iters=cfg["bn_iters"],
            )
            f = res["floor"]
            log(
                f"  floor probe (BN-ReLU-conv): eager {f['eager_us']} us, fused {f['fused_us']} us "
                f"({f['fused_ratio']}x), floor {f['floor_us']} us ({f['floor_ratio']}x)"
            )
    return res


# ---------------------------------------------------------------------------------------------------------------
# reporting


def checks(res: dict) -> list[dict]:
    """Every target with its measured value and PASS/FAIL."""
    out = []
    for r in res.get("models", []):
        if r["impl"] != "fused":
            continue
        if r["check_host"] != "-":
            out.append(
                dict(
                    target=f"{r['model']} {r['mode']}: host time fused / eager <= {TARGETS['step_ratio']}",
                    value=r["host_ratio"],
                    result=r["check_host"],
                )
            )
        out.append(
            dict(
                target=f"{r['model']} {r['mode']}: Triton launches per step <= {r['launch_target']} "
                f"({TARGETS['launches_per_bn'][r['mode']]} per BN x {r['bn_count']}"
                f"{', plus collectives' if r['mode'] == 'sync' else ''})",
                value=r["triton_launches"],
                result=r["check_launches"],
            )
        )
        out.append(
            dict(
                target=f"{r['model']} {r['mode']}: no host sync in a fused step",
                value=r["host_syncs"],
                result=r["check_sync_free"],
            )
        )
    for r in res.get("bn_relu", []):
        out.append(
            dict(
                target=f"BN-ReLU fwd+bwd {r['mode']}: fused / eager <= {TARGETS['bn_ratio']}",
                value=r["ratio"],
                result=r["check"],
            )
        )
    return out


def markdown(res: dict, rel: str) -> str:
    env = res["environment"]
    lines = [
        f"Latest: `{rel}` ({env.get('cpu_model')}, {env.get('cpu_count')} cores, torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['commit'][:10]}{' + local changes' if env.get('dirty') else ''}; "
        f"CPU thread time, median of {res['config']['iters']} steps / {res['config']['bn_iters']} BN calls).",
        "",
        "| model | BN mode | impl | host ms/step | x eager | Triton launches | per BN | aten kernels | "
        "all kernels (x eager) | allocs | collectives | host syncs | host <= 1.3x | launches | sync-free |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        fused = r["impl"] == "fused"
        impl = "eager (plain BN)" if r["mode"] == "sync" and not fused else r["impl"]
        lines.append(
            f"| {r['model']} | {r['mode']} | {impl} | {r['host_ms']} | {r.get('host_ratio', 1.0) if fused else '1.00'}"
            f" | {r['triton_launches']} | {r.get('launches_per_bn', '-') if fused else '-'} | {r['aten_kernels']} | "
            f"{r['all_kernels']}{(' (' + str(r['all_kernels_ratio']) + ')') if fused else ''} | {r['aten_allocs']} | "
            f"{r['collectives']} | {r['host_syncs']} | {r['check_host'] if fused else ''} | "
            f"{(r['check_launches'] + ' (<= ' + str(r['launch_target']) + ')') if fused else ''} | "
            f"{r['check_sync_free'] if fused else ''} |"
        )
    lines += [
        "",
        f"BN-ReLU forward + backward, {'x'.join(map(str, BN_SHAPE))} channels_last fp32:",
        "",
        "| BN mode | eager us | fused us | x eager | <= 1.2x | Triton launches | aten kernels eager / fused | "
        "allocs eager / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["bn_relu"]:
        lines.append(
            f"| {r['mode']} | {r['eager_us']} | {r['fused_us']} | {r['ratio']} | {r['check']} | "
            f"{r['triton_launches']} | {r['aten_kernels_eager']} / {r['aten_kernels_fused']} | "
            f"{r['aten_allocs_eager']} / {r['aten_allocs_fused']} |"
        )
    fl = res.get("floor")
    if fl:
        lines += [
            "",
            f"Floor probe, {fl['what']} ({'x'.join(map(str, fl['shape']))}): eager {fl['eager_us']} us, fused "
            f"{fl['fused_us']} us ({fl['fused_ratio']}x), floor {fl['floor_us']} us ({fl['floor_ratio']}x): a "
            "hand-written Function with the fused call's allocations, launches and convolutions and nothing else.",
        ]
    tl = res.get("triton_launch", {})
    if tl:
        lines += [
            "",
            f"One launch of a 12-argument kernel on the stand-in driver: `kernel[grid](...)` through "
            f"`JITFunction.run` {tl['jit_run_us']} us, the cached `CompiledKernel.run` called directly "
            f"{tl['compiled_run_us']} us.",
        ]
    return "\n".join(lines)


def text_table(res: dict) -> str:
    """The markdown tables without their separator rows (for the terminal)."""
    return "\n".join(ln for ln in markdown(res, "this run").splitlines() if not ln.startswith("|---"))


def update_readme(block: str, path: Path = README) -> None:
    begin, end = "<!-- bench:host:begin -->", "<!-- bench:host:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no {begin} ... {end} block to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(head + begin + "\n" + block + "\n" + end + tail)
    tmp.replace(path)


def _cpu_slug() -> str:
    from bench._env import cpu_model

    import re

    words = [w for w in re.split(r"[^a-z0-9]+", cpu_model().lower()) if w and w not in ("r", "tm", "cpu", "processor")]
    return "cpu-" + "-".join(words[:2]) if words else "cpu"


def run_child(args) -> int:
    from bench._env import environment
    from bench.stub_driver import SUPPORTED, unsupported

    cfg = dict(CONFIGS["smoke" if args.smoke else "default"])
    if args.models:
        cfg["models"] = args.models.split(",")
    if args.iters:
        cfg["iters"] = args.iters
    if args.modes:
        cfg["modes"] = args.modes.split(",")
    if args.width:
        for name in cfg["models"]:
            CASES[name] = dict(CASES[name], width=args.width)
    stem = f"host-{_cpu_slug()}-{_dt.date.today().isoformat()}{'-smoke' if args.smoke else ''}"
    out = args.out or RESULTS / f"{stem}.json"
    res: dict = dict(
        kind="bench.host",
        config=dict(cfg, cases={k: CASES[k] for k in cfg["models"]}, bn_shape=list(BN_SHAPE), bn_modes=list(BN_MODES)),
        targets=TARGETS,
        supported_triton=list(SUPPORTED),
        environment=environment(),
    )
    why = unsupported()
    if why:
        print(f"bench.host: skipped: {why}")
        res["skipped"] = why
    else:
        t0 = time.perf_counter()
        print(
            f"bench.host: triton {res['environment']['triton']}, torch {res['environment']['torch']}, "
            f"stand-in sm_90 driver; models {', '.join(cfg['models'])}",
            flush=True,
        )
        try:
            res.update(measure(cfg, log=lambda s: print(s, flush=True)))
        except RuntimeError as e:  # a launcher the stand-ins no longer fit: one line (traceback with --debug)
            if args.debug:
                raise
            print(f"bench.host: error: {e}", file=sys.stderr)
            return 1
        res["checks"] = checks(res)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        print()
        print(text_table(res))
        fails = [c for c in res["checks"] if c["result"] == "FAIL"]
        print(f"\ntargets: {len(res['checks']) - len(fails)} pass, {len(fails)} fail")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    if args.update_readme and not why:
        rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
        update_readme(markdown(res, str(rel)))
        print(f"updated {README}")
    if args.strict and not why and any(c["result"] == "FAIL" for c in res["checks"]):
        return 1
    return 0


def _width(text: str) -> float:
    """--width: a positive number or fraction such as 1/16."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a positive number or fraction such as 1/16, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a width in (0, 1], got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.host",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--smoke", action="store_true", help="A1-s8 only, 3 steps: a CI check that the path runs")
    ap.add_argument("--models", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--modes", help=f"comma list of step modes, of {', '.join(MODES)} (default: all)")
    ap.add_argument("--iters", type=int, help="timed steps per implementation and mode (median reported)")
    ap.add_argument(
        "--width", type=_width, help="channel multiplier of both models (default 1/64; e.g. 0.03125 or 1/32)"
    )
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/host-<cpu>-<date>.json)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the host block of bench/README.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)
    if args.models:
        bad = [m for m in args.models.split(",") if m not in CASES]
        if bad:
            ap.error(f"--models: unknown {', '.join(bad)}; expected a comma list of {', '.join(CASES)}")
    if args.modes:
        bad = [m for m in args.modes.split(",") if m not in MODES]
        if bad:
            ap.error(f"--modes: unknown {', '.join(bad)}; expected a comma list of {', '.join(MODES)}")
    if args.iters is not None and args.iters < 1:
        ap.error("--iters must be at least 1")
    if os.environ.get(CHILD_ENV) == "1":
        return run_child(args)
    # a fresh interpreter with the compiled-Triton setting fixed before `kernels` is imported
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        OMP_NUM_THREADS="1",
        **{CHILD_ENV: "1"},
        PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    )
    return subprocess.run(
        [sys.executable, "-m", "bench.host", *(argv if argv is not None else sys.argv[1:])], cwd=ROOT, env=env
    ).returncode


if __name__ == "__main__":
    raise SystemExit(main())
