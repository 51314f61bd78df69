"""Kernel-level measurements: the device's measured ceilings, BN-ReLU bandwidth, and per-shape conv passes.

Ceilings (measured, not datasheet): copy bandwidth = 2 * bytes / time of ``torch.empty_like(x).copy_(x)``;
matmul peak = 2 n^3 / time of a large ``torch.matmul`` (bf16 on CUDA; on CPU fp32 and a small bf16 one).

BN-ReLU (training mode, batch statistics): achieved bandwidth = ideal bytes / time, the same ideal bytes for
every implementation: forward 3|x| (statistics read, normalise read + write), backward 5|x| (sums read x and dy,
dx pass reads x and dy and writes dx). The backward is timed alone (CUDA events around ``y.backward(dy)``, a
fresh untimed forward before each repetition): no (forward + backward) - forward difference, whose noise could
give near-zero times and absurd bandwidths.

Convolutions: each distinct conv shape of A1 (224) and A1-s8 (504), fprop / dgrad / wgrad timed separately,
TFLOP/s = 2 N P Q K C R S / time:
  ours     kernels.conv implicit GEMMs with the BN-ReLU prologue (fprop, wgrad) and ReLU-mask + BN-sums
           epilogue (dgrad): relu(bn(x)) is never written;
  cudnn    torch conv / aten.convolution_backward on a materialised relu(bn(x)) (materialising not timed);
  compile  torch.compile of the same math as ours in torch ops (normalise + ReLU, conv, mask, sums).
On CPU only a smoke runs (tiny shapes; ours in the Triton interpreter): no timing is reported there.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CUDA = torch.cuda.is_available()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, reps: int = 20, grad_to_none=None) -> float:
    """Median ms: triton.testing.do_bench on CUDA (CUDA events, L2 cleared), else wall clock after a warm-up."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def time_backward_ms(forward, dy, reps: int = 20, grad_to_none=()) -> float:
    """Median ms of ``forward().backward(dy)``'s backward alone: each repetition runs a fresh forward (not timed),
    synchronises, then times the backward (CUDA events on CUDA, wall clock on CPU); one warm-up repetition."""

    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        y = forward()
        _sync()
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.backward(dy)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        y.backward(dy)
        return (time.perf_counter() - t) * 1e3

    once()
    return statistics.median(once() for _ in range(reps))


# ------------------------------------------------------------------------------------------------ ceilings
def copy_bandwidth(nbytes: int) -> dict:
    dev = "cuda" if CUDA else "cpu"
    x = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    ms = time_ms(lambda: torch.empty_like(x).copy_(x), reps=10)
    return dict(
        op="torch.empty_like(x).copy_(x)",
        bytes=2 * x.numel() * 4,
        ms=round(ms, 4),
        GBps=round(2 * x.numel() * 4 / ms / 1e6, 1),
    )


def matmul_peak(n: int, dtype: torch.dtype) -> dict:
    dev = "cuda" if CUDA else "cpu"
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    ms = time_ms(lambda: torch.matmul(a, b), reps=5)
    return dict(
        op="torch.matmul",
        n=n,
        dtype=str(dtype).replace("torch.", ""),
        ms=round(ms, 4),
        TFLOPs=round(2 * n**3 / ms / 1e9, 3),
    )


def ceilings(quick: bool) -> dict:
    if CUDA:
        return dict(copy=copy_bandwidth(2**30), matmul_bf16=matmul_peak(8192, torch.bfloat16))
    out = dict(
        copy=copy_bandwidth(2**26 if quick else 2**28), matmul_fp32=matmul_peak(512 if quick else 2048, torch.float32)
    )
    out["matmul_bf16"] = matmul_peak(256 if quick else 1024, torch.bfloat16)
    return out


# ------------------------------------------------------------------------------------------------ BN-ReLU
BN_SHAPES_GPU = [(64, 128, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (4, 1024, 63, 63)]
BN_SHAPES_CPU = [(2, 16, 8, 8)]


def bn_relu_bandwidth(section, copy_GBps: float | None, smoke: bool, log=print) -> list[dict]:
    import kernels

    rows = []
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = BN_SHAPES_GPU if (CUDA and not smoke) else BN_SHAPES_CPU
    for shape in shapes:
        if not section.has(5 if (CUDA and not smoke) else 1):
            section.skip(f"bn_relu {shape}")
            continue
        bn = nn.BatchNorm2d(shape[1]).to(dev).train()
        x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        impls = {"ours": lambda: kernels.bn_relu(x, bn, backend="triton"), "eager": lambda: F.relu(bn(x))}
        if CUDA:
            impls["compile"] = torch.compile(lambda: F.relu(bn(x)))
        nbytes = x.numel() * x.element_size()
        row = dict(
            shape=list(shape),
            dtype=str(dtype).replace("torch.", ""),
            layout="channels_last",
            fwd_bytes=3 * nbytes,
            bwd_bytes=5 * nbytes,
            timed=CUDA and not smoke,
        )
        dy = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
        smoke_out = {}
        for name, f in impls.items():
            try:
                y = f()
                y.backward(dy)
                if not row["timed"]:  # smoke: finite, and ours equal to eager (y, dx, dgamma, dbeta)
                    smoke_out[name] = [t.detach().float().clone() for t in (y, x.grad, bn.weight.grad, bn.bias.grad)]
                    row[f"{name}_ok"] = all(bool(torch.isfinite(t).all()) for t in smoke_out[name])
                    x.grad = bn.weight.grad = bn.bias.grad = None
                    continue
                fwd = time_ms(f)
                bwd = time_backward_ms(f, dy, grad_to_none=[x, bn.weight, bn.bias])
                if not bwd > 0:
                    row[f"{name}_bwd_error"] = f"backward time {bwd} ms: not a measurement"
                    continue
                row.update(
                    {
                        f"{name}_fwd_ms": round(fwd, 4),
                        f"{name}_bwd_ms": round(bwd, 4),
                        f"{name}_fwd_GBps": round(3 * nbytes / fwd / 1e6, 1),
                        f"{name}_bwd_GBps": round(5 * nbytes / bwd / 1e6, 1),
                    }
                )
                if copy_GBps:
                    row[f"{name}_fwd_pct_copy"] = round(100 * 3 * nbytes / fwd / 1e6 / copy_GBps, 1)
                    row[f"{name}_bwd_pct_copy"] = round(100 * 5 * nbytes / bwd / 1e6 / copy_GBps, 1)
            except Exception as e:  # noqa: BLE001 - a failing implementation is a result
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        if "ours" in smoke_out and "eager" in smoke_out:
            row["ours_ok"] = row["ours_ok"] and all(
                torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1e-3))
                for a, b in zip(smoke_out["ours"], smoke_out["eager"])
            )
        rows.append(row)
        log(
            f"  bn_relu {shape}: "
            + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith(("GBps", "ok", "error")))
        )
    return rows


# ------------------------------------------------------------------------------------------------ BN passes apart
BN_PARTS_SHAPES_GPU = [(64, 128, 112, 112), (64, 256, 56, 56), (4, 1024, 63, 63), (4, 2048, 63, 63)]
BN_PARTS_SHAPES_CPU = [(2, 16, 8, 8)]


def bn_parts(section, copy_GBps: float | None, smoke: bool, log=print) -> list[dict]:
    """The three passes of a fused BN-ReLU training step timed apart, through the public kernel functions only:

        stats     ``kernels.channel_stats(x)``: per-channel mean/var (statistics pass and its finalize), ideal |x|
        apply     ``kernels.bn_relu_forward(x, p)`` with known statistics: read x, write y, ideal 2|x|
        backward  ``kernels.bn_relu_backward(x, dy, p)``: gradient sums (reads x, dy) then dx (reads x, dy,
                  writes dx), ideal 5|x|

    ``p = kernels.bn_params(x, bn)`` once, outside the timing. GB/s = ideal bytes / median time and % of the
    measured copy bandwidth. CPU (smoke): tiny shapes in the Triton interpreter, each pass checked against a
    torch reference (``*_ok``), nothing timed.
    """
    import kernels

    rows = []
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    timed = CUDA and not smoke
    for shape in BN_PARTS_SHAPES_GPU if timed else BN_PARTS_SHAPES_CPU:
        if not section.has(4 if timed else 1):
            section.skip(f"bn_parts {shape}")
            continue
        bn = nn.BatchNorm2d(shape[1]).to(dev).train()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        x = (torch.randn(shape, device=dev) + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        row = dict(
            shape=list(shape),
            dtype=str(dtype).replace("torch.", ""),
            layout="channels_last",
            timed=timed,
            stats_bytes=nbytes,
            apply_bytes=2 * nbytes,
            backward_bytes=5 * nbytes,
        )
        try:
            p = kernels.bn_params(x, bn, backend="triton")
            passes = {
                "stats": (lambda: kernels.channel_stats(x, backend="triton"), nbytes),
                "apply": (lambda: kernels.bn_relu_forward(x, p, backend="triton"), 2 * nbytes),
                "backward": (lambda: kernels.bn_relu_backward(x, dy, p, backend="triton"), 5 * nbytes),
            }
            if not timed:
                row.update(_bn_parts_check(x, dy, p, passes, bn.eps))
            for name, (f, ideal) in passes.items():
                if not timed:
                    continue
                ms = time_ms(f)
                row[f"{name}_ms"] = round(ms, 4)
                row[f"{name}_GBps"] = round(ideal / ms / 1e6, 1)
                if copy_GBps:
                    row[f"{name}_pct_copy"] = round(100 * ideal / ms / 1e6 / copy_GBps, 1)
        except Exception as e:  # noqa: BLE001 - a failing pass is a result
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(
            f"  bn_parts {shape}: "
            + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith(("GBps", "pct_copy", "_ok", "error")))
        )
    return rows


def _bn_parts_check(x, dy, p, passes, eps: float) -> dict:
    """Each pass against plain torch on the same (fp32 CPU) tensors: values and gradients."""
    xf = x.float()
    mean, var, _ = passes["stats"][0]()
    ref_var, ref_mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
    out = dict(stats_ok=bool(torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(var, ref_var, atol=1e-5)))
    shape = (1, -1, 1, 1)
    xr = xf.clone().requires_grad_()
    w = p.gamma.detach().clone().requires_grad_()
    b = p.beta.detach().clone().requires_grad_()
    yr = torch.relu(F.batch_norm(xr, None, None, w, b, training=True, eps=eps))
    y = passes["apply"][0]()
    ref_apply = torch.relu((xf - p.mean.view(shape)) * p.scale.view(shape) + p.bias.view(shape))
    out["apply_ok"] = bool(torch.allclose(y.float(), ref_apply, atol=1e-4))
    dx, dgamma, dbeta = passes["backward"][0]()
    yr.backward(dy.float())
    out["backward_ok"] = bool(
        torch.allclose(dx.float(), xr.grad, atol=1e-4)
        and torch.allclose(dgamma, w.grad, atol=1e-4)
        and torch.allclose(dbeta, b.grad, atol=1e-4)
    )
    return out


# ------------------------------------------------------------------------------------------------ conv passes
SMOKE_CONV_SHAPES = [
    dict(C=16, K=16, k=3, stride=1, dil=1, pad=1, H=6, W=6, N=1, model="smoke"),
    dict(C=16, K=32, k=1, stride=2, dil=1, pad=0, H=6, W=6, N=1, model="smoke"),
    dict(C=16, K=16, k=3, stride=1, dil=2, pad=2, H=6, W=6, N=1, model="smoke"),
]


def _out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def conv_passes(s: dict, timed: bool, compile_: bool) -> dict:
    """fprop/dgrad/wgrad of one shape for ours / cudnn / compile; TFLOP/s when timed."""
    from kernels import conv as kconv

    dev = "cuda" if CUDA else "cpu"
    dt = torch.bfloat16 if CUDA else torch.float32
    N, C, K, k, st, pad, dil, H, W = (s[n] for n in ("N", "C", "K", "k", "stride", "pad", "dil", "H", "W"))
    P, Q = _out(H, k, st, pad, dil), _out(W, k, st, pad, dil)
    cl = torch.channels_last
    x = torch.randn(N, C, H, W, device=dev).to(dt).contiguous(memory_format=cl)
    w = (torch.randn(K, C, k, k, device=dev) / (C * k * k) ** 0.5).to(dt).contiguous(memory_format=cl)
    dy = torch.randn(N, K, P, Q, device=dev).to(dt).contiguous(memory_format=cl)
    mean = torch.randn(C, device=dev) * 0.1
    scale = torch.rand(C, device=dev) + 0.5
    beta = torch.randn(C, device=dev) * 0.1
    vec = (mean, scale, beta)
    aff = lambda: (x.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)  # noqa
    a = torch.relu(aff()).to(dt).contiguous(memory_format=cl)
    geo = ([st, st], [pad, pad], [dil, dil], False, [0, 0], 1)
    flops = 2 * N * P * Q * K * C * k * k

    def cb(dy_, a_, w_, mask):
        return torch.ops.aten.convolution_backward(dy_, a_, w_, None, *geo, mask)

    def c_fprop(x_, w_):
        z = (x_.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return F.conv2d(torch.relu(z).to(dt), w_, None, st, pad, dil)

    def c_dgrad(dy_, w_, x_):
        z = (x_.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        g = cb(dy_, x_, w_, [True, False, False])[0].float() * (z > 0)
        return g, g.sum((0, 2, 3)), (g * (x_.float() - mean.view(1, -1, 1, 1))).sum((0, 2, 3))

    def c_wgrad(dy_, x_, w_):
        z = (x_.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return cb(dy_, torch.relu(z).to(dt), w_, [False, True, False])[1]

    impls = {
        "ours": dict(
            fprop=lambda: kconv.conv_fprop(x, w, st, pad, dil, vec),
            dgrad=lambda: kconv.conv_dgrad(dy, w, x, st, pad, dil, vec),
            wgrad=lambda: kconv.conv_wgrad(dy, x, w.shape, st, pad, dil, vec, dtype=dt),
        ),
        "cudnn": dict(
            fprop=lambda: F.conv2d(a, w, None, st, pad, dil),
            dgrad=lambda: cb(dy, a, w, [True, False, False])[0],
            wgrad=lambda: cb(dy, a, w, [False, True, False])[1],
        ),
    }
    if compile_:
        cf, cd, cw = (torch.compile(f, dynamic=False) for f in (c_fprop, c_dgrad, c_wgrad))
        impls["compile"] = dict(fprop=lambda: cf(x, w), dgrad=lambda: cd(dy, w, x), wgrad=lambda: cw(dy, x, w))
    row = dict(
        s,
        P=P,
        Q=Q,
        dtype=str(dt).replace("torch.", ""),
        layout="channels_last",
        gflop_per_pass=round(flops / 1e9, 3),
        timed=timed,
    )
    ref = (
        dict(fprop=c_fprop(x, w).float(), dgrad=c_dgrad(dy, w, x)[0].float(), wgrad=c_wgrad(dy, x, w).float())
        if not timed
        else {}
    )
    for name, passes in impls.items():
        for pname, f in passes.items():
            try:
                out = f()
                if not timed:
                    o = out[0] if isinstance(out, tuple) else out
                    ok = bool(torch.isfinite(o.float()).all())
                    if pname in ref and (pname != "dgrad" or name == "ours"):  # cudnn's dgrad is before the mask
                        ok = ok and torch.allclose(o.float(), ref[pname], rtol=1e-3, atol=1e-3)
                    row[f"{name}_{pname}_ok"] = ok
                    continue
                ms = time_ms(f)
                row[f"{name}_{pname}_ms"] = round(ms, 4)
                row[f"{name}_{pname}_TFLOPs"] = round(flops / ms / 1e9, 2)
            except Exception as e:  # noqa: BLE001
                row[f"{name}_{pname}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def distinct_conv_shapes(width: float, a1_size: int, a1_batch: int, s8_size: int, s8_batch: int) -> list[dict]:
    from bench.conv_shapes import conv_shapes

    shapes = []
    for model, (label, size, batch) in {
        "A1": ("ilsvrc-cls_rna-a1_cls1000", a1_size, a1_batch),
        "A1-s8": ("voc_rna-a1_cls21_s8", s8_size, s8_batch),
    }.items():
        for s in conv_shapes(label, size, batch, width=width):
            s = dict(s, model=model)
            P = _out(s["H"], s["k"], s["stride"], s["pad"], s["dil"])
            Q = _out(s["W"], s["k"], s["stride"], s["pad"], s["dil"])
            s["gflop"] = 2 * s["N"] * P * Q * s["K"] * s["C"] * s["k"] ** 2 / 1e9
            shapes.append(s)
    return shapes


def conv_section(section, cfg: dict, peak_TFLOPs: float | None, log=print) -> dict:
    smoke = not CUDA or cfg.get("smoke")
    if smoke:
        shapes, timed, compile_ = SMOKE_CONV_SHAPES, False, False
        note = "smoke: tiny shapes, ours in the Triton interpreter, checked against torch; nothing timed"
    else:
        shapes = distinct_conv_shapes(1.0, 224, cfg["conv_a1_batch"], 504, cfg["conv_s8_batch"])
        shapes.sort(key=lambda s: -s["gflop"])  # the largest layers first: they matter most if the budget cuts
        timed, compile_, note = True, True, "timed with triton.testing.do_bench (median, L2 cleared)"
    rows = []
    n_compile = cfg.get("conv_compile_shapes", 4)  # torch.compile costs seconds per pass and shape: largest few only
    if timed:
        note += f"; torch.compile on the {n_compile} largest shapes only (its compile time would crowd out the rest)"
    for i, s in enumerate(shapes):
        if not section.has(8 if timed else 2):
            section.skip(
                f"conv {s['model']} C{s['C']} K{s['K']} k{s['k']} s{s['stride']} d{s['dil']} {s['H']}x{s['W']}"
            )
            continue
        row = conv_passes(s, timed, compile_ and i < n_compile)
        if timed and peak_TFLOPs:
            for key in [k for k in row if k.endswith("_TFLOPs")]:
                row[key.replace("_TFLOPs", "_pct_peak")] = round(100 * row[key] / peak_TFLOPs, 1)
        rows.append(row)
        shown = {k: v for k, v in row.items() if k.endswith(("TFLOPs", "_ok", "error"))}
        log(f"  conv {s['model']} C{s['C']} K{s['K']} k{s['k']} s{s['stride']} d{s['dil']} {s['H']}x{s['W']}: {shown}")
    return dict(note=note, shapes_total=len(shapes), rows=rows)
