"""BatchNorm + ReLU with a recompute-in-backward autograd Function.

Forward ``y = relu((x - mean) * rstd * gamma + beta)`` in one elementwise pass. Backward recomputes the
ReLU mask from ``x`` and the per-channel (mean, rstd): it needs only x, never the normalised tensor or y.

    z        = (x - mean) * scale + beta,   scale = gamma * rstd
    g        = dy * [z > 0]
    dbeta    = sum(g),  dgamma = rstd * sum(g * (x - mean))           (per channel, over N*H*W = M)
    dx       = scale * g - scale * dbeta / M - (x - mean) * scale * rstd * dgamma / M   (batch statistics)
    dx       = scale * g                                                               (running / frozen statistics)

Tensors: x, dy, y: (N, C, H, W), NCHW or channels_last, fp32/fp16/bf16 (y may be any float dtype, e.g. the
autocast dtype of a following conv); per-channel vectors fp32 of length C; all math in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _runtime
from .bn_stats import as_nchw_or_nhwc, channel_stats, reduction_grid
from ._runtime import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .bn_stats import _element_offsets

    @triton.jit
    def _channel_of(offs, C, HW, CHANNELS_LAST: tl.constexpr):
        if CHANNELS_LAST:
            return offs % C
        return (offs // HW) % C

    @triton.jit
    def _bn_relu_fwd_kernel(
        x_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, numel, C, HW,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """y = relu((x - mean[c]) * scale[c] + beta[c]) over a flat block of elements."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if INT64:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        c = _channel_of(offs, C, HW, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - tl.load(mean_ptr + c, mask=mask)) * tl.load(scale_ptr + c, mask=mask) + tl.load(beta_ptr + c, mask=mask)
        tl.store(y_ptr + offs, tl.maximum(z, 0.0).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bn_relu_grad_sums_kernel(
        x_ptr, dy_ptr, mean_ptr, scale_ptr, beta_ptr, sum_g_ptr, sum_gx_ptr, M, C, HW, m_per_prog,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Partial per-channel sum(g) and sum(g * (x - mean)), g = dy masked by the recomputed ReLU."""
        pid_c = tl.program_id(0)
        pid_m = tl.program_id(1)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0)
        scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0)
        beta = tl.load(beta_ptr + cs, mask=cmask, other=0.0)
        m_start = pid_m * m_per_prog
        m_end = tl.minimum(m_start + m_per_prog, M)
        acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            mmask = ms < m_end
            if INT64:
                ms = ms.to(tl.int64)
            mask = mmask[:, None] & cmask[None, :]
            offs = _element_offsets(ms, cs, C, HW, CHANNELS_LAST)
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(mask & (xc * scale[None, :] + beta[None, :] > 0.0), dy, 0.0)
            acc_g += g
            acc_gx += g * xc
        out = pid_m * C + cs
        tl.store(sum_g_ptr + out, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(sum_gx_ptr + out, tl.sum(acc_gx, axis=0), mask=cmask)

    @triton.jit
    def _bn_relu_bwd_kernel(
        x_ptr, dy_ptr, dx_ptr, mean_ptr, scale_ptr, beta_ptr, k_dy_ptr, k_x_ptr, k_0_ptr, numel, C, HW,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """dx = k_dy[c] * dy * [z > 0] + k_x[c] * (x - mean[c]) + k_0[c]."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if INT64:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        c = _channel_of(offs, C, HW, CHANNELS_LAST)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(mean_ptr + c, mask=mask)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = xc * tl.load(scale_ptr + c, mask=mask) + tl.load(beta_ptr + c, mask=mask)
        g = tl.where(z > 0.0, dy, 0.0)
        dx = tl.load(k_dy_ptr + c, mask=mask) * g + tl.load(k_x_ptr + c, mask=mask) * xc + tl.load(k_0_ptr + c, mask=mask)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_ELEMENTWISE_BLOCK = 1024


def _like(x: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, device=x.device, dtype=dtype, memory_format=fmt)


@dataclass
class BNParams:
    """Per-channel fp32 vectors of one BN-ReLU application (after statistics are known)."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor  # gamma, ones when the BN has no affine parameters
    bias: torch.Tensor  # beta, zeros likewise
    count: int  # elements per channel the statistics came from (all ranks when synced)
    batch_stats: bool  # True: mean/rstd depend on x (training), so dx gets the statistics terms

    @property
    def scale(self) -> torch.Tensor:
        return self.weight * self.rstd


def bn_params(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, *, backend: str,
              sync: bool = False, process_group=None) -> BNParams:
    """Statistics for ``bn`` applied to ``x`` following nn.BatchNorm2d's rules; updates running stats in training."""
    C = x.shape[1]
    # fp32 math (fp64 for fp64 inputs on the torch path, which makes it an exact oracle in tests)
    dt = torch.float64 if (x.dtype == torch.float64 and backend != "triton") else torch.float32
    weight = bn.weight.detach().to(dt) if bn.weight is not None else x.new_ones(C, dtype=dt)
    bias = bn.bias.detach().to(dt) if bn.bias is not None else x.new_zeros(C, dtype=dt)
    use_batch = bn.training or bn.running_mean is None
    if not use_batch:
        return BNParams(bn.running_mean.to(dt), torch.rsqrt(bn.running_var.to(dt) + bn.eps), weight, bias,
                        x.numel() // C, False)
    with torch.no_grad():  # the backward formula accounts for the statistics; no graph through them
        mean, var, count = channel_stats(x, backend=backend, sync=sync, process_group=process_group)
    mean, var = mean.to(dt), var.to(dt)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (count / max(count - 1, 1))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return BNParams(mean, torch.rsqrt(var + bn.eps), weight, bias, count, True)


def bn_relu_forward(x: torch.Tensor, p: BNParams, *, backend: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """relu(bn(x)) with known statistics; same layout as x, dtype ``out_dtype`` (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if backend != "triton":
        shape = (1, -1, 1, 1)
        z = (x.to(p.mean.dtype) - p.mean.view(shape)) * p.scale.view(shape) + p.bias.view(shape)
        return torch.relu_(z).to(out_dtype)
    x, channels_last = as_nchw_or_nhwc(x)
    y = _like(x, channels_last, out_dtype)
    N, C, H, W = x.shape
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _bn_relu_fwd_kernel[grid](
        x, y, p.mean.contiguous(), p.scale.contiguous(), p.bias.contiguous(), x.numel(), C, H * W,
        CHANNELS_LAST=channels_last, INT64=x.numel() >= 2**31, BLOCK=_ELEMENTWISE_BLOCK,
    )
    return y


def _grad_sums_triton(x: torch.Tensor, dy: torch.Tensor, p: BNParams, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum(g), sum(g * (x - mean)) with g = dy * [relu active]; fp32. x, dy share one layout."""
    N, C, H, W = x.shape
    M = N * H * W
    block_m, block_c, c_blocks, splits, m_per_prog = reduction_grid(x, channels_last)
    sum_g = torch.empty((splits, C), device=x.device, dtype=torch.float32)
    sum_gx = torch.empty_like(sum_g)
    _bn_relu_grad_sums_kernel[(c_blocks, splits)](
        x, dy, p.mean.contiguous(), p.scale.contiguous(), p.bias.contiguous(), sum_g, sum_gx,
        M, C, H * W, m_per_prog,
        CHANNELS_LAST=channels_last, INT64=x.numel() >= 2**31, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return sum_g.sum(0), sum_gx.sum(0)


def bn_relu_backward(
    x: torch.Tensor, dy: torch.Tensor, p: BNParams, *, backend: str, need_dx: bool = True,
    sync: bool = False, process_group=None, sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta) of y = relu(bn(x)) given dy, recomputing the ReLU mask from x.

    dx has x's dtype and layout; dgamma/dbeta are fp32. With ``sync`` the two per-channel sums are
    all-reduced first (as the statistics were), like SyncBatchNorm. ``sums``: per-channel (sum g,
    sum g*(x-mean)) already computed elsewhere (the implicit-GEMM dgrad epilogue), skipping that pass.
    """
    shape = (1, -1, 1, 1)
    if backend == "triton":
        x, channels_last = as_nchw_or_nhwc(x)
        dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        sum_g, sum_gx = sums if sums is not None else _grad_sums_triton(x, dy, p, channels_last)
    else:
        xc = x.to(p.mean.dtype) - p.mean.view(shape)
        g = torch.where(xc * p.scale.view(shape) + p.bias.view(shape) > 0, dy.to(p.mean.dtype), 0.0)
        sum_g, sum_gx = g.sum((0, 2, 3)), (g * xc).sum((0, 2, 3))
    # Parameter gradients stay local (DDP averages them); dx uses the group-wide sums, as SyncBatchNorm does.
    dbeta, dgamma = sum_g, sum_gx * p.rstd
    if not need_dx:
        return None, dgamma, dbeta
    if sync and p.batch_stats and torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.stack([sum_g, sum_gx])
        torch.distributed.all_reduce(both, group=process_group)
        sum_g, sum_gx = both[0], both[1]
    scale = p.scale
    if p.batch_stats:
        k_x = -scale * p.rstd * p.rstd * sum_gx / p.count
        k_0 = -scale * sum_g / p.count
    else:
        k_x = torch.zeros_like(scale)
        k_0 = torch.zeros_like(scale)
    if backend != "triton":
        dx = scale.view(shape) * g + k_x.view(shape) * xc + k_0.view(shape)
        return dx.to(x.dtype), dgamma, dbeta
    dx = _like(x, channels_last, x.dtype)
    N, C, H, W = x.shape
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _bn_relu_bwd_kernel[grid](
        x, dy, dx, p.mean.contiguous(), scale.contiguous(), p.bias.contiguous(),
        scale.contiguous(), k_x.contiguous(), k_0.contiguous(), x.numel(), C, H * W,
        CHANNELS_LAST=channels_last, INT64=x.numel() >= 2**31, BLOCK=_ELEMENTWISE_BLOCK,
    )
    return dx, dgamma, dbeta


def compute_dtype(x: torch.Tensor, fallback: torch.dtype | None = None) -> torch.dtype:
    """The dtype the op after BN-ReLU computes in: the autocast dtype when autocast is on, else ``fallback``/x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return fallback or x.dtype


class _BNReLUFunction(torch.autograd.Function):
    """y = relu(bn(x)) saving only x (statistics live in the BNParams on ctx)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: BNParams, backend: str, out_dtype, sync: bool, group):
        ctx.p, ctx.backend, ctx.sync, ctx.group = p, backend, sync, group
        ctx.param_dtype = weight.dtype if weight is not None else x.dtype
        ctx.save_for_backward(x)
        return bn_relu_forward(x, p, backend=backend, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx, dgamma, dbeta = bn_relu_backward(x, dy, ctx.p, backend=ctx.backend, need_dx=ctx.needs_input_grad[0],
                                             sync=ctx.sync, process_group=ctx.group)
        dw = dgamma.to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        db = dbeta.to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def bn_relu(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, *, backend: str = "auto",
            sync: bool = False, process_group=None) -> torch.Tensor:
    """relu(bn(x)) for an nn.BatchNorm2d ``bn`` (its mode, statistics and parameters), storing only x for backward.

    x: (N, C, H, W) NCHW or channels_last, fp32/fp16/bf16. Output: x's layout, autocast dtype if autocast is on.
    """
    be = _runtime.resolve_backend(backend, x)
    p = bn_params(x, bn, backend=be, sync=sync, process_group=process_group)
    out = _BNReLUFunction.apply(x, bn.weight, bn.bias, p, be, compute_dtype(x), sync, process_group)
    return out
