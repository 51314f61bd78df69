"""Implicit-GEMM convolution whose operand loader applies BatchNorm + ReLU: relu(bn(x)) never exists in memory.

Layouts: x (N, H, W, C) channels_last storage of an (N, C, H, W) tensor; weight (K, C, R, S) OIHW as in
nn.Conv2d (repacked to (R, S, C, K) / (R, S, K, C) for the kernels); outputs channels_last. Square kernels,
stride, dilation and zero padding (any value), groups = 1. fp16/bf16/fp32 operands, fp32 accumulation.

    fprop  y[n,p,q,k]   = sum_{r,s,c} a[n, p*st-pad+r*d, q*st-pad+s*d, c] * W[k,c,r,s],   a = relu(bn(x)) on load
    dgrad  g[n,h,w,c]   = [z>0] * sum_{r,s,k} dy[n, (h+pad-r*d)/st, (w+pad-s*d)/st, k] * W[k,c,r,s]
           (epilogue: per-channel sum(g) and sum(g*(x-mean)) for the BN backward, by atomics)
    wgrad  dW[k,c,r,s]  = sum_{n,p,q} dy[n,p,q,k] * a[n, p*st-pad+r*d, q*st-pad+s*d, c]   (a recomputed on load)

Reference: torch.nn.functional.conv2d / torch.nn.grad.conv2d_{input,weight} on relu(bn(x)) (see tests).
"""

from __future__ import annotations

import torch

from . import _runtime  # first: sets TRITON_INTERPRET before triton.jit runs
from ._runtime import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, PROLOGUE: tl.constexpr):
        """relu((a - mean) * scale + beta) per channel; positions outside the image (padding) stay 0."""
        if PROLOGUE:
            af = a.to(tl.float32)
            mu = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
            sc = tl.load(scale_ptr + cs, mask=c_ok, other=0.0)
            be = tl.load(beta_ptr + cs, mask=c_ok, other=0.0)
            af = tl.maximum((af - mu[None, :]) * sc[None, :] + be[None, :], 0.0)
            return tl.where(ok, af, 0.0)
        return a

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr):
        if UPCAST:  # the Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16): fp32 MMA there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _fprop_kernel(
        x_ptr, w_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr,
        N, H, W, C, P, Q, K, R, S, stride, pad, dil,
        PROLOGUE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = ms < N * P * Q
        n = ms // (P * Q)
        p = (ms % (P * Q)) // Q
        q = ms % Q
        ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = ks < K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for rs in range(0, R * S):
            h = p * stride - pad + (rs // S) * dil
            w = q * stride - pad + (rs % S) * dil
            pos_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            base = ((n * H + h) * W + w) * C
            for c0 in range(0, C, BLOCK_K):
                cs = c0 + tl.arange(0, BLOCK_K)
                c_ok = cs < C
                ok = pos_ok[:, None] & c_ok[None, :]
                a = tl.load(x_ptr + base[:, None] + cs[None, :], mask=ok, other=0.0)
                a = _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, PROLOGUE).to(w_ptr.dtype.element_ty)
                b = tl.load(w_ptr + (rs * C + cs)[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST)
        tl.store(y_ptr + ms[:, None] * K + ks[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _dgrad_kernel(
        dy_ptr, w_ptr, g_ptr, x_ptr, mean_ptr, scale_ptr, beta_ptr, sum_g_ptr, sum_gx_ptr,
        N, H, W, C, P, Q, K, R, S, stride, pad, dil,
        EPILOGUE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = ms < N * H * W
        n = ms // (H * W)
        h = (ms % (H * W)) // W
        w = ms % W
        cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cs < C
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for rs in range(0, R * S):
            ph = h + pad - (rs // S) * dil
            qw = w + pad - (rs % S) * dil
            p = ph // stride
            q = qw // stride
            ok = m_ok & (ph >= 0) & (qw >= 0) & (ph % stride == 0) & (qw % stride == 0) & (p < P) & (q < Q)
            base = ((n * P + p) * Q + q) * K
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = tl.load(dy_ptr + base[:, None] + ks[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + (rs * K + ks)[:, None] * C + cs[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                acc = _mma(a.to(w_ptr.dtype.element_ty), b, acc, UPCAST)
        out_ok = m_ok[:, None] & c_ok[None, :]
        offs = ms[:, None] * C + cs[None, :]
        if EPILOGUE:  # ReLU mask recomputed from x, plus the per-channel sums of the BN backward
            xc = tl.load(x_ptr + offs, mask=out_ok, other=0.0).to(tl.float32) - tl.load(mean_ptr + cs, mask=c_ok, other=0.0)[None, :]
            z = xc * tl.load(scale_ptr + cs, mask=c_ok, other=0.0)[None, :] + tl.load(beta_ptr + cs, mask=c_ok, other=0.0)[None, :]
            acc = tl.where(out_ok & (z > 0.0), acc, 0.0)
            tl.atomic_add(sum_g_ptr + cs, tl.sum(acc, axis=0), mask=c_ok)
            tl.atomic_add(sum_gx_ptr + cs, tl.sum(acc * xc, axis=0), mask=c_ok)
        tl.store(g_ptr + offs, acc.to(g_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _wgrad_kernel(
        dy_ptr, x_ptr, dw_ptr, mean_ptr, scale_ptr, beta_ptr,
        N, H, W, C, P, Q, K, R, S, stride, pad, dil, m_per_split, SPLITS,
        PROLOGUE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Tile: BLOCK_M output channels k x BLOCK_N input channels c, reduced over BLOCK_K positions at a time.
        pid_k = tl.program_id(0)
        pid_c = tl.program_id(1)
        rs = tl.program_id(2) // SPLITS
        split = tl.program_id(2) % SPLITS
        ks = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
        k_ok = ks < K
        cs = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cs < C
        m_lo = split * m_per_split
        m_hi = tl.minimum(m_lo + m_per_split, N * P * Q)
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
            a = tl.load(x_ptr + (((n * H + h) * W + w) * C)[:, None] + cs[None, :], mask=ok, other=0.0)
            a = _activate(a, cs, c_ok, ok, mean_ptr, scale_ptr, beta_ptr, PROLOGUE).to(dy_ptr.dtype.element_ty)
            dyt = tl.load(dy_ptr + ms[None, :] * K + ks[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            acc = _mma(dyt, a, acc, UPCAST)
        offs = (ks[:, None] * C + cs[None, :]) * (R * S) + rs
        tl.atomic_add(dw_ptr + offs, acc, mask=k_ok[:, None] & c_ok[None, :])


def _blocks(x: torch.Tensor) -> tuple[int, int, int]:
    # tl.dot needs every block dimension >= 16. Larger tiles on a GPU; autotuning per shape is future work.
    return (64, 64, 32) if (x.is_cuda and not _runtime.INTERPRET) else (16, 16, 16)


def _upcast(dtype: torch.dtype) -> bool:
    return _runtime.INTERPRET and dtype == torch.bfloat16


def _out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _vectors(bn: tuple | None, x: torch.Tensor):
    if bn is None:
        z = torch.zeros(1, device=x.device, dtype=torch.float32)
        return z, z, z
    return tuple(v.float().contiguous() for v in bn)


def conv_fprop(x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int, dil: int,
               bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """conv2d(relu(bn(x)), weight) (or conv2d(x, weight) when ``bn`` is None) -> (N, K, P, Q) channels_last.

    ``bn`` = per-channel fp32 (mean, scale = gamma*rstd, beta). x: (N, C, H, W) any layout (made channels_last).
    Operands are cast to weight's dtype; accumulation fp32.
    """
    N, C, H, W = x.shape
    K, C2, R, S = weight.shape
    if C2 != C or R != S:
        raise ValueError(f"conv_fprop: weight {tuple(weight.shape)} does not fit input channels {C} (square kernels only)")
    P, Q = _out_size(H, R, stride, pad, dil), _out_size(W, S, stride, pad, dil)
    xl = x.contiguous(memory_format=torch.channels_last)
    wt = weight.permute(2, 3, 1, 0).contiguous()  # (R, S, C, K)
    y = torch.empty((N, K, P, Q), device=x.device, dtype=weight.dtype, memory_format=torch.channels_last)
    bm, bn_, bk = _blocks(x)
    mean, scale, beta = _vectors(bn, x)
    grid = (triton.cdiv(N * P * Q, bm), triton.cdiv(K, bn_))
    _fprop_kernel[grid](xl, wt, y, mean, scale, beta, N, H, W, C, P, Q, K, R, S, stride, pad, dil,
                        PROLOGUE=bn is not None, UPCAST=_upcast(weight.dtype), BLOCK_M=bm, BLOCK_N=bn_, BLOCK_K=bk)
    return y


def conv_dgrad(dy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: int, pad: int, dil: int,
               bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Gradient wrt the activated input, (N, C, H, W) channels_last fp32.

    With ``bn``: masked by the recomputed ReLU, and also returns the per-channel fp32 sums (sum g,
    sum g*(x-mean)) that the BN backward needs: ``(g, sum_g, sum_gx)``. Without: ``(grad_input, None, None)``.
    """
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = dy.shape[-2:]
    dyl = dy.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    wt = weight.permute(2, 3, 0, 1).contiguous()  # (R, S, K, C)
    xl = x.contiguous(memory_format=torch.channels_last)
    g = torch.empty((N, C, H, W), device=x.device, dtype=torch.float32, memory_format=torch.channels_last)
    sums = torch.zeros((2, C), device=x.device, dtype=torch.float32)
    bm, bn_, bk = _blocks(x)
    mean, scale, beta = _vectors(bn, x)
    grid = (triton.cdiv(N * H * W, bm), triton.cdiv(C, bn_))
    _dgrad_kernel[grid](dyl, wt, g, xl, mean, scale, beta, sums[0], sums[1], N, H, W, C, P, Q, K, R, S,
                        stride, pad, dil, EPILOGUE=bn is not None, UPCAST=_upcast(weight.dtype),
                        BLOCK_M=bm, BLOCK_N=bn_, BLOCK_K=bk)
    return (g, sums[0], sums[1]) if bn is not None else (g, None, None)


def conv_wgrad(dy: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, stride: int, pad: int, dil: int,
               bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weight gradient (K, C, R, S) fp32, with relu(bn(x)) recomputed on load when ``bn`` is given."""
    N, C, H, W = x.shape
    K, _, R, S = weight_shape
    P, Q = dy.shape[-2:]
    dtype = dtype or dy.dtype
    dyl = dy.to(dtype).contiguous(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    dw = torch.zeros((K, C, R, S), device=x.device, dtype=torch.float32)
    bm, bn_, bk = _blocks(x)
    M = N * P * Q
    tiles = triton.cdiv(K, bm) * triton.cdiv(C, bn_) * R * S
    splits = max(1, min(triton.cdiv(M, bk), _runtime.num_programs_hint(x) // max(tiles // (R * S), 1)))
    m_per_split = triton.cdiv(triton.cdiv(M, splits), bk) * bk
    splits = triton.cdiv(M, m_per_split)
    mean, scale, beta = _vectors(bn, x)
    grid = (triton.cdiv(K, bm), triton.cdiv(C, bn_), R * S * splits)
    _wgrad_kernel[grid](dyl, xl, dw, mean, scale, beta, N, H, W, C, P, Q, K, R, S, stride, pad, dil,
                        m_per_split, splits, PROLOGUE=bn is not None, UPCAST=_upcast(dtype),
                        BLOCK_M=bm, BLOCK_N=bn_, BLOCK_K=bk)
    return dw
