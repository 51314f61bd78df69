"""Per-channel batch statistics of an (N, C, H, W) tensor, NCHW or channels_last, fp32/fp16/bf16 in, in ONE launch.

``_stats_kernel``: each program runs Welford updates per lane over its slice of the N*H*W positions (fp32, no
barrier or shuffle inside the loop; values shifted by a per-channel pivot, the channel's first element), merges its
lanes once with Chan's formula (:func:`_chan_combine`, the one merge every kernel uses), and writes a partial
(mean, M2) per channel. Then it takes a ticket for its channel block (an atomic counter); the program that takes
the last ticket merges all the block's partials *in index order* (so the result does not depend on which program
finished last: runs are bitwise repeatable) and finalises: the (len(STAT_ROWS), C) rows mean, var, rstd, scale =
gamma * rstd, count; the running statistics (momentum, or the cumulative average with momentum=None); and
num_batches_tracked (by the last finaliser of all channel blocks, after every finaliser has read it). It resets its
ticket, so the ticket buffer (one per device, zeroed once) needs no clearing launch and the step stays capture-safe
for CUDA graphs. No E[x^2] - E[x]^2 anywhere: inputs with |mean| >> std keep their precision.

Memory ordering of the ticket: partial stores, then a CTA barrier, then one acq_rel atomic at GPU scope (PTX
release is cumulative over what the barrier ordered); the last program reads the partials after its acquire,
with ``.cg`` loads (L2, never a stale L1 line). Launches on one stream never overlap; the scratch (partials,
tickets) is per device and stream.

With ``sync=True`` and torch.distributed initialised the finaliser writes this rank's (count, mean, M2); they
are all-gathered and ``_gathered_finalize_kernel`` merges them the same way (count stays a device tensor: no
host sync). That kernel also serves :func:`finalize_stats` with the running statistics (eval).
"""

from __future__ import annotations

import torch

from . import _runtime  # noqa: F401 (first: sets TRITON_INTERPRET before triton.jit runs)
from ._common import TRITON_DTYPES, as_nchw_or_nhwc, cdiv
from ._runtime import HAS_TRITON
from .launch import Kernel
from .tiles import (
    FINALIZE_BLOCK_C,
    FINALIZE_BLOCK_K,
    STATS_WARPS,
    TICKETS,
    Geometry,
    Variant,
    bn_variant_tiles,
    geometry,
    merge_k,
)

# Rows of the (len(STAT_ROWS), C) fp32 statistics buffer: the one packing used by kernels, launchers and ops.
STAT_ROWS = ("mean", "var", "rstd", "scale", "count")
ROW = {name: i for i, name in enumerate(STAT_ROWS)}
# Sources of the gathered-finalize kernel.
SRC_GATHERED, SRC_RUNNING = 1, 2


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _chan_combine, _element_offsets

    @triton.jit
    def _pivot(x_ptr, cs, cmask, C, HW, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
        """Each channel's first element x[0, c, 0, 0] (fp32): the shift every program subtracts. Values near a
        large mean (|mean|/std ~ 1e6) then enter the fp32 Welford updates as small, exact differences."""
        m_first = tl.zeros([1], dtype=tl.int32)
        if INT64:
            m_first = m_first.to(tl.int64)
        return tl.sum(
            tl.load(x_ptr + _element_offsets(m_first, cs, C, HW, CHANNELS_LAST), mask=cmask[None, :], other=0.0).to(
                tl.float32
            ),
            axis=0,
        )

    @triton.jit
    def _welford_lanes(
        x_ptr,
        pivot,
        cs,
        cmask,
        C,
        HW,
        m_start,
        m_end,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """(mean - pivot, M2, count) per channel of positions [m_start, m_end): Welford per lane (no barrier or
        shuffle in the loop), one Chan merge across lanes at the end."""
        mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        n = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            mmask = ms < m_end
            if INT64:
                ms = ms.to(tl.int64)
            mask = mmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + _element_offsets(ms, cs, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
            x = x - pivot[None, :]
            n += mask.to(tl.float32)
            delta = x - mean
            mean += tl.where(mask, delta / tl.maximum(n, 1.0), 0.0)
            m2 += tl.where(mask, delta * (x - mean), 0.0)
        return tl.reduce((mean, m2, n), 0, _chan_combine)

    @triton.jit
    def _merge_partials(part_ptr, K, C, cs, cmask, M, m_per_prog, MERGE_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """Chan-merge the K program partials (rows of mean, then K rows of M2; counts from the split sizes) of
        channels ``cs`` in index order: the same result whichever program runs it."""
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, MERGE_K):
            ks = k0 + tl.arange(0, MERGE_K)
            mask = (ks < K)[:, None] & cmask[None, :]
            offs = ks[:, None] * C + cs[None, :]
            n = tl.where(mask, tl.minimum(tl.maximum(M - ks * m_per_prog, 0), m_per_prog).to(tl.float32)[:, None], 0.0)
            mu = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            q = tl.load(part_ptr + K * C + offs, mask=mask, other=0.0, cache_modifier=".cg")
            t_mean, t_m2, t_n = tl.reduce((mu, q, n), 0, _chan_combine)
            mean, m2, count = _chan_combine(mean, m2, count, t_mean, t_m2, t_n)
        return mean, m2, count

    @triton.jit
    def _derive(m2, count, cs, cmask, w_ptr, eps, has_affine):
        """(var, rstd, scale = gamma * rstd) of channels ``cs`` from merged (M2, count): the one definition the
        finalisers and the gathered apply kernel use."""
        var = m2 / tl.maximum(count, 1.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = rstd
        if has_affine != 0:
            scale = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) * rstd
        return var, rstd, scale

    @triton.jit
    def _write_rows(
        mean,
        m2,
        count,
        var,
        rstd,
        scale,
        cs,
        cmask,
        C,
        out_ptr,
        rmean_ptr,
        rvar_ptr,
        nbt_old,
        momentum,
        update,
        cumulative,
    ):
        """Store the STAT_ROWS of channels ``cs``; with ``update``, the running statistics (unbiased variance) move
        by ``momentum`` or, ``cumulative``, by 1 / (num_batches_tracked before this step + 1). Flags are runtime
        ints: this code runs once per channel block, never in a hot loop."""
        tl.store(out_ptr + cs, mean, mask=cmask)
        tl.store(out_ptr + C + cs, var, mask=cmask)
        tl.store(out_ptr + 2 * C + cs, rstd, mask=cmask)
        tl.store(out_ptr + 3 * C + cs, scale, mask=cmask)
        tl.store(out_ptr + 4 * C + cs, count, mask=cmask)
        if update != 0:
            factor = momentum
            if cumulative != 0:
                factor = 1.0 / (nbt_old.to(tl.float32) + 1.0)
            unbiased = m2 / tl.maximum(count - 1.0, 1.0)
            rm = tl.load(rmean_ptr + cs, mask=cmask, other=0.0)
            rv = tl.load(rvar_ptr + cs, mask=cmask, other=0.0)
            tl.store(rmean_ptr + cs, rm + factor * (mean - rm), mask=cmask)
            tl.store(rvar_ptr + cs, rv + factor * (unbiased - rv), mask=cmask)

    @triton.jit
    def _finalize(
        mean,
        m2,
        count,
        cs,
        cmask,
        C,
        out_ptr,
        w_ptr,
        rmean_ptr,
        rvar_ptr,
        nbt_old,
        momentum,
        eps,
        has_affine,
        update,
        cumulative,
    ):
        """:func:`_derive` then :func:`_write_rows` for channels ``cs``."""
        var, rstd, scale = _derive(m2, count, cs, cmask, w_ptr, eps, has_affine)
        _write_rows(
            mean,
            m2,
            count,
            var,
            rstd,
            scale,
            cs,
            cmask,
            C,
            out_ptr,
            rmean_ptr,
            rvar_ptr,
            nbt_old,
            momentum,
            update,
            cumulative,
        )

    @triton.jit
    def _bump_batches(tick_ptr, n_blocks, nbt_ptr, nbt_old):
        """num_batches_tracked += 1 by the last of ``n_blocks`` finalisers (all of them read it before)."""
        tl.debug_barrier()
        done = tl.atomic_add(tick_ptr + n_blocks, 1, sem="acq_rel")
        if done == n_blocks - 1:
            tl.store(nbt_ptr, nbt_old + 1)
            tl.store(tick_ptr + n_blocks, 0)

    _FLAGS = ["triple", "has_affine", "update", "cumulative"]

    # per-channel vectors and scratch: small loads, never worth an alignment specialisation (and the launch plan
    # then only checks the alignment of the big tensors)
    _VECTORS = ["part_ptr", "tick_ptr", "out_ptr", "w_ptr", "rmean_ptr", "rvar_ptr", "nbt_ptr"]

    @triton.jit(do_not_specialize=_FLAGS, do_not_specialize_on_alignment=_VECTORS)
    def _stats_kernel(
        x_ptr,
        part_ptr,
        tick_ptr,
        out_ptr,
        w_ptr,
        rmean_ptr,
        rvar_ptr,
        nbt_ptr,
        M,
        C,
        HW,
        m_per_prog,
        momentum,
        eps,
        triple,
        has_affine,
        update,
        cumulative,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        MERGE_K: tl.constexpr,
    ):
        """Grid (channel blocks, splits). Partials of channels [pid_c*BLOCK_C, +BLOCK_C) over positions
        [pid_m*m_per_prog, +m_per_prog) into part_ptr (2, splits, C); the last program of a channel block
        finalises it: STAT_ROWS into out_ptr (5, C), or with ``triple`` this rank's (count, mean, M2) (3, C)
        (and with ``update``, num_batches_tracked += 1: the gathered apply kernel then moves the running
        statistics by 1 / num_batches_tracked in the cumulative mode).
        nbt_ptr: an int64 scalar (num_batches_tracked, read only with ``update``)."""
        pid_c = tl.program_id(0)
        pid_m = tl.program_id(1)
        n_splits = tl.num_programs(1)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        m_start = pid_m * m_per_prog
        m_end = tl.minimum(m_start + m_per_prog, M)
        pivot = _pivot(x_ptr, cs, cmask, C, HW, CHANNELS_LAST, INT64)
        mean, m2, _n = _welford_lanes(
            x_ptr, pivot, cs, cmask, C, HW, m_start, m_end, CHANNELS_LAST, INT64, BLOCK_M, BLOCK_C
        )
        tl.store(part_ptr + pid_m * C + cs, mean, mask=cmask)
        tl.store(part_ptr + (n_splits + pid_m) * C + cs, m2, mask=cmask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
        ticket = tl.atomic_add(tick_ptr + pid_c, 1, sem="acq_rel")
        if ticket == n_splits - 1:
            tl.store(tick_ptr + pid_c, 0)
            mean, m2, count = _merge_partials(part_ptr, n_splits, C, cs, cmask, M, m_per_prog, MERGE_K, BLOCK_C)
            mean += pivot  # partials are relative to the pivot
            if triple != 0:
                tl.store(out_ptr + cs, count, mask=cmask)
                tl.store(out_ptr + C + cs, mean, mask=cmask)
                tl.store(out_ptr + 2 * C + cs, m2, mask=cmask)
                if update != 0:  # sync BN: this step counts; the running statistics move in the gathered apply
                    _bump_batches(tick_ptr, tl.num_programs(0), nbt_ptr, tl.load(nbt_ptr))
            else:
                nbt_old = tl.load(nbt_ptr)
                _finalize(
                    mean,
                    m2,
                    count,
                    cs,
                    cmask,
                    C,
                    out_ptr,
                    w_ptr,
                    rmean_ptr,
                    rvar_ptr,
                    nbt_old,
                    momentum,
                    eps,
                    has_affine,
                    update,
                    cumulative,
                )
                if update != 0:
                    _bump_batches(tick_ptr, tl.num_programs(0), nbt_ptr, nbt_old)

    @triton.jit(do_not_specialize=["source", "has_affine", "update", "cumulative"])
    def _gathered_finalize_kernel(
        g_ptr,
        K,
        M,
        C,
        tick_ptr,
        out_ptr,
        w_ptr,
        rmean_ptr,
        rvar_ptr,
        nbt_ptr,
        momentum,
        eps,
        source,
        has_affine,
        update,
        cumulative,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``source`` SRC_GATHERED: Chan-merge K ranks' (count, mean, M2) rows (g_ptr (K, 3, C)) and finalise like
        the statistics kernel. SRC_RUNNING: the STAT_ROWS of the running statistics (count M), no update."""
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        nbt_old = tl.load(nbt_ptr)
        if source == 2:
            mean = tl.load(rmean_ptr + cs, mask=cmask, other=0.0)
            var = tl.load(rvar_ptr + cs, mask=cmask, other=1.0)
            count = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.maximum(M, 1)  # M2 = var * count: var back
            _finalize(
                mean,
                var * count,
                count,
                cs,
                cmask,
                C,
                out_ptr,
                w_ptr,
                rmean_ptr,
                rvar_ptr,
                nbt_old,
                momentum,
                eps,
                has_affine,
                0,
                0,
            )
        else:
            mean = tl.zeros([BLOCK_C], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            count = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = (ks < K)[:, None] & cmask[None, :]
                offs = ks[:, None] * (3 * C) + cs[None, :]
                n = tl.load(g_ptr + offs, mask=mask, other=0.0)
                mu = tl.load(g_ptr + C + offs, mask=mask, other=0.0)
                q = tl.load(g_ptr + 2 * C + offs, mask=mask, other=0.0)
                t_mean, t_m2, t_n = tl.reduce((mu, q, n), 0, _chan_combine)
                mean, m2, count = _chan_combine(mean, m2, count, t_mean, t_m2, t_n)
            _finalize(
                mean,
                m2,
                count,
                cs,
                cmask,
                C,
                out_ptr,
                w_ptr,
                rmean_ptr,
                rvar_ptr,
                nbt_old,
                momentum,
                eps,
                has_affine,
                update,
                cumulative,
            )
            if update != 0:
                _bump_batches(tick_ptr, tl.num_programs(0), nbt_ptr, nbt_old)

    STATS = Kernel(_stats_kernel)
    GATHERED_FINALIZE = Kernel(_gathered_finalize_kernel)


_scratch: dict = {}


def scratch(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 partials buffer of at least ``numel`` elements, int32 ticket counters, an int64 zero) of ``device``'s
    current stream.

    Reused by every reduction launch on that stream (launches on one stream run in order); the tickets are zeroed
    once here and reset by the kernels themselves; the int64 zero stands in for num_batches_tracked."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    buf = _scratch.get(key)
    if buf is None or buf[0].numel() < numel:
        part = torch.empty(max(numel, 1 << 16), device=device, dtype=torch.float32)
        rest = (
            buf[1:]
            if buf is not None
            else (
                torch.zeros(TICKETS, device=device, dtype=torch.int32),
                torch.zeros((), device=device, dtype=torch.int64),
            )
        )
        buf = _scratch[key] = (part, *rest)
    return buf


def merge_partials(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of K partial statistics (the torch twin of :func:`_chan_combine`): (K,) or (K, C)
    counts, (K, C) means and M2 -> (count, mean, M2)."""
    if count.dim() == 1:
        count = count[:, None].expand_as(mean)
    total = count.sum(0)
    merged = (count * mean).sum(0) / total.clamp_min(1)
    m2_total = m2.sum(0) + (count * (mean - merged) ** 2).sum(0)
    return total, merged, m2_total


def _dist_active(sync: bool) -> bool:
    return sync and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """(world, *local.shape): every rank's ``local``, gathered into one preallocated tensor (no host sync)."""
    import torch.distributed as dist

    out = local.new_empty((dist.get_world_size(group), *local.shape))
    dist.all_gather(list(out.unbind(0)), local, group=group)
    return out


def _aligned(*ts) -> bool:
    """All tensors 16-byte aligned (what Triton specialises pointer arguments on)."""
    acc = 0
    for t in ts:
        acc |= t.data_ptr()
    return acc & 15 == 0


def launch_stats(
    x: torch.Tensor,
    channels_last: bool,
    out: torch.Tensor,
    *,
    weight=None,
    running=None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked=None,
    triple: bool = False,
    geo: Geometry | None = None,
) -> None:
    """One ``_stats_kernel`` launch: x's statistics into ``out`` (STAT_ROWS, or (count, mean, M2) with ``triple``).

    ``running``: (running_mean, running_var) fp32, updated in place (with ``num_batches_tracked`` += 1); with
    ``triple`` only ``num_batches_tracked`` += 1 (``running`` then just says the step is tracked).
    ``geo``: x's :class:`kernels.tiles.Geometry` when the caller has it."""
    geo = geo or geometry(x, channels_last)
    g = geo.red
    part, tick, zero64 = scratch(x.device, 2 * g.splits * g.C)
    update = running is not None
    has_affine = weight is not None and not triple
    w = weight if has_affine else out
    rm, rv = running if update and not triple else (out, out)
    key = ("stats", x.dtype, w.dtype, x.data_ptr() & 15 == 0)
    slot = geo.slot(key, STATS, g.grid, STATS_WARPS)
    slot(
        x,
        part,
        tick,
        out,
        w,
        rm,
        rv,
        num_batches_tracked if update else zero64,
        g.M,
        g.C,
        g.HW,
        g.m_per_prog,
        0.0 if momentum is None else float(momentum),
        float(eps),
        int(triple),
        int(has_affine),
        int(update),
        int(update and momentum is None),
        channels_last,
        g.int64,
        g.block_m,
        g.block_c,
        g.merge_k,
    )


def finalize_stats(
    x: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: torch.Tensor | None = None,
    use_running: bool = False,
) -> torch.Tensor:
    """Triton statistics of x as one (5, C) fp32 tensor, rows :data:`STAT_ROWS` (mean, var, rstd, scale, count).

    Batch statistics (merged over the group with ``sync``) unless ``use_running``, then ``running``'s.
    ``weight``: gamma (scale = gamma * rstd; rstd without it). ``running`` = (running_mean, running_var) fp32,
    updated in place with batch statistics (unbiased variance) by ``momentum``, or by 1/num_batches_tracked when
    ``momentum`` is None; ``num_batches_tracked`` is incremented by the kernel. Launches: 1 (sync: 2 and an
    all_gather); eval: 1.
    """
    x, channels_last = as_nchw_or_nhwc(x)
    C = x.shape[1]
    dev = x.device
    out = torch.empty((len(STAT_ROWS), C), device=dev, dtype=torch.float32)
    if running is not None and (running[0].dtype != torch.float32 or running[1].dtype != torch.float32):
        raise TypeError("the triton BN statistics need fp32 running_mean/running_var buffers")
    update = running is not None and not use_running
    if update and num_batches_tracked is None:
        raise ValueError("updating running statistics needs num_batches_tracked")
    if not (use_running or _dist_active(sync)):
        launch_stats(
            x,
            channels_last,
            out,
            weight=weight,
            running=running if update else None,
            momentum=momentum,
            eps=eps,
            num_batches_tracked=num_batches_tracked,
        )
        return out
    if use_running:
        rows, K, src = out, 0, SRC_RUNNING
    else:
        local = torch.empty((3, C), device=dev, dtype=torch.float32)
        launch_stats(x, channels_last, local, triple=True)
        rows = _all_gather_rows(local, process_group)  # (world, 3, C)
        K, src = rows.shape[0], SRC_GATHERED
    rm, rv = running if running is not None else (out, out)
    _, tick, zero64 = scratch(dev, 0)
    grid = (cdiv(C, FINALIZE_BLOCK_C), 1, 1)
    GATHERED_FINALIZE(
        None,
        grid,
        rows,
        K,
        x.numel() // max(C, 1),
        C,
        tick,
        out,
        out if weight is None else weight,
        rm,
        rv,
        num_batches_tracked if update else zero64,
        0.0 if momentum is None else float(momentum),
        float(eps),
        src,
        int(weight is not None),
        int(update),
        int(update and momentum is None),
        FINALIZE_BLOCK_K,
        FINALIZE_BLOCK_C,
    )
    return out


def gather_stats(x: torch.Tensor, *, process_group=None, num_batches_tracked=None) -> torch.Tensor:
    """Every rank's (count, mean, M2) of x, (world, 3, C) fp32: one statistics launch (this rank's triple; with
    ``num_batches_tracked``, also += 1 there) and an all_gather, no host sync. The merge, the STAT_ROWS and the
    running statistics are left to the gathered apply kernel of :mod:`kernels.bn_relu` (sync BN in one launch
    less than :func:`finalize_stats`)."""
    x, channels_last = as_nchw_or_nhwc(x)
    local = torch.empty((3, x.shape[1]), device=x.device, dtype=torch.float32)
    track = num_batches_tracked is not None
    launch_stats(
        x,
        channels_last,
        local,
        triple=True,
        running=(local, local) if track else None,
        num_batches_tracked=num_batches_tracked,
    )
    return _all_gather_rows(local, process_group)


def _stats_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, M2, count) per channel; count: a 0-dim tensor of the statistics dtype on x's device (filled there:
    no host-to-device copy)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    M = x.numel() // x.shape[1]
    count = xf.new_full((), M)
    if xf.device.type == "cpu" or not xf.numel():  # two-pass in ATen on CPU: no cancellation
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        return mean, var * M, count
    # CUDA's var_mean is a one-pass fp32 Welford that lost ~2% of the variance at |mean|/std ~ 1e6 (H100,
    # torch 2.11): shift by one sample per channel first (x - x[0] is exact for nearby values, Sterbenz).
    # Not on CPU: there the result stays bitwise equal to aten's batch_norm statistics.
    shift = xf[:1, :, :1, :1]
    var, mean = torch.var_mean(xf - shift, dim=(0, 2, 3), unbiased=False)
    return mean + shift.flatten(), var * M, count


def channel_stats(
    x: torch.Tensor, *, backend: str = "triton", sync: bool = False, process_group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var, count) of x (N, C, H, W); fp32 vectors of length C (fp64 for torch fp64).

    ``sync=True`` with torch.distributed initialised merges the statistics of every rank in the group. ``count``:
    the elements per channel (the group's total when synced), a 0-dim tensor of the statistics dtype on x's device,
    never copied to the host.
    """
    if backend == "triton":
        out = finalize_stats(x, sync=sync, process_group=process_group)
        return out[ROW["mean"]], out[ROW["var"]], out[ROW["count"], 0]
    mean, m2, count = _stats_torch(x)
    if _dist_active(sync):
        mean, m2, count = _sync(mean, m2, count, process_group)
        return mean, m2 / count.clamp_min(1), count
    # divided by the host-side element count, as always: on CUDA aten multiplies by the reciprocal of a Python
    # divisor but divides by a device tensor (an ulp apart), and the torch backend's bits stay what they were
    return mean, m2 / max(x.numel() // x.shape[1], 1), count


def _sync(
    mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-backend merge over the group: (mean, M2, count as a 0-dim tensor of mean's dtype), no host sync."""
    local = torch.stack([count.expand_as(mean), mean, m2])
    g = _all_gather_rows(local, group)  # (world, 3, C)
    total, mean, m2 = merge_partials(g[:, 0], g[:, 1], g[:, 2])
    return mean, m2, total[0]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (kernels/aot.py compiles each for sm_80 and sm_90 in CI)


def aot_variants() -> list:
    """Every (kernel, dtypes, layout, tile) the CUDA launchers of this module can choose, as kernels.aot.Variant.

    Flags (triple, affine, running update, cumulative average) are runtime arguments (not specialised): they only
    steer the finalising program's epilogue, so one compiled kernel serves them all. The statistics kernel runs
    with 8 warps; the integer arguments that real shapes make multiples of 16 (C, HW, m_per_prog) are declared
    divisible, as the runtime JIT specialises them."""
    out = []
    flags = {"triple": "i32", "has_affine": "i32", "update": "i32", "cumulative": "i32"}
    for xs in TRITON_DTYPES.values():
        for cl, int64, block_m, block_c in bn_variant_tiles()["reduction"]:
            sig = {
                "x_ptr": f"*{xs}",
                "part_ptr": "*fp32",
                "tick_ptr": "*i32",
                "out_ptr": "*fp32",
                "w_ptr": "*fp32",
                "rmean_ptr": "*fp32",
                "rvar_ptr": "*fp32",
                "nbt_ptr": "*i64",
                **{s: "i32" for s in ("M", "C", "HW", "m_per_prog")},
                "momentum": "fp32",
                "eps": "fp32",
                **flags,
            }
            const = dict(CHANNELS_LAST=cl, INT64=int64, BLOCK_M=block_m, BLOCK_C=block_c, MERGE_K=merge_k(block_c))
            out.append(
                Variant(
                    _stats_kernel,
                    sig,
                    const,
                    num_warps=STATS_WARPS,
                    kernel="channel_stats",
                    dtypes=f"x={xs}",
                    divisible=("C", "HW", "m_per_prog"),
                    barrier_free_loop=True,
                    config=f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} {block_m}x{block_c}",
                )
            )
    sig = {
        "g_ptr": "*fp32",
        "K": "i32",
        "M": "i32",
        "C": "i32",
        "tick_ptr": "*i32",
        "out_ptr": "*fp32",
        "w_ptr": "*fp32",
        "rmean_ptr": "*fp32",
        "rvar_ptr": "*fp32",
        "nbt_ptr": "*i64",
        "momentum": "fp32",
        "eps": "fp32",
        "source": "i32",
        **{k: "i32" for k in ("has_affine", "update", "cumulative")},
    }
    out.append(
        Variant(
            _gathered_finalize_kernel,
            sig,
            dict(BLOCK_K=FINALIZE_BLOCK_K, BLOCK_C=FINALIZE_BLOCK_C),
            kernel="stats_finalize",
            dtypes="fp32",
            config="gathered/running",
        )
    )
    return out
