"""Implicit-GEMM convolution whose operand loader applies BatchNorm + activation: act(bn(x)) never exists in memory.

Layouts: x (N, H, W, C) channels_last storage of an (N, C, H, W) tensor (an NCHW input is copied to it once per
call); weight (K, C, R, S) OIHW as in nn.Conv2d, repacked to (R, S, C, K) / (R, S, K, C) for the kernels
(:func:`pack_weight`; a caller may pass the packed tensor to skip the per-call repack); outputs channels_last.
Square kernels, stride, dilation and zero padding (any value), groups = 1. fp16/bf16/fp32 operands, fp32 accumulation.

    fprop  y[n,p,q,k]   = sum_{r,s,c} a[n, p*st-pad+r*d, q*st-pad+s*d, c] * W[k,c,r,s],   a = act(bn(x)) on load
    dgrad  g[n,h,w,c]   = act'(z) * sum_{r,s,k} dy[n, (h+pad-r*d)/st, (w+pad-s*d)/st, k] * W[k,c,r,s]
           (epilogue: per-channel sum(g) and sum(g*(x-mean)) for the BN backward)
    wgrad  dW[k,c,r,s]  = sum_{n,p,q} dy[n,p,q,k] * a[n, p*st-pad+r*d, q*st-pad+s*d, c]   (a recomputed on load)

The activation (``ACT`` constexpr: 0 relu, 1 leaky_relu, 2 identity, :data:`kernels.bn_relu.ACTIVATIONS`) and the
leaky slope (runtime fp32) are those of :mod:`kernels.bn_relu`, with the same helpers, so every recomputation
gives the same z and the same mask as the elementwise kernels. Zero padding pads the *activation* with zeros.

GPU fitness:
- fp32 operands use ``tl.dot(..., input_precision="ieee")`` (exact fp32 FMA, as torch's default conv) unless TF32
  is asked for (``set_fp32_precision("tf32")`` or ``precision="tf32"``); bf16/fp16 run on tensor cores.
- Offsets are int32 unless a tensor has 2**31 elements or more; then the launcher picks the ``INT64`` variant.
- On a GPU the tile is autotuned over :func:`autotune_configs` (keyed on the shape): :data:`GPU_CONFIGS`, plus
  :data:`HOPPER_CONFIGS` (128-row tiles, 8 warps) for 16-bit operands on sm_90; under the interpreter one fixed
  config (:data:`INTERPRETER_CONFIG`, or the one given by ``config=`` / :func:`use_config`) runs, or the GPU's
  autotuner itself inside :func:`autotune_in_interpreter` (tests).
- sm_90 fprop may read the weight operand through a TMA tensor descriptor (``ConvConfig.w_desc``, in the sm_90
  autotune space where :func:`tma_ok`): one ``cp.async.bulk.tensor`` per K step (kernels/aot.py checks the PTX);
  for 1x1 stride-1 unpadded convs the activation too (``X_DENSE``).
- One flat K loop per kernel: fprop and dgrad iterate over (filter tap, channel block) with the tap advanced as
  loop-carried scalars, so Triton software-pipelines a single loop that never drains at a tap boundary (sm_90 PTX:
  one loop holds the wgmmas, one ``cp.async.wait_group`` per iteration; kernels/aot.py checks it).
- dgrad runs by phases (grid axis 1 = stride**2 input phases (h % stride, w % stride)): a phase meets only the
  taps r with (phase + pad - r*dil) % stride == 0, so a stride-2 3x3 dgrad does 9 tap-GEMMs of a quarter of the
  rows in all instead of 9 masked full ones (75% of them zeros); stride 1 is one phase.
- The split-M weight gradient and the dgrad epilogue sums use fp32 atomics, coalesced along C; ``deterministic=True``
  (or :func:`set_deterministic`) writes per-split partials instead and sums them in a fixed order.
- Every variant the launchers can choose is listed by :func:`aot_variants` and compiled for sm_80/sm_90 in CI
  (tests/test_aot_compile.py, kernels/aot.py).

Reference: torch.nn.functional.conv2d / torch.nn.grad.conv2d_{input,weight} on act(bn(x)) (see tests).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from . import _runtime  # first: sets TRITON_INTERPRET before triton.jit runs
from ._runtime import HAS_TRITON
from ._common import ACTIVATIONS, activation_code


@dataclass(frozen=True)
class ConvConfig:
    """One tile configuration: BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step, GROUP_M grouped order."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    w_desc: bool = False  # fprop only: the weight operand through a tensor descriptor (TMA on sm_90)

    def meta(self) -> dict:
        m = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)
        if self.w_desc:  # only then: the dgrad/wgrad kernels have no W_DESC (fprop's defaults to False)
            m["W_DESC"] = True
        return m

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}" + (
            " tma" if self.w_desc else ""
        )


# Autotuned on a GPU, per operand class (tl.dot needs every block dim >= 16 with Triton 3.6; wgmma wants BLOCK_M a
# multiple of 64 per 4 warps; fp32 "ieee" runs on FMA units, small tiles keep its registers in check). Chosen so
# that no variant spills on sm_80/sm_90 with Triton 3.6's or 3.9's ptxas (bench/results/aot-compile-conv.md);
# 128x64x32, 128x128x32 and 64x64x64 spill there. The first config of a class is the fixed one (INT64 and
# deterministic variants).
# dgrad and wgrad use BACKWARD_16BIT instead of the "16bit" list (:func:`gpu_configs`).
GPU_CONFIGS = {
    "16bit": (ConvConfig(64, 64, 32, 8, 4, 3), ConvConfig(64, 128, 32, 8, 8, 2)),
    "tf32": (ConvConfig(64, 64, 16, 8, 4, 3), ConvConfig(128, 64, 16, 8, 8, 3)),
    "ieee": (ConvConfig(32, 64, 16, 8, 4, 1), ConvConfig(64, 32, 16, 8, 4, 1)),
}
# sm_90 only, 16-bit operands, beside GPU_CONFIGS (:func:`autotune_configs`): the Hopper matmul shapes (Triton's
# persistent matmul tutorial tunes 128x{128,256}x{64,128}, 8 warps): two warpgroups share the tile, each wgmma is
# m64nNk16 with N up to 256, and 3-4 stages of A+B tiles take 96-150 KB of the 227 KB of shared memory. Per kernel,
# because their register needs differ (Triton 3.9 ptxas, sm_90, BN on; bench/results/aot-compile.md):
# fprop 128x128x64 s3/s4 174/170 registers, 128x256x64 246; wgrad 128x128x64 142, 128x256x64 spills (255 + 88 B)
# where 256x128x64 (the prologue on a 64x128 operand, not 64x256) takes 228; dgrad's epilogue (act' and the two BN
# sums on the tile) spills at 128x128x64 (255 + 48 B) and fits at 128x64x64 (180).
# fprop also with the weight operand through a TMA tensor descriptor (``w_desc``, " tma" in labels): the weight
# tile is one cp.async.bulk.tensor copy per K step into shared memory, waited on by an mbarrier, instead of
# BLOCK_K*BLOCK_N/256 cp.async per thread with their address and mask arithmetic (Triton 3.6/3.9 sm_90 BN bf16:
# 158/168 registers at 128x128x64 s3). Both Triton versions lower tl.make_tensor_descriptor to TMA on sm_90
# (block pointers are rewritten to plain loads since Triton 3.x, so they would not be TMA). Chosen only where the
# descriptor is legal (:func:`tma_ok`: K * itemsize a multiple of 16 bytes, 16-byte aligned base). A 1x1, stride-1,
# unpadded conv whose x rows are 16-byte multiples (``X_DENSE``) also reads the activation through a descriptor
# (x is then the GEMM's dense A): both operands by TMA, the BN prologue applied to the copied tile.
HOPPER_CONFIGS = {
    "fprop": (
        ConvConfig(128, 128, 64, 8, 8, 3),
        ConvConfig(128, 128, 64, 8, 8, 4),
        ConvConfig(128, 256, 64, 8, 8, 3),
        ConvConfig(128, 128, 64, 8, 8, 3, w_desc=True),
        ConvConfig(128, 256, 64, 8, 8, 3, w_desc=True),
    ),
    "dgrad": (ConvConfig(128, 64, 64, 8, 8, 4),),
    "wgrad": (ConvConfig(128, 128, 64, 8, 8, 3), ConvConfig(256, 128, 64, 8, 8, 3)),
}
# dgrad/wgrad 16-bit: 64x64x32 with 8 warps, not 4. At 4 warps Triton 3.6's sm_80 code spilled (wgrad with an
# fp32 x under autocast, BN prologue: 128 registers + 8 B; dgrad fp16 BN leaky_relu epilogue: 168 + 24 B): one
# thread held a 32x32 share of the accumulator plus the prologue's fp32 operand tile or the epilogue's BN sums;
# 8 warps halve that share (3.6 sm_80: 74 / 103 registers; sm_90 still wgmma, two warpgroups on m64n32). fprop
# keeps 4 warps: at 8 warps Triton 3.6's ptxas spilled 8 B at 64 registers in its fp32-x BN variants (leaky_relu
# at 3 stages, identity at 4), where 4 warps fit. 64x64x16 at 4 warps, 4 stages was tried for all three: 6
# spills under 3.6 (fprop fp32-x i64/identity, dgrad fp32-x i64), so not taken.
BACKWARD_16BIT = (ConvConfig(64, 64, 32, 8, 8, 3), ConvConfig(64, 128, 32, 8, 8, 2))
INTERPRETER_CONFIG = ConvConfig(16, 16, 16, 1, 1, 1)
INT32_LIMIT = 2**31  # a tensor with this many elements or more needs 64-bit offsets

_forced_config: ConvConfig | None = None
_fp32_precision = "ieee"
_deterministic = False


@contextlib.contextmanager
def use_config(config: ConvConfig | None):
    """Run every conv launch inside the block with ``config`` (no autotuning): e.g. the GPU tiles in the interpreter."""
    global _forced_config
    old, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = old


def set_fp32_precision(precision: str) -> None:
    """``"ieee"`` (default: exact fp32 products) or ``"tf32"`` (tensor cores, ~1e-3 relative error) for fp32 convs."""
    global _fp32_precision
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32 precision must be 'ieee' or 'tf32', got {precision!r}")
    _fp32_precision = precision


def set_deterministic(flag: bool) -> None:
    """Reductions without atomics (bitwise reproducible dW and BN sums) process-wide."""
    global _deterministic
    _deterministic = bool(flag)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _act_bwd, _act_fwd

    @triton.jit
    def _idx(v, INT64: tl.constexpr):
        """Row indices in the offset width: int64 when a tensor has 2**31 elements or more."""
        if INT64:
            v = v.to(tl.int64)
        return v

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) in grouped order: GROUP_M row tiles share their column tiles while they are in L2."""
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    @triton.jit
    def _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, slope, ACT: tl.constexpr):
        """act((a - mean) * scale + beta) per channel in fp32; positions outside the image (padding) stay 0.

        One return of one type (fp32): a GPU compile rejects returns of different types in one function."""
        af = a.to(tl.float32)
        mu = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
        sc = tl.load(scale_ptr + cs, mask=c_ok, other=0.0)
        bt = tl.load(beta_ptr + cs, mask=c_ok, other=0.0)
        af = _act_fwd((af - mu[None, :]) * sc[None, :] + bt[None, :], slope, ACT)
        return tl.where(ok, af, 0.0)

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:  # the Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16): fp32 MMA there
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _fprop_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        mean_ptr,
        scale_ptr,
        beta_ptr,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        slope,
        PROLOGUE: tl.constexpr,
        ACT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        W_DESC: tl.constexpr = False,
        X_DENSE: tl.constexpr = False,
    ):
        M = N * P * Q
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions: M < 2**31 (checked by the launcher)
        m_ok = ms < M
        n = ms // (P * Q)
        p = (ms % (P * Q)) // Q
        q = ms % Q
        h0 = p * stride - pad  # the tap (0, 0)'s input row/column; tap (r, s) adds (r*dil, s*dil)
        w0 = q * stride - pad
        row0 = (n * H + h0) * W + w0
        ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = ks < K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if W_DESC:
            # The packed weight (R, S, C, K) as a 3-D tensor descriptor [R*S, C, K]: on sm_90 each (tap, channel
            # block) tile is one TMA copy into shared memory (cp.async.bulk.tensor + mbarrier), no address or mask
            # arithmetic in registers. 3-D, not [R*S*C, K]: channels past C are zero-filled by the copy (the
            # descriptor's bounds), instead of reading the next tap's weights. The launcher checks the alignment
            # TMA needs (16-byte base and row stride: K * itemsize % 16 == 0).
            w_desc = tl.make_tensor_descriptor(
                w_ptr, shape=[R * S, C, K], strides=[C * K, K, 1], block_shape=[1, BLOCK_K, BLOCK_N]
            )
            if X_DENSE:
                # 1x1, stride 1, no padding (the launcher's X_DENSE): x itself is the GEMM's dense A (M, C), so
                # the activation tile is a TMA copy too; rows past M and channels past C arrive as zeros and the
                # prologue's mask keeps act(bn(0)) out of them.
                x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, C], strides=[C, 1], block_shape=[BLOCK_M, BLOCK_K])
        # One flat K loop over (tap, channel block): the software pipeline runs across tap boundaries instead of
        # draining at the end of every tap (a nested tap/channel loop is two loops to the pipeliner).
        # The tap (rs, its offsets dh/dw) and channel block c0 advance as loop-carried scalars, no division per step.
        c0 = 0
        rs = 0
        dh = 0
        dw = 0
        for _ in range(0, R * S * tl.cdiv(C, BLOCK_K)):
            pos_ok = m_ok & (h0 + dh >= 0) & (h0 + dh < H) & (w0 + dw >= 0) & (w0 + dw < W)
            base = _idx(row0 + (dh * W + dw), INT64) * C
            cs = c0 + tl.arange(0, BLOCK_K)
            c_ok = cs < C
            ok = pos_ok[:, None] & c_ok[None, :]
            if W_DESC and X_DENSE:
                a = x_desc.load([pid_m * BLOCK_M, c0])
            else:
                a = tl.load(x_ptr + base[:, None] + cs[None, :], mask=ok, other=0.0)
            if PROLOGUE:  # on the way to the MMA operand: act(bn(x)) exists only in registers
                a = _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, slope, ACT).to(w_ptr.dtype.element_ty)
            else:
                a = a.to(w_ptr.dtype.element_ty)
            if W_DESC:
                b = w_desc.load([rs, c0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                b = tl.load(
                    w_ptr + (rs * C + cs)[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0
                )
            acc = _mma(a, b, acc, UPCAST, PRECISION)
            c0 += BLOCK_K
            next_tap = c0 >= C
            c0 = tl.where(next_tap, 0, c0)
            rs = tl.where(next_tap, rs + 1, rs)
            dw = tl.where(next_tap, dw + dil, dw)
            next_row = dw >= S * dil
            dw = tl.where(next_row, 0, dw)
            dh = tl.where(next_row, dh + dil, dh)
        tl.store(
            y_ptr + _idx(ms, INT64)[:, None] * K + ks[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=m_ok[:, None] & k_ok[None, :],
        )

    @triton.jit
    def _phase_taps(e, R, stride, dil, G, INV):
        """Taps r in [0, R) with (e - r*dil) % stride == 0, as (first r, step, count): r = r0 + t*step.

        e = phase + pad; G = gcd(dil, stride), INV = (dil/G)^-1 mod (stride/G) (from the launcher). No tap when G
        does not divide e (e.g. stride 2, even dilation, odd e): that phase's gradient is 0 (before act')."""
        step = stride // G
        r0 = ((e // G) * INV) % step
        count = tl.where(e % G == 0, (R - r0 + step - 1) // step, 0)
        return r0, step, count

    @triton.jit
    def _dgrad_kernel(
        dy_ptr,
        w_ptr,
        g_ptr,
        x_ptr,
        mean_ptr,
        scale_ptr,
        beta_ptr,
        sums_ptr,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        G,
        INV,
        slope,
        EPILOGUE: tl.constexpr,
        ACT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        INT64: tl.constexpr,
        DETERMINISTIC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # By phases: program_id(1) = (ah, aw), the input positions h = ah + stride*i, w = aw + stride*j. Such a
        # position meets only the taps with (ah + pad - r*dil) % stride == 0 (same for every i), each at
        # p = i + (ah + pad - r*dil) / stride: stride**2 dense sub-GEMMs, no MMA on rows a tap cannot reach.
        # Stride 1 is one phase with every tap. Grid axis 0 covers the largest phase; rows past a smaller
        # phase's end are masked, and programs with no row run no K step.
        # sums_ptr: (2, C) fp32 accumulated by atomics, or (2, stride**2 * num_m, C) partials when DETERMINISTIC.
        phase = tl.program_id(1)
        ah = phase // stride
        aw = phase % stride
        Hp = (H - ah + stride - 1) // stride
        Wp = (W - aw + stride - 1) // stride
        Mp = N * Hp * Wp
        num_m = tl.cdiv(N * tl.cdiv(H, stride) * tl.cdiv(W, stride), BLOCK_M)  # the largest phase's row tiles
        pid_m, pid_n = _grouped(tl.program_id(0), num_m, tl.cdiv(C, BLOCK_N), GROUP_M)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = ms < Mp
        n = ms // (Hp * Wp)
        i = (ms % (Hp * Wp)) // Wp
        j = ms % Wp
        r0, step, nth = _phase_taps(ah + pad, R, stride, dil, G, INV)
        s0, _, ntw = _phase_taps(aw + pad, S, stride, dil, G, INV)
        row0 = (n * P + i) * Q + j
        cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cs < C
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        n_it = tl.where(pid_m * BLOCK_M < Mp, nth * ntw * tl.cdiv(K, BLOCK_K), 0)
        # One flat loop over (tap of this phase, K block). The tap and block advance as loop-carried scalars (no
        # integer division per step: on sm_80 that extra scalar work tipped the 4-warp tile into spills).
        dstep = step * dil // stride  # how far p moves when r advances by one step (exact)
        dp0 = (ah + pad - r0 * dil) // stride  # exact: no rounding direction to care about
        dq0 = (aw + pad - s0 * dil) // stride
        k0 = 0
        r = r0
        s = s0
        dp = dp0
        dq = dq0
        for _ in range(0, n_it):
            # 0 <= i+dp < P as one unsigned compare (a negative wraps above P): fewer live predicates
            ok = m_ok & ((i + dp).to(tl.uint32) < P) & ((j + dq).to(tl.uint32) < Q)
            base = _idx(row0 + (dp * Q + dq), INT64) * K
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(dy_ptr + base[:, None] + ks[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(
                w_ptr + ((r * S + s) * K + ks)[:, None] * C + cs[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0
            )
            acc = _mma(a.to(w_ptr.dtype.element_ty), b, acc, UPCAST, PRECISION)
            k0 += BLOCK_K
            next_tap = k0 >= K
            k0 = tl.where(next_tap, 0, k0)
            s = tl.where(next_tap, s + step, s)
            dq = tl.where(next_tap, dq - dstep, dq)
            next_row = s >= S
            s = tl.where(next_row, s0, s)
            dq = tl.where(next_row, dq0, dq)
            r = tl.where(next_row, r + step, r)
            dp = tl.where(next_row, dp - dstep, dp)
        out_ok = m_ok[:, None] & c_ok[None, :]
        rows = (n * H + ah + stride * i) * W + aw + stride * j
        offs = _idx(rows, INT64)[:, None] * C + cs[None, :]
        if EPILOGUE:  # act'(z) recomputed from x, plus the per-channel sums of the BN backward
            xc = (
                tl.load(x_ptr + offs, mask=out_ok, other=0.0).to(tl.float32)
                - tl.load(mean_ptr + cs, mask=c_ok, other=0.0)[None, :]
            )
            z = (
                xc * tl.load(scale_ptr + cs, mask=c_ok, other=0.0)[None, :]
                + tl.load(beta_ptr + cs, mask=c_ok, other=0.0)[None, :]
            )
            acc = tl.where(out_ok, _act_bwd(z, acc, slope, ACT), 0.0)
            if DETERMINISTIC:
                part = phase * num_m + pid_m
                parts = stride * stride * num_m
                # sum(g*xc) first: xc dies before the second reduction (in the other order the sm_80 4-warp tile
                # with fp32 x spilled 8 bytes)
                tl.store(sums_ptr + (parts + part) * C + cs, tl.sum(acc * xc, axis=0), mask=c_ok)
                tl.store(sums_ptr + part * C + cs, tl.sum(acc, axis=0), mask=c_ok)
            else:
                # the order only moves registers: sum(g*xc) first fits the 16-bit tiles (Triton 3.6 sm_80 leaky_relu
                # spilled 8 B the other way), sum(g) first the fp32 ones (Triton 3.9 sm_90 ieee identity: 24 B)
                if w_ptr.dtype.element_ty == tl.float32:
                    tl.atomic_add(sums_ptr + cs, tl.sum(acc, axis=0), mask=c_ok)
                    tl.atomic_add(sums_ptr + C + cs, tl.sum(acc * xc, axis=0), mask=c_ok)
                else:
                    tl.atomic_add(sums_ptr + C + cs, tl.sum(acc * xc, axis=0), mask=c_ok)
                    tl.atomic_add(sums_ptr + cs, tl.sum(acc, axis=0), mask=c_ok)
        tl.store(g_ptr + offs, acc.to(g_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _wgrad_kernel(
        dy_ptr,
        x_ptr,
        dw_ptr,
        mean_ptr,
        scale_ptr,
        beta_ptr,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        SPLITS,
        slope,
        PROLOGUE: tl.constexpr,
        ACT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        INT64: tl.constexpr,
        DETERMINISTIC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Tile: BLOCK_M output channels k x BLOCK_N input channels c, reduced over BLOCK_K positions at a time.
        # dw_ptr: (R, S, K, C) fp32 (C contiguous: coalesced atomics), or (SPLITS, R, S, K, C) partials.
        pid_k, pid_c = _grouped(tl.program_id(0), tl.cdiv(K, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
        rs = tl.program_id(1) // SPLITS
        split = tl.program_id(1) % SPLITS
        ks = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
        k_ok = ks < K
        cs = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cs < C
        M = N * P * Q
        m_per_split = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_K) * BLOCK_K
        m_lo = split * m_per_split
        m_hi = tl.minimum(m_lo + m_per_split, M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_K):
            ms = m0 + tl.arange(0, BLOCK_K)
            m_ok = ms < m_hi
            n = ms // (P * Q)
            p = (ms % (P * Q)) // Q
            q = ms % Q
            h = p * stride - pad + (rs // S) * dil
            w = q * stride - pad + (rs % S) * dil
            pos_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            ok = pos_ok[:, None] & c_ok[None, :]
            a = tl.load(x_ptr + (_idx((n * H + h) * W + w, INT64) * C)[:, None] + cs[None, :], mask=ok, other=0.0)
            if PROLOGUE:
                a = _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, slope, ACT).to(dy_ptr.dtype.element_ty)
            else:
                a = a.to(dy_ptr.dtype.element_ty)
            dyt = tl.load(
                dy_ptr + _idx(ms, INT64)[None, :] * K + ks[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0
            )
            acc = _mma(dyt, a, acc, UPCAST, PRECISION)
        offs = (rs * K + ks[:, None]) * C + cs[None, :]
        out_ok = k_ok[:, None] & c_ok[None, :]
        if DETERMINISTIC:
            tl.store(dw_ptr + split * (R * S * K * C) + offs, acc, mask=out_ok)
        else:
            tl.atomic_add(dw_ptr + offs, acc, mask=out_ok)

    _KEYS = {"fprop": ["N", "H", "W", "C", "K", "R", "stride", "pad", "dil"]}
    _KEYS["dgrad"] = _KEYS["fprop"]
    _KEYS["wgrad"] = _KEYS["fprop"] + ["SPLITS"]
    # the buffers a kernel accumulates into: the autotuner zeroes them before each timed run and after the choice,
    # else the benchmark runs' atomics would stay in the result (tests/test_conv_autotune.py shows it)
    _RESET = {"fprop": None, "dgrad": ["sums_ptr"], "wgrad": ["dw_ptr"]}
    _KERNELS = {"fprop": _fprop_kernel, "dgrad": _dgrad_kernel, "wgrad": _wgrad_kernel}
    _TUNERS: dict = {}

    def _bench(kernel_call, quantiles):
        """The autotuner's timer: the driver's benchmarker on a GPU; under the interpreter (CPU tests of the same
        autotune path: config choice, reset_to_zero) the wall clock of two calls."""
        if _runtime.INTERPRET:
            import time

            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                kernel_call()
                times.append(1e3 * (time.perf_counter() - t0))
            return [min(times)] * len(quantiles)
        from triton.runtime import driver

        bench = getattr(driver.active, "get_benchmarker", None)
        if bench is None:
            import triton.testing

            return triton.testing.do_bench(kernel_call, quantiles=quantiles)
        return bench()(kernel_call, quantiles=quantiles)

    def _tuned(kind: str, cls: str, x: torch.Tensor, tma: bool = False):
        """The autotuned launcher of ``kind`` for operand class ``cls`` on x's device (its arch's config space;
        ``tma``: with the tensor-descriptor configs, when the weight allows them)."""
        arch = device_arch(x)
        key = (kind, cls, arch, tma)
        if key not in _TUNERS:
            space = autotune_configs(cls, arch, kind, tma)
            if any(c_.w_desc for c_ in space):
                _ensure_allocator(x)
            configs = [triton.Config(c_.meta(), num_warps=c_.num_warps, num_stages=c_.num_stages) for c_ in space]
            _TUNERS[key] = triton.autotune(configs, key=_KEYS[kind], reset_to_zero=_RESET[kind], do_bench=_bench)(
                _KERNELS[kind]
            )
        return _TUNERS[key]


_interpreter_arch: int | None = None


def device_arch(x: torch.Tensor) -> int:
    """Compute capability as an int (90 for sm_90) of x's CUDA device; on CPU the arch set by
    :func:`autotune_in_interpreter` (80 unless given)."""
    if _compiled(x):
        major, minor = torch.cuda.get_device_capability(x.device)
        return 10 * major + minor
    return _interpreter_arch or 80


def autotune_configs(cls: str, arch: int, kind: str = "fprop", tma: bool = True) -> tuple:
    """The autotune space of ``kind`` ("fprop" | "dgrad" | "wgrad") for an operand class on sm_``arch``:
    :data:`GPU_CONFIGS`, plus :data:`HOPPER_CONFIGS` for 16-bit operands on sm_90 (wgmma with 8 warps; sm_80's
    mma.sync and 164 KB of shared memory gain nothing from them); ``tma=False`` leaves out the tensor-descriptor
    configs (a weight :func:`tma_ok` refuses)."""
    hopper = HOPPER_CONFIGS[kind] if (cls == "16bit" and arch // 10 == 9) else ()
    return tuple(gpu_configs(cls, kind)) + tuple(c_ for c_ in hopper if tma or not c_.w_desc)


def gpu_configs(cls: str, kind: str) -> tuple:
    """The every-GPU configs of ``kind`` for an operand class: :data:`GPU_CONFIGS`, or :data:`BACKWARD_16BIT`
    for 16-bit dgrad/wgrad; the first is the fixed one (INT64, deterministic)."""
    return BACKWARD_16BIT if (cls == "16bit" and kind != "fprop") else GPU_CONFIGS[cls]


def tma_ok(t: torch.Tensor) -> bool:
    """Whether ``t`` can be read through a TMA tensor descriptor over its dims (the packed fprop weight (R, S, C, K);
    x as (N, H, W, C)): contiguous, 16-byte aligned base, rows (last dim) a multiple of 16 bytes (K % 8 == 0 for
    16-bit weights)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0


# Triton's per-context allocator and its "none set" value (private; None for another Triton layout: then ours is set
# on every call, the previous behaviour)
try:
    from triton.runtime._allocation import _NULL_ALLOCATOR, _allocator as _ALLOCATOR
except ImportError:
    _NULL_ALLOCATOR = _ALLOCATOR = None


def _scratch_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: where Triton launches


def _ensure_allocator(x: torch.Tensor) -> None:
    """A kernel that builds a tensor descriptor on the device needs a global scratch buffer (128 B per program)
    from Triton's allocator. Triton keeps it in a ContextVar (per thread: autograd's backward threads and
    recompute start without one), so check on every call, and set torch's caching allocator only where none
    is set: an allocator the application set with ``triton.set_allocator`` is kept. CUDA only (the
    interpreter needs none)."""
    if not _compiled(x):
        return
    if _NULL_ALLOCATOR is None or _ALLOCATOR.get() is _NULL_ALLOCATOR:
        triton.set_allocator(_scratch_alloc)


@contextlib.contextmanager
def autotune_in_interpreter(arch: int = 80):
    """Tests: under the interpreter, launch through the GPU's autotuner (every config of
    ``autotune_configs(cls, arch, kind)`` run and timed, reset_to_zero, the choice cached per shape) instead of
    :data:`INTERPRETER_CONFIG`. Slow: tiny shapes only."""
    global _autotune_interpreted, _interpreter_arch
    old = _autotune_interpreted, _interpreter_arch
    _autotune_interpreted, _interpreter_arch = True, arch
    try:
        yield
    finally:
        _autotune_interpreted, _interpreter_arch = old


_autotune_interpreted = False


def _compiled(x: torch.Tensor) -> bool:
    return x.is_cuda and not _runtime.INTERPRET


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """Which GPU config list applies: "16bit" (fp16/bf16 operands), "tf32" or "ieee" (fp32 operands)."""
    return "16bit" if dtype != torch.float32 else precision


def _choose(x: torch.Tensor, config: ConvConfig | None, cls: str, fixed: bool, kind: str) -> ConvConfig | None:
    """The fixed config to launch, or None to autotune (compiled, nothing forced, not ``fixed``).

    ``fixed``: the INT64 and deterministic variants run the first (default) config of :func:`gpu_configs`: autotuning
    would make results depend on the timing-picked tile, and it keeps the number of compiled variants down."""
    config = config or _forced_config
    if config is not None:
        return config
    if fixed:
        return gpu_configs(cls, kind)[0] if (_compiled(x) or _autotune_interpreted) else INTERPRETER_CONFIG
    if not _compiled(x) and not _autotune_interpreted:
        return INTERPRETER_CONFIG
    return None


def _launch(tuned, raw, grid, config: ConvConfig | None, *args, **flags):
    if config is None:
        tuned[grid](*args, **flags)
    else:
        meta = config.meta()
        if raw is not _fprop_kernel:  # a forced tma config: dgrad/wgrad read the weight without a descriptor
            meta.pop("W_DESC", None)
        raw[lambda _m: grid(meta)](*args, **flags, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


def _upcast(dtype: torch.dtype) -> bool:
    return _runtime.INTERPRET and dtype == torch.bfloat16


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    """tl.dot input precision: fp32 operands "ieee" unless TF32 is asked for; 16-bit operands ignore it."""
    if precision not in (None, "ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if dtype != torch.float32:
        return "tf32"
    return precision or _fp32_precision


def _check_positions(*counts: int) -> None:
    if max(counts) >= INT32_LIMIT:
        raise ValueError(f"implicit GEMM: {max(counts)} output/input positions (N*H*W) exceed int32 row indices")


def needs_int64(*numels: int) -> bool:
    """Whether offsets into tensors with these element counts overflow int32 (the INT64 kernel variant)."""
    return max(numels) >= INT32_LIMIT


def _out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _vectors(bn: tuple | None, x: torch.Tensor):
    if bn is None:
        z = torch.zeros(1, device=x.device, dtype=torch.float32)
        return z, z, z
    return tuple(v.float().contiguous() for v in bn)


def _act_args(bn, activation: str, activation_param: float) -> tuple[float, int]:
    """(slope, ACT) kernel arguments: ACT 0 (relu) for the plain kernels (no prologue/epilogue reads it), the
    slope 0.0 unless leaky_relu (a runtime fp32 argument: one compiled kernel serves every slope)."""
    act = activation_code(activation)
    if bn is None:
        return 0.0, 0
    return (float(activation_param) if act == ACTIVATIONS["leaky_relu"] else 0.0), act


def pack_weight(weight: torch.Tensor, for_: str) -> torch.Tensor:
    """(K, C, R, S) weight in the kernel layout: ``"fprop"`` (R, S, C, K), ``"dgrad"`` (R, S, K, C)."""
    order = {"fprop": (2, 3, 1, 0), "dgrad": (2, 3, 0, 1)}[for_]
    return weight.permute(*order).contiguous()


def conv_fprop(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    pad: int,
    dil: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    packed: torch.Tensor | None = None,
    config: ConvConfig | None = None,
    precision: str | None = None,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """conv2d(act(bn(x)), weight) (or conv2d(x, weight) when ``bn`` is None) -> (N, K, P, Q) channels_last.

    ``bn`` = per-channel fp32 (mean, scale = gamma*rstd, beta). x: (N, C, H, W) any layout (made channels_last).
    Operands are cast to weight's dtype; accumulation fp32. ``packed``: ``pack_weight(weight, "fprop")`` when
    the caller caches it. ``config``: a fixed tile config (default: autotuned on a GPU, the interpreter's).
    ``precision``: ``"ieee"``/``"tf32"`` for fp32 operands (default :func:`set_fp32_precision`).
    ``activation``: "relu" | "leaky_relu" (negative slope ``activation_param``) | "identity" (with ``bn`` only).
    """
    slope, act = _act_args(bn, activation, activation_param)
    N, C, H, W = x.shape
    K, C2, R, S = weight.shape
    if C2 != C or R != S:
        raise ValueError(
            f"conv_fprop: weight {tuple(weight.shape)} does not fit input channels {C} (square kernels only)"
        )
    P, Q = _out_size(H, R, stride, pad, dil), _out_size(W, S, stride, pad, dil)
    _check_positions(N * H * W, N * P * Q)
    xl = x.contiguous(memory_format=torch.channels_last)
    wt = packed if packed is not None else pack_weight(weight, "fprop")
    y = torch.empty((N, K, P, Q), device=x.device, dtype=weight.dtype, memory_format=torch.channels_last)
    mean, scale, beta = _vectors(bn, x)
    prec = _precision(weight.dtype, precision)
    cls, int64 = operand_class(weight.dtype, prec), needs_int64(xl.numel(), y.numel())
    grid = lambda m: (triton.cdiv(N * P * Q, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]),)  # noqa: E731
    tma = tma_ok(wt) and not int64  # the descriptor variants are compiled with int32 offsets only
    # x as the dense A of a 1x1 stride-1 unpadded conv, read through a descriptor by the tma configs
    dense = tma and R == 1 and stride == 1 and pad == 0 and tma_ok(xl.permute(0, 2, 3, 1))
    cfg = _choose(x, config, cls, int64, "fprop")
    if cfg is not None and cfg.w_desc:
        if tma:
            _ensure_allocator(x)
        else:  # a forced descriptor config on a weight TMA cannot read: the same tile with plain loads
            cfg = replace(cfg, w_desc=False)
    _launch(
        _tuned("fprop", cls, x, tma) if cfg is None else None,
        _fprop_kernel,
        grid,
        cfg,
        xl,
        wt,
        y,
        mean,
        scale,
        beta,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        slope,
        PROLOGUE=bn is not None,
        ACT=act,
        UPCAST=_upcast(weight.dtype),
        PRECISION=prec,
        INT64=int64,
        X_DENSE=dense,
    )
    return y


def phase_constants(stride: int, dil: int) -> tuple[int, int]:
    """(G, INV) for the phase-split dgrad: G = gcd(dil, stride), INV = (dil/G)^-1 mod (stride/G) (0 when that is 1)."""
    gcd = math.gcd(dil, stride)
    step = stride // gcd
    return gcd, (pow(dil // gcd, -1, step) if step > 1 else 0)


def dgrad_phase_taps(H: int, R: int, stride: int, pad: int, dil: int) -> list[list[int]]:
    """Per phase a (0 <= a < stride) the taps r whose (a + pad - r*dil) is a multiple of ``stride``: the taps that
    reach the input rows a, a + stride, ... (the kernel's ``_phase_taps`` in Python, for tests and accounting)."""
    return [[r for r in range(R) if (a + pad - r * dil) % stride == 0] for a in range(min(stride, H))]


def conv_dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    stride: int,
    pad: int,
    dil: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    packed: torch.Tensor | None = None,
    config: ConvConfig | None = None,
    precision: str | None = None,
    deterministic: bool | None = None,
    activation: str = "relu",
    activation_param: float = 0.01,
):
    """Gradient wrt the activated input, (N, C, H, W) channels_last fp32.

    With ``bn``: times the recomputed act'(z) (relu [z > 0], leaky_relu (z > 0 ? 1 : ``activation_param``),
    identity 1), and also returns the per-channel fp32 sums (sum g, sum g*(x-mean)) that the BN backward
    needs: ``(g, sum_g, sum_gx)``, g = dL/dz. Without: ``(grad_input, None, None)``.
    ``packed``: ``pack_weight(weight, "dgrad")``; ``deterministic``: the sums without atomics (fixed config).
    """
    slope, act = _act_args(bn, activation, activation_param)
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = dy.shape[-2:]
    _check_positions(N * H * W, N * P * Q)
    dyl = dy.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    wt = packed if packed is not None else pack_weight(weight, "dgrad")
    xl = x.contiguous(memory_format=torch.channels_last)
    g = torch.empty((N, C, H, W), device=x.device, dtype=torch.float32, memory_format=torch.channels_last)
    det = (_deterministic if deterministic is None else deterministic) and bn is not None
    prec = _precision(weight.dtype, precision)
    cls, int64 = operand_class(weight.dtype, prec), needs_int64(dyl.numel(), g.numel())
    cfg = _choose(x, config, cls, int64 or det, "dgrad")
    if det:  # partial sums per (phase, row tile), summed below in a fixed order
        rows = stride * stride * triton.cdiv(N * triton.cdiv(H, stride) * triton.cdiv(W, stride), cfg.block_m)
        sums = torch.zeros((2, rows, C), device=x.device, dtype=torch.float32)
    else:
        sums = torch.zeros((2, C), device=x.device, dtype=torch.float32)
    mean, scale, beta = _vectors(bn, x)
    gcd, inv = phase_constants(stride, dil)

    def grid(m):
        return (
            triton.cdiv(N * triton.cdiv(H, stride) * triton.cdiv(W, stride), m["BLOCK_M"])
            * triton.cdiv(C, m["BLOCK_N"]),
            stride * stride,
        )

    _launch(
        _tuned("dgrad", cls, x),
        _dgrad_kernel,
        grid,
        cfg,
        dyl,
        wt,
        g,
        xl,
        mean,
        scale,
        beta,
        sums,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        gcd,
        inv,
        slope,
        EPILOGUE=bn is not None,
        ACT=act,
        UPCAST=_upcast(weight.dtype),
        PRECISION=prec,
        INT64=int64,
        DETERMINISTIC=det,
    )
    if bn is None:
        return g, None, None
    if det:
        sums = sums.sum(1)
    return g, sums[0], sums[1]


def wgrad_splits(x: torch.Tensor, M: int, K: int, C: int) -> int:
    """How many programs share the M = N*P*Q reduction of one weight tile (split-M; independent of the tile)."""
    tiles = triton.cdiv(K, 64) * triton.cdiv(C, 64)
    return max(1, min(triton.cdiv(M, 128), _runtime.num_programs_hint(x) // max(tiles, 1)))


def conv_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_shape: torch.Size,
    stride: int,
    pad: int,
    dil: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: ConvConfig | None = None,
    precision: str | None = None,
    deterministic: bool | None = None,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """Weight gradient (K, C, R, S) fp32, with act(bn(x)) recomputed on load when ``bn`` is given.

    Accumulated (R, S, K, C) so the split-M atomics are coalesced along C, then permuted. ``deterministic``:
    per-split partials summed in a fixed order instead of atomics (fixed config). ``activation``/
    ``activation_param`` as in :func:`conv_fprop`."""
    slope, act = _act_args(bn, activation, activation_param)
    N, C, H, W = x.shape
    K, _, R, S = weight_shape
    P, Q = dy.shape[-2:]
    _check_positions(N * H * W, N * P * Q)
    dtype = dtype or dy.dtype
    dyl = dy.to(dtype).contiguous(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    M = N * P * Q
    splits = wgrad_splits(x, M, K, C)
    det = _deterministic if deterministic is None else deterministic
    dw = torch.zeros(((splits,) if det else ()) + (R, S, K, C), device=x.device, dtype=torch.float32)
    mean, scale, beta = _vectors(bn, x)
    prec = _precision(dtype, precision)
    cls, int64 = operand_class(dtype, prec), needs_int64(dyl.numel(), xl.numel())
    grid = lambda m: (triton.cdiv(K, m["BLOCK_M"]) * triton.cdiv(C, m["BLOCK_N"]), R * S * splits)  # noqa: E731
    _launch(
        _tuned("wgrad", cls, x),
        _wgrad_kernel,
        grid,
        _choose(x, config, cls, int64 or det, "wgrad"),
        dyl,
        xl,
        dw,
        mean,
        scale,
        beta,
        N,
        H,
        W,
        C,
        P,
        Q,
        K,
        R,
        S,
        stride,
        pad,
        dil,
        splits,
        slope,
        PROLOGUE=bn is not None,
        ACT=act,
        UPCAST=_upcast(dtype),
        PRECISION=prec,
        INT64=int64,
        DETERMINISTIC=det,
    )
    if det:
        dw = dw.sum(0)
    return dw.permute(2, 3, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (kernels/aot.py compiles each for sm_80 and sm_90 in CI)

_TNAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (x dtype, operand dtype) the launchers see: same dtype, or an fp32 input under fp16/bf16 autocast
DTYPE_COMBOS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
)
_SCALARS = ("N", "H", "W", "C", "P", "Q", "K", "R", "S", "stride", "pad", "dil")


def aot_variants() -> list:
    """Every (kernel, dtypes, flags, config) the CUDA launchers can choose, as :class:`kernels.aot.Variant`.

    Per kernel and (x dtype, operand dtype[, fp32 precision]): BN prologue/epilogue on and off, each autotune
    config of its class with int32 offsets, and the fixed-config INT64 and DETERMINISTIC variants. NCHW and
    channels_last inputs reach the same kernels (the launchers pass channels_last storage), so the layout adds no
    variant; UPCAST is interpreter-only (False on a GPU).

    Activations (ACT; the plain kernels read none and compile with ReLU's 0): all of the above with ReLU; with the
    BN prologue/epilogue also leaky_relu on every autotune config (int32 offsets, atomics: what an autotuned GPU
    launch picks) and identity on the class's first config. Not the full cross product: that would triple the
    conv compiles (the longest part of the check) for variants whose only difference, one select and multiply
    per element, cannot move registers or shared memory by much; the INT64 and DETERMINISTIC code is ACT-free.
    """
    from .tiles import Variant

    ints = {s: "i32" for s in _SCALARS}
    out = []
    for xdt, odt in DTYPE_COMBOS:
        xs, os_ = _TNAME[xdt], _TNAME[odt]
        for prec in ("ieee", "tf32") if odt == torch.float32 else ("tf32",):
            cls = operand_class(odt, prec)
            tag = f"x={xs} op={os_}" + (f" {prec}" if odt == torch.float32 else "")
            sigs = {
                "conv_fprop": (_fprop_kernel, "PROLOGUE", {"x_ptr": f"*{xs}", "w_ptr": f"*{os_}", "y_ptr": f"*{os_}"}),
                "conv_dgrad": (
                    _dgrad_kernel,
                    "EPILOGUE",
                    {
                        "dy_ptr": f"*{os_}",
                        "w_ptr": f"*{os_}",
                        "g_ptr": "*fp32",
                        "x_ptr": f"*{xs}",
                        "sums_ptr": "*fp32",
                        "G": "i32",
                        "INV": "i32",
                    },
                ),
                "conv_wgrad": (
                    _wgrad_kernel,
                    "PROLOGUE",
                    {"dy_ptr": f"*{os_}", "x_ptr": f"*{xs}", "dw_ptr": "*fp32", "SPLITS": "i32"},
                ),
            }
            for name, (fn, flag_name, ptrs) in sigs.items():
                sig = {**ptrs, "mean_ptr": "*fp32", "scale_ptr": "*fp32", "beta_ptr": "*fp32", **ints, "slope": "fp32"}
                has_det = name != "conv_fprop"
                for flag in (True, False):
                    # (config, INT64, DETERMINISTIC, ACT): every autotune config, then the fixed-config variants
                    relu, leaky, ident = ACTIVATIONS["relu"], ACTIVATIONS["leaky_relu"], ACTIVATIONS["identity"]
                    kcfgs = gpu_configs(cls, name[len("conv_") :])
                    plans = [(c_, False, False, relu) for c_ in kcfgs]
                    plans += [(kcfgs[0], True, False, relu)]
                    if has_det and (flag or name == "conv_wgrad"):
                        plans += [(kcfgs[0], i64, True, relu) for i64 in (False, True)]
                    if flag:
                        plans += [(c_, False, False, leaky) for c_ in kcfgs]
                        plans += [(kcfgs[0], False, False, ident)]
                    for cfg, i64, det, act in plans:
                        const = {
                            flag_name: flag,
                            "ACT": act,
                            "UPCAST": False,
                            "PRECISION": prec,
                            "INT64": i64,
                            **cfg.meta(),
                        }
                        if has_det:
                            const["DETERMINISTIC"] = det
                        else:
                            const.setdefault("W_DESC", False)
                            const["X_DENSE"] = False  # no descriptor in these configs: X_DENSE changes nothing
                        flags = (
                            ("bn" if flag else "plain")
                            + (" i64" if i64 else "")
                            + (" det" if det else "")
                            + {relu: "", leaky: " leaky_relu", ident: " identity"}[act]
                        )
                        out.append(
                            Variant(
                                fn,
                                dict(sig),
                                const,
                                cfg.num_warps,
                                cfg.num_stages,
                                name,
                                tag,
                                f"{flags} {cfg.label()}",
                                tensor_cores=cls != "ieee",
                                divisible=("C", "K"),
                                single_k_loop=cls != "ieee",
                            )
                        )
                    # sm_90's extra autotune configs (HOPPER_CONFIGS), budgeted: BN + ReLU (what the model
                    # launches) for every 16-bit combination, plain and leaky_relu for bf16 operands only
                    if cls != "16bit" or not (flag or odt == xdt == torch.bfloat16):
                        continue
                    acts = (relu, leaky) if (flag and xdt == odt == torch.bfloat16) else (relu,)
                    for cfg in HOPPER_CONFIGS[name[len("conv_") :]]:
                        # tma configs also with X_DENSE (1x1 stride-1 unpadded: the activation by TMA too)
                        for act, dense in [
                            (a_, d_) for a_ in acts for d_ in ((False, True) if cfg.w_desc else (False,))
                        ]:
                            const = {
                                flag_name: flag,
                                "ACT": act,
                                "UPCAST": False,
                                "PRECISION": prec,
                                "INT64": False,
                                **cfg.meta(),
                            }
                            if has_det:
                                const["DETERMINISTIC"] = False
                            else:
                                const.setdefault("W_DESC", False)
                                const["X_DENSE"] = dense
                            flags = (
                                ("bn" if flag else "plain")
                                + (" leaky_relu" if act == leaky else "")
                                + (" 1x1" if dense else "")
                            )
                            out.append(
                                Variant(
                                    fn,
                                    dict(sig),
                                    const,
                                    cfg.num_warps,
                                    cfg.num_stages,
                                    name,
                                    tag,
                                    f"{flags} {cfg.label()} (sm_90)",
                                    tensor_cores=True,
                                    divisible=("C", "K"),
                                    archs=(90,),
                                    single_k_loop=True,
                                    tma=(2 if dense else 1) if cfg.w_desc else 0,
                                )
                            )
    return out
