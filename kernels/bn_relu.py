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
scalar. Whether the per-channel parameters come from batch statistics (the (5, C) STAT_ROWS buffer of
:mod:`kernels.bn_stats`) or from the running statistics (frozen BN and eval: rstd computed inline from
running_var and eps, no statistics launch at all) is a runtime flag, as are the affine parameters' presence
and, in the gradient-sums kernel, whether it also writes dx: per-tile uniform branches on a few per-channel
loads, one compiled kernel for all of them.

Triton launches per BN-activation training step (see :func:`bn_relu`):

    batch statistics   forward: statistics (finalised in-kernel) + apply;  backward: gradient sums + dx   = 4
    frozen / eval      forward: apply;  backward: gradient sums that also write dx                       = 2

(:func:`kernels.bn_relu_conv` adds one recomputed apply in backward: 5 and 3.) The reductions finalise in their
last program (an atomic ticket, partials merged in index order: deterministic), so no finalize launch and no
host synchronisation exist; launches go through :mod:`kernels.launch` plans (the compiled kernel called directly).
The elementwise kernels run on 4096-element 2-D tiles of a (rows, cols) view of x: NCHW rows are (n, c) pairs
(one channel per row, no per-element division), channels_last rows are positions and columns channels.
"""

from __future__ import annotations

import torch

from ._common import (
    ACTIVATIONS,
    TRITON_DTYPES,
    activation_code,
    as_nchw_or_nhwc,
    cdiv,  # noqa: F401 (re-exported)
)
from ._runtime import HAS_TRITON
from .bn_stats import (
    ROW,
    STAT_ROWS,
    _aligned,
    _dist_active,
    channel_stats,
    finalize_stats,
    gather_stats,
    launch_stats,
    scratch,
)
from .launch import Kernel
from .opspec import Arg, OpSpec, memory_format
from .tiles import (
    ELEMENTWISE_WARPS,
    STATS_WARPS,  # noqa: F401
    Variant,
    bn_variant_tiles,
    geometry,
    merge_k,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _act_bwd, _act_fwd, _chan_combine, _element_offsets
    from .bn_stats import _derive, _write_rows

    _PARAM_FLAGS = ["running", "has_affine"]
    # per-channel vectors and scratch: small loads, never worth an alignment specialisation (the launch plans then
    # only check the alignment of x, y, dy, dx)
    _VECTORS = ["stats_ptr", "w_ptr", "b_ptr", "rmean_ptr", "rvar_ptr", "part_ptr", "tick_ptr", "red_ptr"]

    @triton.jit
    def _channel_params(ch, C, stats_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr, eps, running, has_affine):
        """(mean, scale, beta, rstd) fp32 at channel indices ``ch`` (0 past C): from the STAT_ROWS buffer, or with
        ``running`` from running_mean/running_var (rstd = 1/sqrt(var + eps) inline) and gamma."""
        cm = ch < C
        if running != 0:
            mean = tl.load(rmean_ptr + ch, mask=cm, other=0.0)
            rstd = 1.0 / tl.sqrt(tl.load(rvar_ptr + ch, mask=cm, other=1.0) + eps)
            scale = rstd
            if has_affine != 0:
                scale = tl.load(w_ptr + ch, mask=cm, other=0.0).to(tl.float32) * rstd
        else:
            mean = tl.load(stats_ptr + ch, mask=cm, other=0.0)
            rstd = tl.load(stats_ptr + 2 * C + ch, mask=cm, other=0.0)
            scale = tl.load(stats_ptr + 3 * C + ch, mask=cm, other=0.0)
        beta = tl.zeros_like(mean)
        if has_affine != 0:
            beta = tl.load(b_ptr + ch, mask=cm, other=0.0).to(tl.float32)
        return mean, scale, beta, rstd

    @triton.jit
    def _bcast(v, CHANNELS_LAST: tl.constexpr):
        """A per-channel vector shaped to broadcast over the tile: (1, BLOCK_L) or (BLOCK_R, 1)."""
        if CHANNELS_LAST:
            out = v[None, :]
        else:
            out = v[:, None]
        return out

    @triton.jit
    def _tile(R, L, C, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
        """channel vector, element offsets (row * L + col) and mask of this program's (BLOCK_R, BLOCK_L) tile.

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
        if CHANNELS_LAST:
            ch = cols
        else:
            ch = rows % C
        return ch, offs, mask

    @triton.jit(do_not_specialize=_PARAM_FLAGS, do_not_specialize_on_alignment=_VECTORS[:5])
    def _bn_act_fwd_kernel(
        x_ptr,
        y_ptr,
        stats_ptr,
        w_ptr,
        b_ptr,
        rmean_ptr,
        rvar_ptr,
        eps,
        R,
        L,
        C,
        slope,
        running,
        has_affine,
        ACT: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """y = act((x - mean[c]) * scale[c] + beta[c]) over one tile of the (R, L) view of x."""
        ch, offs, mask = _tile(R, L, C, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_L)
        # (x - mean) * scale + beta, not x * scale + (beta - mean * scale): no cancellation when |mean| >> std,
        # and the same z (so the same activation mask) as the backward and implicit-GEMM recomputations
        mean, scale, beta, _rstd = _channel_params(
            ch, C, stats_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr, eps, running, has_affine
        )
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - _bcast(mean, CHANNELS_LAST)) * _bcast(scale, CHANNELS_LAST) + _bcast(beta, CHANNELS_LAST)
        tl.store(y_ptr + offs, _act_fwd(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(
        do_not_specialize=["has_affine", "update", "cumulative"],
        do_not_specialize_on_alignment=["g_ptr", "stats_ptr", "w_ptr", "b_ptr", "rmean_ptr", "rvar_ptr", "nbt_ptr"],
    )
    def _bn_act_fwd_gathered_kernel(
        x_ptr,
        y_ptr,
        g_ptr,
        K,
        stats_ptr,
        w_ptr,
        b_ptr,
        rmean_ptr,
        rvar_ptr,
        nbt_ptr,
        eps,
        momentum,
        R,
        L,
        C,
        slope,
        has_affine,
        update,
        cumulative,
        ACT: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Sync BN's forward with the finalize folded in: each program Chan-merges the K ranks' (count, mean, M2)
        rows (g_ptr (K, 3, C), in rank order: every program gets the same bits) for its channels and applies
        y = act((x - mean) * scale + beta); the programs that own a channel (the first row block in
        channels_last, rows n = 0 of the first column block in NCHW: each channel exactly once) write its
        STAT_ROWS (stats_ptr (5, C)) and, with ``update``, move the running statistics (num_batches_tracked was
        already incremented by this step's statistics kernel, so the cumulative factor reads it minus one)."""
        ch, offs, mask = _tile(R, L, C, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_L)
        cm = ch < C
        mean = tl.zeros(ch.shape, dtype=tl.float32)
        m2 = tl.zeros(ch.shape, dtype=tl.float32)
        count = tl.zeros(ch.shape, dtype=tl.float32)
        for k in range(0, K):
            base = g_ptr + k * 3 * C + ch
            n = tl.load(base, mask=cm, other=0.0)
            mu = tl.load(base + C, mask=cm, other=0.0)
            q = tl.load(base + 2 * C, mask=cm, other=0.0)
            mean, m2, count = _chan_combine(mean, m2, count, mu, q, n)
        var, rstd, scale = _derive(m2, count, ch, cm, w_ptr, eps, has_affine)
        beta = tl.zeros_like(mean)
        if has_affine != 0:
            beta = tl.load(b_ptr + ch, mask=cm, other=0.0).to(tl.float32)
        first = (ch * 0 + tl.program_id(0)) == 0  # a vector, so the mask stays a boolean tensor
        if CHANNELS_LAST:
            own = cm & first
        else:
            own = cm & first & ((tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)) < C)
        nbt_old = tl.load(nbt_ptr) - 1
        _write_rows(
            mean,
            m2,
            count,
            var,
            rstd,
            scale,
            ch,
            own,
            C,
            stats_ptr,
            rmean_ptr,
            rvar_ptr,
            nbt_old,
            momentum,
            update,
            cumulative,
        )
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - _bcast(mean, CHANNELS_LAST)) * _bcast(scale, CHANNELS_LAST) + _bcast(beta, CHANNELS_LAST)
        tl.store(y_ptr + offs, _act_fwd(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_PARAM_FLAGS + ["write_dx"], do_not_specialize_on_alignment=_VECTORS)
    def _bn_act_grad_sums_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        stats_ptr,
        w_ptr,
        b_ptr,
        rmean_ptr,
        rvar_ptr,
        eps,
        part_ptr,
        tick_ptr,
        red_ptr,
        M,
        C,
        HW,
        m_per_prog,
        slope,
        running,
        has_affine,
        write_dx,
        ACT: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        MERGE_K: tl.constexpr,
    ):
        """Per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(z) with z recomputed from x; grid (channel
        blocks, splits). Each program accumulates per lane and reduces once; the last program of a channel block
        (ticket) sums the partials in index order and writes red_ptr (4, C): sum_g, sum_gx, dgamma, dbeta.
        ``write_dx`` (running statistics only, where dx needs no sums): also dx = scale * g."""
        pid_c = tl.program_id(0)
        pid_m = tl.program_id(1)
        n_splits = tl.num_programs(1)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, scale, beta, rstd = _channel_params(
            cs, C, stats_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr, eps, running, has_affine
        )
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
            if write_dx != 0:
                tl.store(dx_ptr + offs, (scale[None, :] * g).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + pid_m * C + cs, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(part_ptr + (n_splits + pid_m) * C + cs, tl.sum(acc_gx, axis=0), mask=cmask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
        ticket = tl.atomic_add(tick_ptr + pid_c, 1, sem="acq_rel")
        if ticket == n_splits - 1:
            tl.store(tick_ptr + pid_c, 0)
            sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k0 in range(0, n_splits, MERGE_K):  # index order: the same sums whichever program is last
                ks = k0 + tl.arange(0, MERGE_K)
                kmask = (ks < n_splits)[:, None] & cmask[None, :]
                offs = ks[:, None] * C + cs[None, :]
                sum_g += tl.sum(tl.load(part_ptr + offs, mask=kmask, other=0.0, cache_modifier=".cg"), axis=0)
                sum_gx += tl.sum(
                    tl.load(part_ptr + n_splits * C + offs, mask=kmask, other=0.0, cache_modifier=".cg"), axis=0
                )
            tl.store(red_ptr + cs, sum_g, mask=cmask)
            tl.store(red_ptr + C + cs, sum_gx, mask=cmask)
            tl.store(red_ptr + 2 * C + cs, sum_gx * rstd, mask=cmask)
            tl.store(red_ptr + 3 * C + cs, sum_g, mask=cmask)

    @triton.jit(
        do_not_specialize=_PARAM_FLAGS + ["batch_stats"], do_not_specialize_on_alignment=_VECTORS[:5] + ["red_ptr"]
    )
    def _bn_act_bwd_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        stats_ptr,
        w_ptr,
        b_ptr,
        rmean_ptr,
        rvar_ptr,
        eps,
        red_ptr,
        R,
        L,
        C,
        slope,
        running,
        has_affine,
        batch_stats,
        ACT: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """dx = scale * g [- scale / count * (sum_g + (x - mean) * rstd^2 * sum_gx)], g = dy * act'(z).

        red_ptr: (2+, C) group-wide (sum g, sum g*(x-mean)); the count is row ``count`` of the statistics."""
        ch, offs, mask = _tile(R, L, C, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_L)
        # per-channel coefficients on the channel vector, broadcast afterwards:
        # z = (x - mean) * scale + beta,  dx = scale * g + a * (x - mean) + b
        mean, scale, beta, rstd = _channel_params(
            ch, C, stats_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr, eps, running, has_affine
        )
        a = tl.zeros_like(scale)
        b = tl.zeros_like(scale)
        if batch_stats != 0:
            cm = ch < C
            k = scale * tl.fdiv(1.0, tl.load(stats_ptr + 4 * C), ieee_rounding=False)  # no slow-path call
            a = -k * rstd * rstd * tl.load(red_ptr + C + ch, mask=cm, other=0.0)
            b = -k * tl.load(red_ptr + ch, mask=cm, other=0.0)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - _bcast(mean, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_bwd(xc * _bcast(scale, CHANNELS_LAST) + _bcast(beta, CHANNELS_LAST), dy, slope, ACT)
        dx = _bcast(scale, CHANNELS_LAST) * g + _bcast(a, CHANNELS_LAST) * xc + _bcast(b, CHANNELS_LAST)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    APPLY = Kernel(_bn_act_fwd_kernel)
    APPLY_GATHERED = Kernel(_bn_act_fwd_gathered_kernel)
    GRAD_SUMS = Kernel(_bn_act_grad_sums_kernel)
    DX = Kernel(_bn_act_bwd_kernel)


def _like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor with x's strides (x dense, NCHW or channels_last) in ``dtype``. ``empty_like``
    keeps a dense tensor's strides and costs a third of ``torch.empty(..., memory_format=...)`` on the host."""
    return torch.empty_like(x, dtype=dtype)


class BNParams:
    """Per-channel parameters of one BN-activation application (after statistics are known), and the activation.

    Three forms, one interface (``mean``, ``rstd``, ``scale`` = gamma * rstd, ``gamma``, ``beta``, ``count``):

    - vectors (the constructor): any dtype (fp64 on the torch path), built by the torch backend and by callers;
    - :meth:`from_stats`: the (5, C) fp32 STAT_ROWS buffer the statistics kernel wrote (triton, batch statistics);
    - :meth:`from_running`: references to running_mean/running_var and eps (triton, frozen/eval statistics): the
      kernels compute rstd inline, nothing is launched or allocated for them.

    Views and vectors are derived lazily, so the hot path never pays for them. ``weight``/``bias``: gamma and beta
    (the module's tensors, or None for a BN without affine parameters). ``count``: elements per channel the
    statistics came from (all ranks when synced), always a 0-dim tensor on the statistics' device, of their dtype
    (never copied to the host). Running statistics have x's elements per channel there, which no formula reads.
    ``activation``: "relu" | "leaky_relu" | "identity"; ``activation_param``: the leaky negative slope."""

    __slots__ = (
        "_mean",
        "_rstd",
        "_scale",
        "_count",
        "_per_channel",
        "weight",
        "bias",
        "batch_stats",
        "stats",
        "running",
        "activation",
        "activation_param",
        "act",
        "slope",
        "_kp",
        "gathered",
    )

    def __init__(
        self,
        mean,
        rstd,
        weight,
        bias,
        count,
        batch_stats: bool,
        cached_scale=None,
        activation: str = "relu",
        activation_param: float = 0.01,
    ):
        self._mean, self._rstd, self._scale, self._count = mean, rstd, cached_scale, count
        self._per_channel = 0
        self.weight, self.bias, self.batch_stats = weight, bias, batch_stats
        self.stats = self.running = self._kp = self.gathered = None
        self.activation, self.activation_param = activation, activation_param
        self.act = activation_code(activation)  # the kernels' ACT constexpr
        # the runtime fp32 slope the kernels take (0.0 unless leaky_relu: it is not read then)
        self.slope = float(activation_param) if activation == "leaky_relu" else 0.0

    @classmethod
    def from_stats(
        cls,
        stats: torch.Tensor,
        weight,
        bias,
        batch_stats: bool = True,
        activation: str = "relu",
        activation_param: float = 0.01,
        count=None,
    ) -> "BNParams":
        p = cls(None, None, weight, bias, count, batch_stats, None, activation, activation_param)
        p.stats = stats
        return p

    @classmethod
    def from_running(
        cls,
        running_mean,
        running_var,
        eps: float,
        weight,
        bias,
        per_channel: int,
        activation: str = "relu",
        activation_param: float = 0.01,
    ) -> "BNParams":
        """``per_channel``: x's elements per channel, what :attr:`count` then holds (made only if asked)."""
        p = cls(None, None, weight, bias, None, False, None, activation, activation_param)
        p.running = (running_mean, running_var, float(eps))
        p._per_channel = per_channel
        return p

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            self._mean = self.stats[ROW["mean"]] if self.stats is not None else self.running[0].float()
        return self._mean

    @property
    def rstd(self) -> torch.Tensor:
        if self._rstd is None:
            self._rstd = (
                self.stats[ROW["rstd"]]
                if self.stats is not None
                else torch.rsqrt(self.running[1].float() + self.running[2])
            )
        return self._rstd

    @property
    def scale(self) -> torch.Tensor:
        if self._scale is None:
            if self.stats is not None:
                self._scale = self.stats[ROW["scale"]]
            else:
                self._scale = self.rstd if self.weight is None else self.weight.detach().to(self.rstd.dtype) * self.rstd
        return self._scale

    @property
    def count(self) -> torch.Tensor:
        if self._count is None:
            if self.stats is not None:
                self._count = self.stats[ROW["count"], 0]
            else:
                # running statistics (:meth:`from_running`): no formula reads their count (frozen statistics have
                # no gradient through them), so it is made here on first use rather than per call on the frozen
                # hot path, which launches and allocates nothing for it; filled on the device (no host copy)
                self._count = self.running[0].new_full((), self._per_channel, dtype=torch.float32)
        return self._count

    @property
    def gamma(self) -> torch.Tensor:
        return self.weight.detach().to(self.mean.dtype) if self.weight is not None else torch.ones_like(self.mean)

    @property
    def beta(self) -> torch.Tensor:
        return self.bias.detach().to(self.mean.dtype) if self.bias is not None else torch.zeros_like(self.mean)

    def kernel_stats(self) -> torch.Tensor:
        """The (5, C) fp32 STAT_ROWS buffer the kernels read (built once from the vectors when needed)."""
        if self.stats is None:
            f = [
                self.mean.float(),
                torch.zeros_like(self.mean, dtype=torch.float32),
                self.rstd.float(),
                self.scale.float(),
                self.count.float().expand(self.mean.shape[0]),
            ]
            self.stats = torch.stack(f)
        return self.stats


def bn_params(
    x: torch.Tensor,
    bn: torch.nn.modules.batchnorm._BatchNorm,
    *,
    backend: str,
    sync: bool = False,
    process_group=None,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> BNParams:
    """Statistics for ``bn`` applied to ``x`` following nn.BatchNorm2d's rules; updates running stats in training.

    Triton backend: batch statistics are one launch (statistics finalised in-kernel, running statistics and
    num_batches_tracked updated there; two and an all_gather with ``sync``), no host synchronisation, ``count``
    a 0-dim device tensor; frozen/eval statistics launch nothing (the kernels read the running buffers).
    ``activation``/``activation_param`` are carried in the returned BNParams for the forward/backward that use it.
    """
    activation_code(activation)  # refuse an unknown name before any statistics are updated
    if backend == "triton":
        return _bn_params_triton(x, bn, sync, process_group, activation, float(activation_param))
    act = dict(activation=activation, activation_param=float(activation_param))
    C = x.shape[1]
    use_batch = bn.training or bn.running_mean is None
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    # fp32 math (fp64 for fp64 inputs on the torch path, which makes it an exact oracle in tests)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = bn.weight.detach().to(dt) if bn.weight is not None else x.new_ones(C, dtype=dt)
    bias = bn.bias.detach().to(dt) if bn.bias is not None else x.new_zeros(C, dtype=dt)
    if not use_batch:  # the count (read by no formula) filled on the device: no host-to-device copy
        return BNParams(
            bn.running_mean.to(dt),
            torch.rsqrt(bn.running_var.to(dt) + bn.eps),
            weight,
            bias,
            x.new_full((), x.numel() // C, dtype=dt),
            False,
            **act,
        )
    with torch.no_grad():  # the backward formula accounts for the statistics; no graph through them
        mean, var, count = channel_stats(x, backend=backend, sync=sync, process_group=process_group)
    mean, var = mean.to(dt), var.to(dt)
    if track:
        update_running_stats(bn, mean, var, count)
    return BNParams(mean, torch.rsqrt(var + bn.eps), weight, bias, count, True, **act)


def update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
    """nn.BatchNorm2d's running-statistics update in torch ops (the torch backend, and running buffers that are
    not fp32); the triton statistics kernel does the same in its finalising programs. ``count``: a 0-dim tensor."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        if bn.momentum is not None:
            factor = bn.momentum
        else:  # 1 / num_batches_tracked as a tensor: no host sync
            factor = bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal()
        # Bessel's factor in fp64 on the device: the bits of the Python double n / max(n - 1, 1) (a 0-dim fp64
        # tensor does not promote var's dtype, and is rounded to it like a Python float)
        n = count.to(torch.float64)
        unbiased = var * (n / (n - 1).clamp_min(1))
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def _fp32_running(rm, rv) -> bool:
    return rm is not None and rm.dtype == rv.dtype == torch.float32


def _module_state(bn) -> tuple:
    """(running_mean, running_var, weight, bias, num_batches_tracked) of a BatchNorm module, read from its
    parameter and buffer dicts (``nn.Module.__getattr__`` costs ~0.4 us per name on this hot path)."""
    p, b = getattr(bn, "_parameters", ()), getattr(bn, "_buffers", ())  # any object with the attributes works
    get = lambda d, k: d[k] if k in d else getattr(bn, k, None)  # noqa: E731 (subclasses may use properties)
    return (
        get(b, "running_mean"),
        get(b, "running_var"),
        get(p, "weight"),
        get(p, "bias"),
        get(b, "num_batches_tracked"),
    )


def _bn_params_triton(x, bn, sync: bool, process_group, activation: str, slope: float) -> BNParams:
    rm, rv, weight, bias, nbt = _module_state(bn)
    act = dict(activation=activation, activation_param=slope)
    C = x.shape[1]
    if not bn.training and rm is not None:  # running statistics: nothing launched here
        if _fp32_running(rm, rv):
            return BNParams.from_running(rm, rv, bn.eps, weight, bias, x.numel() // C, **act)
        n = x.new_full((), x.numel() // C, dtype=torch.float32)  # read by no formula; no host-to-device copy
        return BNParams(rm.float(), torch.rsqrt(rv.float() + bn.eps), weight, bias, n, False, **act)
    track = bn.training and bn.track_running_stats and rm is not None
    in_kernel = track and _fp32_running(rm, rv)  # running-stat update inside the statistics kernel
    if _dist_active(sync) and (in_kernel or not track):
        # sync BN: this rank's (count, mean, M2) all-gathered; the merge, the STAT_ROWS and the running update
        # happen in the forward's apply launch (bn_relu_forward: p.gathered), one launch less than finalize_stats
        rows = gather_stats(x, process_group=process_group, num_batches_tracked=nbt if in_kernel else None)
        p = BNParams.from_stats(
            torch.empty((len(STAT_ROWS), C), device=x.device, dtype=torch.float32), weight, bias, True, **act
        )
        p.gathered = (rows, (rm, rv, nbt) if in_kernel else None, bn.momentum, bn.eps)
        return p
    if _dist_active(sync):
        stats = finalize_stats(
            x,
            weight=weight,
            eps=bn.eps,
            sync=True,
            process_group=process_group,
            running=(rm, rv) if in_kernel else None,
            momentum=bn.momentum,
            num_batches_tracked=nbt,
        )
    else:
        x, channels_last = as_nchw_or_nhwc(x)
        stats = torch.empty((len(STAT_ROWS), C), device=x.device, dtype=torch.float32)
        launch_stats(
            x,
            channels_last,
            stats,
            weight=weight,
            running=(rm, rv) if in_kernel else None,
            momentum=bn.momentum,
            eps=bn.eps,
            num_batches_tracked=nbt,
        )
    p = BNParams.from_stats(stats, weight, bias, True, **act)
    if track and not in_kernel:  # running statistics kept in another dtype: plain torch update
        update_running_stats(bn, p.mean, stats[ROW["var"]], p.count)
    return p


def _kernel_params(p: BNParams) -> tuple:
    """(stats, weight, bias, running_mean, running_var, eps, running flag, affine flag) pointers and flags of p for
    the kernels; absent tensors are stood in by a present one (never read). Computed once per BNParams: the
    forward, the recompute and the backward launches read the same."""
    kp = p._kp
    if kp is None:
        kp = p._kp = _kernel_params_of(p)
    return kp


def _kernel_params_of(p: BNParams) -> tuple:
    if p.running is not None:
        rm, rv, eps = p.running
        stats = rm
    else:
        stats = p.kernel_stats()
        rm = rv = stats
        eps = 0.0
    w, b = p.weight, p.bias
    if (w is None) != (b is None):  # one of the two: both as vectors
        w, b = p.gamma, p.beta
    affine = w is not None
    return (
        stats,
        (w if affine else stats),
        (b if affine else stats),
        rm,
        rv,
        eps,
        int(p.running is not None),
        int(affine),
    )


def bn_relu_forward(
    x: torch.Tensor, p: BNParams, *, backend: str, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """act(bn(x)) with known statistics (activation from ``p``); same layout as x, dtype ``out_dtype``
    (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if backend != "triton":
        shape = (1, -1, 1, 1)
        z = (x.to(p.mean.dtype) - p.mean.view(shape)) * p.scale.view(shape) + p.beta.view(shape)
        return _act_torch(z, p).to(out_dtype)
    x, channels_last = as_nchw_or_nhwc(x)
    geo = geometry(x, channels_last)
    y = _like(x, out_dtype)
    if p.gathered is not None:
        _apply_gathered(x, y, p, geo, channels_last)
        return y
    stats, w, b, rm, rv, eps, running, affine = _kernel_params(p)
    act = p.act
    slot = geo.slot(
        ("apply", x.dtype, out_dtype, w.dtype, b.dtype, act, x.data_ptr() & 15 == 0),
        APPLY,
        geo.ew_grid,
        ELEMENTWISE_WARPS,
    )
    slot(
        x,
        y,
        stats,
        w,
        b,
        rm,
        rv,
        eps,
        geo.R,
        geo.L,
        x.shape[1],
        p.slope,
        running,
        affine,
        act,
        channels_last,
        geo.int64,
        geo.block_r,
        geo.block_l,
    )
    return y


def _apply_gathered(x, y, p: BNParams, geo, channels_last: bool) -> None:
    """The first apply of a sync-BN step (``p.gathered``): merge the ranks' rows, write p.stats and the running
    statistics, and y, in one launch; later applies of the same p (the recompute in backward) read p.stats."""
    rows, running, momentum, eps = p.gathered
    p.gathered = None
    stats, w, b, _, _, _, _, affine = _kernel_params(p)  # the same stand-ins the later launches of p use
    rm, rv, nbt = running if running is not None else (stats, stats, scratch(x.device, 0)[2])
    update = running is not None
    slot = geo.slot(
        ("apply_gathered", x.dtype, y.dtype, w.dtype, b.dtype, p.act, x.data_ptr() & 15 == 0),
        APPLY_GATHERED,
        geo.ew_grid,
        ELEMENTWISE_WARPS,
    )
    slot(
        x,
        y,
        rows,
        rows.shape[0],
        stats,
        w,
        b,
        rm,
        rv,
        nbt,
        float(eps),
        0.0 if momentum is None else float(momentum),
        geo.R,
        geo.L,
        x.shape[1],
        p.slope,
        int(affine),
        int(update),
        int(update and momentum is None),
        p.act,
        channels_last,
        geo.int64,
        geo.block_r,
        geo.block_l,
    )


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


def _param_rows(red: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgamma, dbeta): rows 2 and 3 of the (4, C) backward sums, as views. One ``unbind`` costs about half of two
    ``red[i]`` indexings (Python's ``__getitem__`` parses its index) on this hot path."""
    r = red.unbind(0)
    return r[2], r[3]


def _backward_triton(x, dy, p: BNParams, need_dx: bool, do_sync: bool, process_group, sums, act: int):
    x, channels_last = as_nchw_or_nhwc(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not dy.is_contiguous(memory_format=fmt):
        dy = dy.contiguous(memory_format=fmt)
    geo = geometry(x, channels_last)
    C = x.shape[1]
    stats, w, b, rm, rv, eps, running, affine = _kernel_params(p)
    dx = _like(x, x.dtype) if need_dx else None
    if sums is None:
        # frozen statistics: dx = scale * g needs no sums, so the sums pass writes it too (one launch)
        write_dx = need_dx and not p.batch_stats
        red = torch.empty((4, C), device=x.device, dtype=torch.float32)
        g = geo.red
        part, tick, _ = scratch(x.device, 2 * g.splits * C)
        dx_arg = dx if write_dx else x
        slot = geo.slot(
            ("sums", x.dtype, dy.dtype, w.dtype, b.dtype, act, _aligned(x, dy, dx_arg)),
            GRAD_SUMS,
            g.grid,
            STATS_WARPS,
        )
        slot(
            x,
            dy,
            dx_arg,
            stats,
            w,
            b,
            rm,
            rv,
            eps,
            part,
            tick,
            red,
            g.M,
            C,
            g.HW,
            g.m_per_prog,
            p.slope,
            running,
            affine,
            int(write_dx),
            act,
            channels_last,
            g.int64,
            g.block_m,
            g.block_c,
            g.merge_k,
        )
        if write_dx or not need_dx:
            return (dx, *_param_rows(red))
    else:  # (sum g, sum g*(x-mean)) from elsewhere (the implicit-GEMM dgrad epilogue), (C,) or (K, C) partials
        sum_g, sum_gx = (s.float().sum(0) if s.dim() == 2 else s.float() for s in sums)
        red = torch.stack([sum_g, sum_gx, sum_gx * p.rstd.float(), sum_g])
        if not need_dx:
            return (None, *_param_rows(red))
    if do_sync:  # parameter gradients (rows 2, 3) stay local (DDP averages them); dx uses the group-wide sums
        torch.distributed.all_reduce(red[:2], group=process_group)
    slot = geo.slot(
        ("dx", x.dtype, dy.dtype, w.dtype, b.dtype, act, _aligned(x, dy)), DX, geo.ew_grid, ELEMENTWISE_WARPS
    )  # dx: a fresh allocation
    slot(
        x,
        dy,
        dx,
        stats,
        w,
        b,
        rm,
        rv,
        eps,
        red,
        geo.R,
        geo.L,
        C,
        p.slope,
        running,
        affine,
        int(p.batch_stats),
        act,
        channels_last,
        geo.int64,
        geo.block_r,
        geo.block_l,
    )
    return (dx, *_param_rows(red))


def bn_relu_backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    p: BNParams,
    *,
    backend: str,
    need_dx: bool = True,
    sync: bool = False,
    process_group=None,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        return _backward_triton(x, dy, p, need_dx, do_sync, process_group, sums, act)
    xc = x.to(p.mean.dtype) - p.mean.view(shape)
    g = _act_grad_torch(xc * p.scale.view(shape) + p.beta.view(shape), dy.to(p.mean.dtype), act, p.slope)
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


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``; no dispatch when it already is (the common case: a saved cast, an autocast gradient)."""
    return t if t.dtype == dtype else t.to(dtype)


def _detached(t):
    return None if t is None else t.detach()


def decode_stats(a) -> BNParams:
    """The statistics argument of a fused op as BNParams: an eager caller passes its BNParams (as it is); the op
    passes the packed (5, C) STAT_ROWS tensor, read with the op's weight, bias and flags."""
    s = a.stats
    if isinstance(s, BNParams):
        return s
    return BNParams.from_stats(
        s, _detached(a.weight), _detached(a.bias), a.batch_stats, a.activation, a.activation_param
    )


def param_grads(a, needs: dict, dgamma, dbeta, out: dict) -> dict:
    """``out`` with "weight": dgamma and "bias": dbeta where they are wanted, in the dtype of gamma/beta as the
    BNParams holds them (the module's on the triton backend; the torch backend's fp32/fp64 copies, which the
    autograd engine then casts to the parameters' dtype)."""
    p = a.stats  # the BNParams holds gamma and beta (the arguments themselves are not kept for backward)
    if needs.get("weight") and p.weight is not None:
        out["weight"] = _as(dgamma, p.weight.dtype)
    if needs.get("bias") and p.bias is not None:
        out["bias"] = _as(dbeta, p.bias.dtype)
    return out


# The arguments a fused BN-activation op starts with (bn_act and bn_act_conv share them; op order kept stable)
BN_ARGS = (
    Arg("x", "Tensor", grad=True, saved=True),
    Arg("stats", "Tensor", saved=True, decode=decode_stats),  # eager: the BNParams of bn_params
    # gamma, beta: the decoded statistics (BNParams) hold them for the backward (the op passes them to its backward
    # op, as it does every differentiable argument); not saved here, so only x is kept at activation size
    Arg("weight", "Tensor?", grad=True),
    Arg("bias", "Tensor?", grad=True),
)
ACT_ARGS = (Arg("activation", "str"), Arg("activation_param", "float"))
SYNC_ARGS = (  # eager only: a process group cannot be an op argument (kernels.ops: no sync under compile)
    Arg("sync", None, default=False),
    Arg("group", None, default=None),
)


def _bn_act_forward(a, stash):
    return bn_relu_forward(a.x, a.stats, backend=a.backend, out_dtype=a.out_dtype)


def _bn_act_backward(a, grads, needs):
    dx, dgamma, dbeta = bn_relu_backward(
        a.x, grads[0], a.stats, backend=a.backend, need_dx=needs["x"], sync=a.sync, process_group=a.group
    )
    return param_grads(a, needs, dgamma, dbeta, {"x": dx})


BN_ACT = OpSpec(
    "bn_act",
    (
        *BN_ARGS,
        Arg("batch_stats", "bool"),
        Arg("backend", "str"),
        Arg("out_dtype", "ScalarType"),
        *ACT_ARGS,
        *SYNC_ARGS,
    ),
    forward=_bn_act_forward,
    backward=_bn_act_backward,
    fake=lambda a: a.x.new_empty(a.x.shape, dtype=a.out_dtype),
    layout=lambda a: memory_format(a.x),
)
"""y = act(bn(x)) saving only x (statistics and activation in the BNParams): in x's layout, dtype ``out_dtype``;
backward (dx, dgamma, dbeta) recomputing the activation's mask. Eager: ``BN_ACT.apply(...)``; compile: the
``widedeep_kernels::bn_act`` op (:mod:`kernels.ops`)."""


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (kernels/aot.py compiles each for sm_80 and sm_90 in CI)

# (x dtype, y / dy dtype): the same, or fp32 x feeding an fp16/bf16 autocast op (y and its gradient in that dtype)
DTYPE_COMBOS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
)
_DTYPES = TRITON_DTYPES


def _aot_acts(int64: bool) -> list[tuple[int, str]]:
    """(ACT, label suffix) compiled ahead of time for a variant: ReLU everywhere; leaky_relu and identity with
    int32 offsets only (the INT64 offset arithmetic does not depend on ACT, and it halves the added variants)."""
    return [
        (code, "" if name == "relu" else f" {name}")
        for name, code in ACTIVATIONS.items()
        if name == "relu" or not int64
    ]


# integer arguments real shapes make multiples of 16 (the runtime JIT specialises on it: vector loads)
_EW_DIVISIBLE = ("L",)
_PARAMS_SIG = {
    "stats_ptr": "*fp32",
    "w_ptr": "*fp32",
    "b_ptr": "*fp32",
    "rmean_ptr": "*fp32",
    "rvar_ptr": "*fp32",
    "eps": "fp32",
}


def aot_variants() -> list:
    """Every (kernel, dtypes, layout, tile, activation) the CUDA launchers of this module can choose, as
    kernels.aot.Variant (flags such as running statistics, affine, write_dx and batch_stats are runtime
    arguments: one compiled kernel serves them all).

    Elementwise kernels: ELEMENTWISE_WARPS, the tiles of :mod:`kernels.tiles`, row length L declared divisible by 16
    (as the runtime specialises every real layer: vectorised loads); gradient sums: 8 warps, the tiles of
    :func:`kernels.tiles.tile_sizes`, C/HW/m_per_prog declared divisible."""
    out = []
    ew = {s: "i32" for s in ("R", "L", "C")}
    tiles = bn_variant_tiles()
    for xdt, ydt in DTYPE_COMBOS:
        xs, ys = _DTYPES[xdt], _DTYPES[ydt]
        for (cl, block_r, block_l), int64 in ((t, i) for t in tiles["elementwise"] for i in (False, True)):
            for act, act_label in _aot_acts(int64):
                tile = dict(ACT=act, CHANNELS_LAST=cl, INT64=int64, BLOCK_R=block_r, BLOCK_L=block_l)
                cfg = f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} {block_r}x{block_l}{act_label}"
                sig = {
                    "x_ptr": f"*{xs}",
                    "y_ptr": f"*{ys}",
                    **_PARAMS_SIG,
                    **ew,
                    "slope": "fp32",
                    "running": "i32",
                    "has_affine": "i32",
                }
                out.append(
                    Variant(
                        _bn_act_fwd_kernel,
                        sig,
                        tile,
                        num_warps=ELEMENTWISE_WARPS,
                        kernel="bn_relu_forward",
                        dtypes=f"x={xs} y={ys}",
                        config=cfg,
                        divisible=_EW_DIVISIBLE,
                        vector_loads=block_l >= 16,
                    )
                )
                sig = {
                    "x_ptr": f"*{xs}",
                    "y_ptr": f"*{ys}",
                    "g_ptr": "*fp32",
                    "K": "i32",
                    "stats_ptr": "*fp32",
                    "w_ptr": "*fp32",
                    "b_ptr": "*fp32",
                    "rmean_ptr": "*fp32",
                    "rvar_ptr": "*fp32",
                    "nbt_ptr": "*i64",
                    "eps": "fp32",
                    "momentum": "fp32",
                    **ew,
                    "slope": "fp32",
                    "has_affine": "i32",
                    "update": "i32",
                    "cumulative": "i32",
                }
                out.append(
                    Variant(
                        _bn_act_fwd_gathered_kernel,
                        sig,
                        tile,
                        num_warps=ELEMENTWISE_WARPS,
                        kernel="bn_relu_forward_gathered",
                        dtypes=f"x={xs} y={ys}",
                        config=cfg,
                        divisible=_EW_DIVISIBLE,
                        vector_loads=block_l >= 16,
                    )
                )
                sig = {
                    "x_ptr": f"*{xs}",
                    "dy_ptr": f"*{ys}",
                    "dx_ptr": f"*{xs}",
                    **_PARAMS_SIG,
                    "red_ptr": "*fp32",
                    **ew,
                    "slope": "fp32",
                    "running": "i32",
                    "has_affine": "i32",
                    "batch_stats": "i32",
                }
                out.append(
                    Variant(
                        _bn_act_bwd_kernel,
                        sig,
                        tile,
                        num_warps=ELEMENTWISE_WARPS,
                        kernel="bn_relu_backward",
                        dtypes=f"x={xs} dy={ys}",
                        config=cfg,
                        divisible=_EW_DIVISIBLE,
                        vector_loads=block_l >= 16,
                    )
                )
        for cl, int64, block_m, block_c in tiles["reduction"]:
            for act, act_label in _aot_acts(int64):
                sig = {
                    "x_ptr": f"*{xs}",
                    "dy_ptr": f"*{ys}",
                    "dx_ptr": f"*{xs}",
                    **_PARAMS_SIG,
                    "part_ptr": "*fp32",
                    "tick_ptr": "*i32",
                    "red_ptr": "*fp32",
                    **{s: "i32" for s in ("M", "C", "HW", "m_per_prog")},
                    "slope": "fp32",
                    "running": "i32",
                    "has_affine": "i32",
                    "write_dx": "i32",
                }
                out.append(
                    Variant(
                        _bn_act_grad_sums_kernel,
                        sig,
                        dict(
                            ACT=act,
                            CHANNELS_LAST=cl,
                            INT64=int64,
                            BLOCK_M=block_m,
                            BLOCK_C=block_c,
                            MERGE_K=merge_k(block_c),
                        ),
                        num_warps=STATS_WARPS,
                        kernel="bn_relu_grad_sums",
                        barrier_free_loop=True,
                        dtypes=f"x={xs} dy={ys}",
                        divisible=("C", "HW", "m_per_prog"),
                        config=f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} {block_m}x{block_c}{act_label}",
                    )
                )
    return out
