"""BatchNorm + activation (ReLU, leaky ReLU or identity) with a recompute-in-backward autograd Function.

Forward ``y = act((x - mean) * rstd * gamma + beta)`` in one elementwise pass. Backward recomputes the
activation's mask from ``x`` and the per-channel (mean, rstd): it needs only x, never the normalised tensor or y.

    z        = (x - mean) * scale + beta,   scale = gamma * rstd
    g        = dy * act'(z):  relu [z > 0];  leaky_relu (z > 0 ? 1 : slope);  identity 1
    dbeta    = sum(g),  dgamma = rstd * sum(g * (x - mean))           (per channel, over N*H*W = M)
    dx       = scale * g - scale * dbeta / M - (x - mean) * scale * rstd * dgamma / M   (batch statistics)
    dx       = scale * g                                                               (running / frozen statistics)

Tensors: x, dy, y: (N, C, H, W), NCHW or channels_last, fp32/fp16/bf16 (y may be any float dtype, e.g. the
autocast dtype of a following conv); per-channel vectors fp32 of length C; all math in fp32.

The activation is a compile-time kernel parameter (``ACT``: :data:`ACTIVATIONS`, 0 relu, 1 leaky_relu,
2 identity: each is its own specialised kernel, ReLU's code unchanged) and the leaky slope a runtime fp32
scalar (one compiled kernel serves every slope). The names travel in :class:`BNParams` (``activation``,
``activation_param``); ``act'(0)`` is taken as the negative side's, as torch's relu/leaky_relu backward do.

Triton launches per BN-ReLU (training): statistics kernel + finalize kernel (merge, rstd, scale, running-stat
update) + forward kernel; backward: gradient-sums kernel + its finalize (dgamma, dbeta) + dx kernel. With
``sync`` the count stays on the device: no host synchronisation. The elementwise kernels run on 2-D tiles
of a (rows, cols) view of x: NCHW rows are (n, c) pairs (one channel per row, no per-element division),
channels_last rows are positions and columns channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _runtime
from . import plain as _plain  # export/trace in inference: plain aten ops
from .bn_stats import _dist_active, as_nchw_or_nhwc, channel_stats, finalize_stats, needs_int64, reduction_grid
from ._runtime import HAS_TRITON

# activation name -> the ACT constexpr of the kernels (here and in kernels/conv.py)
ACTIVATIONS = {"relu": 0, "leaky_relu": 1, "identity": 2}


def activation_code(activation: str) -> int:
    """The ``ACT`` constexpr for an activation name; ValueError for an unknown one."""
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}") from None


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .bn_stats import _element_offsets

    @triton.jit
    def _channel_of(rows, cols, C, CHANNELS_LAST: tl.constexpr):
        """Channel index vector of a (rows, cols) tile: per column (channels_last) or per row (NCHW row = n*C + c)."""
        if CHANNELS_LAST:
            ch = cols
        else:
            ch = rows % C
        return ch

    @triton.jit
    def _load_channel(ptr, ch, C):
        """fp32 per-channel values at the channel index vector ``ch`` (0 past C)."""
        return tl.load(ptr + ch, mask=ch < C, other=0.0).to(tl.float32)

    @triton.jit
    def _bcast(v, CHANNELS_LAST: tl.constexpr):
        """A per-channel vector shaped to broadcast over the tile: (1, BLOCK_L) or (BLOCK_R, 1)."""
        if CHANNELS_LAST:
            out = v[None, :]
        else:
            out = v[:, None]
        return out

    @triton.jit
    def _tile(R, L, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
        """rows, cols, element offsets (row * L + col) and mask of this program's (BLOCK_R, BLOCK_L) tile.

        Grid axis 0 (up to 2**31 - 1 programs) takes the long side: row blocks in channels_last (positions),
        column blocks in NCHW (H*W), so consecutive programs walk contiguous memory."""
        if CHANNELS_LAST:
            pid_r = tl.program_id(0)
            pid_l = tl.program_id(1)
        else:
            pid_r = tl.program_id(1)
            pid_l = tl.program_id(0)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = (rows < R)[:, None] & (cols < L)[None, :]
        if INT64:
            offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        else:
            offs = rows[:, None] * L + cols[None, :]
        return rows, cols, offs, mask

    @triton.jit
    def _act_fwd(z, slope, ACT: tl.constexpr):
        """act(z) in fp32: ACT 0 relu, 1 leaky_relu (negative slope ``slope``), 2 identity (see ACTIVATIONS).

        Leaky: z > 0 ? z : z * slope, as torch's leaky_relu (so -0.0 and NaN come out alike)."""
        if ACT == 0:
            y = tl.maximum(z, 0.0)
        elif ACT == 1:
            y = tl.where(z > 0.0, z, z * slope)
        else:
            y = z
        return y

    @triton.jit
    def _act_bwd(z, dy, slope, ACT: tl.constexpr):
        """dL/dz = dy * act'(z) from the recomputed pre-activation z: relu [z > 0], leaky (z > 0 ? 1 : slope)."""
        if ACT == 0:
            g = tl.where(z > 0.0, dy, 0.0)
        elif ACT == 1:
            g = tl.where(z > 0.0, dy, dy * slope)
        else:
            g = dy
        return g

    @triton.jit
    def _bn_relu_fwd_kernel(
        x_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, R, L, C, slope,
        ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """y = act((x - mean[c]) * scale[c] + beta[c]) over one tile of the (R, L) view of x."""
        rows, cols, offs, mask = _tile(R, L, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_L)
        ch = _channel_of(rows, cols, C, CHANNELS_LAST)
        # (x - mean) * scale + beta, not x * scale + (beta - mean * scale): no cancellation when |mean| >> std,
        # and the same z (so the same activation mask) as the backward and implicit-GEMM recomputations
        mean = _bcast(_load_channel(mean_ptr, ch, C), CHANNELS_LAST)
        scale = _bcast(_load_channel(scale_ptr, ch, C), CHANNELS_LAST)
        beta = _bcast(_load_channel(beta_ptr, ch, C), CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * scale + beta
        tl.store(y_ptr + offs, _act_fwd(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bn_relu_grad_sums_kernel(
        x_ptr, dy_ptr, mean_ptr, scale_ptr, beta_ptr, sum_g_ptr, sum_gx_ptr, M, C, HW, m_per_prog, slope,
        ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Partial per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(z) with z recomputed from x."""
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
            g = tl.where(mask, _act_bwd(xc * scale[None, :] + beta[None, :], dy, slope, ACT), 0.0)
            acc_g += g
            acc_gx += g * xc
        out = pid_m * C + cs
        tl.store(sum_g_ptr + out, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(sum_gx_ptr + out, tl.sum(acc_gx, axis=0), mask=cmask)

    @triton.jit
    def _grad_finalize_kernel(
        g_ptr, gx_ptr, K, C, rstd_ptr, out_ptr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Sum K partial rows (stride C) of sum(g), sum(g*(x-mean)); out rows: sum_g, sum_gx, dgamma, dbeta."""
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        acc_g = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (ks < K)[:, None] & cmask[None, :]
            offs = ks[:, None] * C + cs[None, :]
            acc_g += tl.load(g_ptr + offs, mask=mask, other=0.0)
            acc_gx += tl.load(gx_ptr + offs, mask=mask, other=0.0)
        sum_g = tl.sum(acc_g, axis=0)
        sum_gx = tl.sum(acc_gx, axis=0)
        tl.store(out_ptr + cs, sum_g, mask=cmask)
        tl.store(out_ptr + C + cs, sum_gx, mask=cmask)
        tl.store(out_ptr + 2 * C + cs, sum_gx * tl.load(rstd_ptr + cs, mask=cmask, other=0.0), mask=cmask)
        tl.store(out_ptr + 3 * C + cs, sum_g, mask=cmask)

    @triton.jit
    def _bn_relu_bwd_kernel(
        x_ptr, dy_ptr, dx_ptr, mean_ptr, scale_ptr, beta_ptr, rstd_ptr, sums_ptr, count_ptr, R, L, C, slope,
        ACT: tl.constexpr, BATCH_STATS: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """dx = scale * g [- scale / count * (sum_g + (x - mean) * rstd^2 * sum_gx)], g = dy * act'(z).

        sums_ptr: (2, C) group-wide (sum g, sum g*(x-mean)); count_ptr: the 0-dim element count per channel.
        """
        rows, cols, offs, mask = _tile(R, L, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_L)
        ch = _channel_of(rows, cols, C, CHANNELS_LAST)
        # per-channel coefficients on the channel vector, broadcast afterwards:
        # z = (x - mean) * scale + beta,  dx = scale * g + a * (x - mean) + b
        mean = _load_channel(mean_ptr, ch, C)
        scale = _load_channel(scale_ptr, ch, C)
        beta = _load_channel(beta_ptr, ch, C)
        if BATCH_STATS:
            rstd = _load_channel(rstd_ptr, ch, C)
            k = scale * tl.fdiv(1.0, tl.load(count_ptr).to(tl.float32), ieee_rounding=False)  # no slow-path call
            a = -k * rstd * rstd * _load_channel(sums_ptr + C, ch, C)
            b = -k * _load_channel(sums_ptr, ch, C)
        else:
            a = tl.zeros_like(scale)
            b = tl.zeros_like(scale)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - _bcast(mean, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_bwd(xc * _bcast(scale, CHANNELS_LAST) + _bcast(beta, CHANNELS_LAST), dy, slope, ACT)
        dx = _bcast(scale, CHANNELS_LAST) * g + _bcast(a, CHANNELS_LAST) * xc + _bcast(b, CHANNELS_LAST)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Elementwise tiles: 1024 elements, (BLOCK_R, BLOCK_L) = (64, 16) when rows are short (H*W or C <= 16), else
# (16, 64): at most 63 masked elements per row, 64-element (128-256 B) contiguous row segments. Each is an AOT variant.
ELEMENTWISE_TILE = 1024
NCHW_BLOCK_L = (16, 64)  # spatial positions per row segment
NHWC_BLOCK_L = (16, 64)  # channels per tile
GRAD_FINALIZE_BLOCK_K, GRAD_FINALIZE_BLOCK_C = 16, 64


def elementwise_tiling(shape: tuple[int, int, int, int], channels_last: bool) -> tuple[int, int, int, int]:
    """(R, L, BLOCK_R, BLOCK_L) of the (rows, cols) view of an (N, C, H, W) tensor: NCHW rows are (n, c) of
    length H*W, channels_last rows are positions of length C."""
    N, C, H, W = shape
    R, L = (N * H * W, C) if channels_last else (N * C, H * W)
    blocks = NHWC_BLOCK_L if channels_last else NCHW_BLOCK_L
    block_l = blocks[0] if L <= blocks[0] else blocks[1]
    return R, L, ELEMENTWISE_TILE // block_l, block_l


def _elementwise_grid(R: int, L: int, block_r: int, block_l: int, channels_last: bool) -> tuple[int, int]:
    """Grid of :func:`_tile`: (row blocks, column blocks) for channels_last, (column, row blocks) for NCHW."""
    rb, lb = triton.cdiv(R, block_r), triton.cdiv(L, block_l)
    grid = (rb, lb) if channels_last else (lb, rb)
    if grid[1] > 65535:
        raise ValueError(f"BN-ReLU grid {grid} exceeds CUDA's 65535 programs on axis 1 ({'C' if channels_last else 'N*C'} too large)")
    return grid


def _like(x: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, device=x.device, dtype=dtype, memory_format=fmt)


@dataclass
class BNParams:
    """Per-channel fp32 vectors of one BN-activation application (after statistics are known), and the activation.

    ``activation``: "relu" | "leaky_relu" | "identity"; ``activation_param``: the leaky negative slope (read only
    for leaky_relu). Both default to today's ReLU, so every BNParams built without them keeps its meaning."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor  # gamma, ones when the BN has no affine parameters
    bias: torch.Tensor  # beta, zeros likewise
    # elements per channel the statistics came from (all ranks when synced): an int, or a 0-dim fp32 device
    # tensor (triton backend; synchronised statistics) so that nothing waits for the device
    count: int | torch.Tensor
    batch_stats: bool  # True: mean/rstd depend on x (training), so dx gets the statistics terms
    cached_scale: torch.Tensor | None = field(default=None, repr=False)  # gamma * rstd when already computed
    activation: str = "relu"
    activation_param: float = 0.01

    @property
    def act(self) -> int:
        """The kernels' ``ACT`` constexpr (:data:`ACTIVATIONS`)."""
        return activation_code(self.activation)

    @property
    def slope(self) -> float:
        """The runtime fp32 slope the kernels take (0.0 unless leaky_relu: it is not read then)."""
        return float(self.activation_param) if self.activation == "leaky_relu" else 0.0

    @property
    def scale(self) -> torch.Tensor:
        if self.cached_scale is None:
            self.cached_scale = self.weight * self.rstd
        return self.cached_scale


def _unbiased_factor(count: int | torch.Tensor) -> float | torch.Tensor:
    if isinstance(count, torch.Tensor):
        return count / (count - 1).clamp_min(1)
    return count / max(count - 1, 1)


def bn_params(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, *, backend: str,
              sync: bool = False, process_group=None, activation: str = "relu",
              activation_param: float = 0.01) -> BNParams:
    """Statistics for ``bn`` applied to ``x`` following nn.BatchNorm2d's rules; updates running stats in training.

    Triton backend: one statistics kernel and one finalize kernel (two and an all_gather with ``sync``), no
    host synchronisation; ``count`` is then a 0-dim device tensor. ``activation``/``activation_param`` are
    carried in the returned BNParams for the forward/backward that use it.
    """
    activation_code(activation)  # refuse an unknown name before any statistics are updated
    act = dict(activation=activation, activation_param=float(activation_param))
    C = x.shape[1]
    use_batch = bn.training or bn.running_mean is None
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    if backend == "triton":
        return _bn_params_triton(x, bn, use_batch, track, sync, process_group, **act)
    # fp32 math (fp64 for fp64 inputs on the torch path, which makes it an exact oracle in tests)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = bn.weight.detach().to(dt) if bn.weight is not None else x.new_ones(C, dtype=dt)
    bias = bn.bias.detach().to(dt) if bn.bias is not None else x.new_zeros(C, dtype=dt)
    if not use_batch:
        return BNParams(bn.running_mean.to(dt), torch.rsqrt(bn.running_var.to(dt) + bn.eps), weight, bias,
                        x.numel() // C, False, **act)
    with torch.no_grad():  # the backward formula accounts for the statistics; no graph through them
        mean, var, count = channel_stats(x, backend=backend, sync=sync, process_group=process_group)
    mean, var = mean.to(dt), var.to(dt)
    if track:
        _update_running_torch(bn, mean, var, count)
    return BNParams(mean, torch.rsqrt(var + bn.eps), weight, bias, count, True, **act)


def _update_running_torch(bn, mean: torch.Tensor, var: torch.Tensor, count: int | torch.Tensor) -> None:
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        if bn.momentum is not None:
            factor = bn.momentum
        else:  # 1 / num_batches_tracked as a tensor: no host sync
            factor = bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal()
        unbiased = var * _unbiased_factor(count)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def _bn_params_triton(x, bn, use_batch: bool, track: bool, sync: bool, process_group, **act) -> BNParams:
    C = x.shape[1]
    fp32_buffers = bn.running_mean is not None and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    in_kernel = track and fp32_buffers  # running-stat update inside the finalize kernel
    if in_kernel:
        bn.num_batches_tracked.add_(1)  # first: with momentum=None the kernel reads 1 / num_batches_tracked
    running = (bn.running_mean, bn.running_var) if (in_kernel or not use_batch) else None
    if running is not None and not fp32_buffers:
        running = (bn.running_mean.float(), bn.running_var.float())
    out = finalize_stats(x, weight=bn.weight, eps=bn.eps, sync=sync, process_group=process_group,
                         running=running, momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked,
                         use_running=not use_batch)
    mean, var, rstd, scale, count = out.unbind(0)
    count = count[0] if use_batch else x.numel() // C
    if track and not in_kernel:  # running statistics kept in another dtype: plain torch update
        _update_running_torch(bn, mean, var, count)
    weight = bn.weight.detach().float() if bn.weight is not None else x.new_ones(C, dtype=torch.float32)
    bias = bn.bias.detach().float() if bn.bias is not None else x.new_zeros(C, dtype=torch.float32)
    return BNParams(mean, rstd, weight, bias, count, use_batch, cached_scale=scale, **act)


def bn_relu_forward(x: torch.Tensor, p: BNParams, *, backend: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """act(bn(x)) with known statistics (activation from ``p``); same layout as x, dtype ``out_dtype``
    (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if backend != "triton":
        shape = (1, -1, 1, 1)
        z = (x.to(p.mean.dtype) - p.mean.view(shape)) * p.scale.view(shape) + p.bias.view(shape)
        return _act_torch(z, p).to(out_dtype)
    x, channels_last = as_nchw_or_nhwc(x)
    y = _like(x, channels_last, out_dtype)
    R, L, block_r, block_l = elementwise_tiling(x.shape, channels_last)
    _bn_relu_fwd_kernel[_elementwise_grid(R, L, block_r, block_l, channels_last)](
        x, y, p.mean.contiguous(), p.scale.contiguous(), p.bias.contiguous(), R, L, x.shape[1], p.slope,
        ACT=p.act, CHANNELS_LAST=channels_last, INT64=needs_int64(x), BLOCK_R=block_r, BLOCK_L=block_l,
    )
    return y


def _act_torch(z: torch.Tensor, p: BNParams) -> torch.Tensor:
    """act(z) in place where possible (the torch backend's forward; z is a temporary)."""
    if p.act == ACTIVATIONS["relu"]:
        return torch.relu_(z)
    if p.act == ACTIVATIONS["leaky_relu"]:
        return torch.nn.functional.leaky_relu_(z, p.slope)
    return z


def _act_grad_torch(z: torch.Tensor, dy: torch.Tensor, act: int, slope: float) -> torch.Tensor:
    """dy * act'(z) (torch backend): the recomputed mask; leaky's negative side scaled by the slope."""
    if act == ACTIVATIONS["relu"]:
        return torch.where(z > 0, dy, 0.0)
    if act == ACTIVATIONS["leaky_relu"]:
        return torch.where(z > 0, dy, dy * slope)
    return dy


def _grad_sums_triton(x: torch.Tensor, dy: torch.Tensor, p: BNParams, channels_last: bool,
                      sums: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(4, C) fp32 rows: sum(g), sum(g * (x - mean)), dgamma, dbeta with g = dy * act'(z) (local sums).

    ``sums``: the first two rows already computed elsewhere (then no reduction pass over x)."""
    N, C, H, W = x.shape
    if sums is None:
        block_m, block_c, c_blocks, splits, m_per_prog = reduction_grid(x, channels_last)
        part = torch.empty((2, splits, C), device=x.device, dtype=torch.float32)
        _bn_relu_grad_sums_kernel[(c_blocks, splits)](
            x, dy, p.mean.contiguous(), p.scale.contiguous(), p.bias.contiguous(), part[0], part[1],
            N * H * W, C, H * W, m_per_prog, p.slope,
            ACT=p.act, CHANNELS_LAST=channels_last, INT64=needs_int64(x), BLOCK_M=block_m, BLOCK_C=block_c,
        )
        g, gx, k = part[0], part[1], splits
    else:  # (C,) sums, or (K, C) partial sums
        g, gx = sums[0].float().contiguous(), sums[1].float().contiguous()
        k = g.shape[0] if g.dim() == 2 else 1
    out = torch.empty((4, C), device=x.device, dtype=torch.float32)
    _grad_finalize_kernel[(triton.cdiv(C, GRAD_FINALIZE_BLOCK_C),)](
        g, gx, k, C, p.rstd.contiguous(), out, BLOCK_K=GRAD_FINALIZE_BLOCK_K, BLOCK_C=GRAD_FINALIZE_BLOCK_C,
    )
    return out


def bn_relu_backward(
    x: torch.Tensor, dy: torch.Tensor, p: BNParams, *, backend: str, need_dx: bool = True,
    sync: bool = False, process_group=None, sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad_wrt_z: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta) of y = act(bn(x)) given dy, recomputing the activation's mask from x
    (activation from ``p``: relu [z > 0], leaky_relu (z > 0 ? 1 : slope), identity 1).

    dx has x's dtype and layout; dgamma/dbeta are fp32. With ``sync`` the two per-channel sums are
    all-reduced first (as the statistics were), like SyncBatchNorm. ``sums``: per-channel (sum g,
    sum g*(x-mean)) already computed elsewhere (the implicit-GEMM dgrad epilogue), skipping that pass.
    ``grad_wrt_z``: ``dy`` is already dL/dz, act' applied (the dgrad epilogue's output), so dx must not apply
    it again: harmless for relu (a 0/1 mask applied twice: today's kernel kept) and identity, a second factor
    ``slope`` on leaky_relu's negative side, which then runs the dx pass as identity.
    """
    shape = (1, -1, 1, 1)
    do_sync = sync and p.batch_stats and _dist_active(True)
    act = ACTIVATIONS["identity"] if (grad_wrt_z and p.act == ACTIVATIONS["leaky_relu"]) else p.act
    if backend == "triton":
        x, channels_last = as_nchw_or_nhwc(x)
        dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        red = _grad_sums_triton(x, dy, p, channels_last, sums)
        dgamma, dbeta = red[2], red[3]
        if not need_dx:
            return None, dgamma, dbeta
        if do_sync:  # parameter gradients stay local (DDP averages them); dx uses the group-wide sums
            torch.distributed.all_reduce(red[:2], group=process_group)
        count = p.count if p.batch_stats else p.rstd  # read only with batch statistics
        if not isinstance(count, torch.Tensor):  # a BNParams built elsewhere with an int count
            count = torch.full((), float(count), device=x.device, dtype=torch.float32)
        dx = _like(x, channels_last, x.dtype)
        R, L, block_r, block_l = elementwise_tiling(x.shape, channels_last)
        _bn_relu_bwd_kernel[_elementwise_grid(R, L, block_r, block_l, channels_last)](
            x, dy, dx, p.mean.contiguous(), p.scale.contiguous(), p.bias.contiguous(), p.rstd.contiguous(),
            red, count, R, L, x.shape[1], p.slope,
            ACT=act, BATCH_STATS=p.batch_stats, CHANNELS_LAST=channels_last, INT64=needs_int64(x),
            BLOCK_R=block_r, BLOCK_L=block_l,
        )
        return dx, dgamma, dbeta
    xc = x.to(p.mean.dtype) - p.mean.view(shape)
    g = _act_grad_torch(xc * p.scale.view(shape) + p.bias.view(shape), dy.to(p.mean.dtype), act, p.slope)
    if sums is None:
        sum_g, sum_gx = g.sum((0, 2, 3)), (g * xc).sum((0, 2, 3))
    else:
        sum_g, sum_gx = sums
    dbeta, dgamma = sum_g, sum_gx * p.rstd
    if not need_dx:
        return None, dgamma, dbeta
    if do_sync:
        both = torch.stack([sum_g, sum_gx])
        torch.distributed.all_reduce(both, group=process_group)
        sum_g, sum_gx = both[0], both[1]
    scale = p.scale
    dx = scale.view(shape) * g
    if p.batch_stats:
        k_x = -scale * p.rstd * p.rstd * sum_gx / p.count
        k_0 = -scale * sum_g / p.count
        dx = dx + k_x.view(shape) * xc + k_0.view(shape)
    return dx.to(x.dtype), dgamma, dbeta


def compute_dtype(x: torch.Tensor, fallback: torch.dtype | None = None) -> torch.dtype:
    """The dtype the op after BN-ReLU computes in: the autocast dtype when autocast is on, else ``fallback``/x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return fallback or x.dtype


class _BNReLUFunction(torch.autograd.Function):
    """y = act(bn(x)) saving only x (statistics and the activation live in the BNParams on ctx)."""

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
            sync: bool = False, process_group=None, activation: str = "relu",
            activation_param: float = 0.01) -> torch.Tensor:
    """act(bn(x)) for an nn.BatchNorm2d ``bn`` (its mode, statistics and parameters), storing only x for backward.

    x: (N, C, H, W) NCHW or channels_last, fp32/fp16/bf16. Output: x's layout, autocast dtype if autocast is on.
    ``activation``: "relu" (default), "leaky_relu" (negative slope ``activation_param``) or "identity".
    """
    activation_code(activation)  # an unknown name fails here, on every path
    if _plain.exporting() and _plain.take_plain(bn, "kernels.bn_relu"):  # export/trace for inference (plain.py)
        return _plain.bn_act_plain(x, bn, activation, activation_param, compute_dtype(x))
    be = _runtime.resolve_backend(backend, x)
    if torch.compiler.is_compiling() and not sync:  # one opaque custom op per step for Dynamo (kernels/ops.py)
        from .ops import bn_relu_via_ops

        return bn_relu_via_ops(x, bn, be, compute_dtype(x), activation, activation_param)
    p = bn_params(x, bn, backend=be, sync=sync, process_group=process_group, activation=activation,
                  activation_param=activation_param)
    out = _BNReLUFunction.apply(x, bn.weight, bn.bias, p, be, compute_dtype(x), sync, process_group)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (kernels/aot.py compiles each for sm_80 and sm_90 in CI)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (x dtype, y / dy dtype): the same, or fp32 x feeding an fp16/bf16 autocast op (y and its gradient in that dtype)
DTYPE_COMBOS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                (torch.float32, torch.float16), (torch.float32, torch.bfloat16))


def _aot_acts(int64: bool) -> list[tuple[int, str]]:
    """(ACT, label suffix) compiled ahead of time for a variant: ReLU everywhere; leaky_relu and identity with
    int32 offsets only (the INT64 offset arithmetic does not depend on ACT, and it halves the added variants)."""
    return [(code, "" if name == "relu" else f" {name}") for name, code in ACTIVATIONS.items()
            if name == "relu" or not int64]


def aot_variants() -> list:
    """Every (kernel, dtypes, flags, tile) the CUDA launchers of this module can choose, as kernels.aot.Variant.

    Launches use Triton's defaults (4 warps, 3 stages); the tiles are those of :func:`elementwise_tiling`
    and :func:`kernels.bn_stats.tile_sizes` for every channel count / spatial size. Activations: ReLU on every
    variant, leaky_relu and identity on every dtype, layout and tile with int32 offsets (see :func:`_aot_acts`).
    """
    from .aot import Variant
    from .bn_stats import tile_sizes

    out = []
    ew = {s: "i32" for s in ("R", "L", "C")}
    for xdt, ydt in DTYPE_COMBOS:
        xs, ys = _DTYPES[xdt], _DTYPES[ydt]
        for cl in (False, True):
            blocks = NHWC_BLOCK_L if cl else NCHW_BLOCK_L
            for block_l in blocks:
                for int64 in (False, True):
                    for act, act_label in _aot_acts(int64):
                        tile = dict(ACT=act, CHANNELS_LAST=cl, INT64=int64, BLOCK_R=ELEMENTWISE_TILE // block_l,
                                    BLOCK_L=block_l)
                        cfg = (f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} "
                               f"{ELEMENTWISE_TILE // block_l}x{block_l}{act_label}")
                        sig = {"x_ptr": f"*{xs}", "y_ptr": f"*{ys}", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
                               "beta_ptr": "*fp32", **ew, "slope": "fp32"}
                        out.append(Variant(_bn_relu_fwd_kernel, sig, tile, kernel="bn_relu_forward",
                                           dtypes=f"x={xs} y={ys}", config=cfg))
                        for batch in (True, False):
                            sig = {"x_ptr": f"*{xs}", "dy_ptr": f"*{ys}", "dx_ptr": f"*{xs}", "mean_ptr": "*fp32",
                                   "scale_ptr": "*fp32", "beta_ptr": "*fp32", "rstd_ptr": "*fp32",
                                   "sums_ptr": "*fp32", "count_ptr": "*fp32", **ew, "slope": "fp32"}
                            out.append(Variant(_bn_relu_bwd_kernel, sig, dict(BATCH_STATS=batch, **tile),
                                               kernel="bn_relu_backward", dtypes=f"x={xs} dy={ys}",
                                               config=f"{cfg}{' batch' if batch else ' running'}"))
            for block_m, block_c in sorted({tile_sizes(c, cl) for c in (1, 16, 17, 4096)}):
                for int64 in (False, True):
                    for act, act_label in _aot_acts(int64):
                        sig = {"x_ptr": f"*{xs}", "dy_ptr": f"*{ys}", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
                               "beta_ptr": "*fp32", "sum_g_ptr": "*fp32", "sum_gx_ptr": "*fp32",
                               **{s: "i32" for s in ("M", "C", "HW", "m_per_prog")}, "slope": "fp32"}
                        out.append(Variant(_bn_relu_grad_sums_kernel, sig,
                                           dict(ACT=act, CHANNELS_LAST=cl, INT64=int64, BLOCK_M=block_m,
                                                BLOCK_C=block_c),
                                           kernel="bn_relu_grad_sums", dtypes=f"x={xs} dy={ys}",
                                           config=f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} "
                                                  f"{block_m}x{block_c}{act_label}"))
    sig = {"g_ptr": "*fp32", "gx_ptr": "*fp32", "K": "i32", "C": "i32", "rstd_ptr": "*fp32", "out_ptr": "*fp32"}
    out.append(Variant(_grad_finalize_kernel, sig, dict(BLOCK_K=GRAD_FINALIZE_BLOCK_K, BLOCK_C=GRAD_FINALIZE_BLOCK_C),
                       kernel="bn_relu_grad_finalize", dtypes="fp32", config=f"{GRAD_FINALIZE_BLOCK_K}x{GRAD_FINALIZE_BLOCK_C}"))
    return out
