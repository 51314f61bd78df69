"""Per-channel batch statistics of an (N, C, H, W) tensor, NCHW or channels_last, fp32/fp16/bf16 in.

Two-level and cancellation-free: each program of ``_channel_stats_kernel`` runs Welford/Chan updates over
tiles of its slice of the N*H*W positions (fp32), writing a partial (mean, M2) per channel; one launch of
``_stats_finalize_kernel`` merges the partials with Chan's formula and writes every per-channel vector the
BN-ReLU kernels need (mean, var, rstd, scale = gamma * rstd, count), updating the module's running statistics
in place. No E[x^2] - E[x]^2 anywhere, so inputs with |mean| >> std keep their precision.
With ``sync=True`` and torch.distributed initialised, the per-rank (count, mean, M2) are all-gathered and
merged the same way (gloo on CPU, NCCL on GPU); the count stays a device tensor (no host sync).

Layout convention shared with :mod:`kernels.bn_relu`: an element at (n, c, hw) with m = n*HW + hw sits at
``m*C + c`` (channels_last) or ``(n*C + c)*HW + hw`` (NCHW).
"""

from __future__ import annotations

import torch

from . import _runtime  # first: sets TRITON_INTERPRET before triton.jit runs
from ._runtime import HAS_TRITON

# Rows of the (len(STAT_ROWS), C) fp32 buffer the finalize kernel writes (one allocation, views per row).
STAT_ROWS = ("mean", "var", "rstd", "scale", "count")
# Partial-statistics sources of the finalize kernel.
SRC_TILES, SRC_GATHERED, SRC_RUNNING = 0, 1, 2
FINALIZE_BLOCK_K, FINALIZE_BLOCK_C = 16, 64
INT64_FROM = 2**31  # tensors with at least this many elements get int64 offsets (tests lower it)


def needs_int64(x: torch.Tensor) -> bool:
    return x.numel() >= INT64_FROM

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _element_offsets(ms, cs, C, HW, CHANNELS_LAST: tl.constexpr):
        """(BLOCK_M, BLOCK_C) element offsets of positions ``ms`` (m = n*HW + hw) and channels ``cs``, in ms's
        integer type (int64 ms: int64 offsets throughout, c*HW included)."""
        cs = cs.to(ms.dtype)
        if CHANNELS_LAST:
            offs = ms[:, None] * C + cs[None, :]
        else:
            offs = ((ms // HW) * C * HW + ms % HW)[:, None] + cs[None, :] * HW
        return offs

    @triton.jit
    def _channel_stats_kernel(
        x_ptr, mean_ptr, m2_ptr, M, C, HW, m_per_prog,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Partial (mean - pivot, M2) of channels [pid_c*BLOCK_C, +BLOCK_C) over positions [pid_m*m_per_prog, +m_per_prog)."""
        pid_c = tl.program_id(0)
        pid_m = tl.program_id(1)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        m_start = pid_m * m_per_prog
        m_end = tl.minimum(m_start + m_per_prog, M)
        # Shift by a per-channel pivot (the channel's first element) so tile sums are of small numbers:
        # fp32 sums of values near a large mean would otherwise lose the variance.
        m_first = tl.zeros([1], dtype=tl.int32)
        if INT64:
            m_first = m_first.to(tl.int64)
        pivot = tl.load(x_ptr + _element_offsets(m_first, cs, C, HW, CHANNELS_LAST),
                        mask=cmask[None, :], other=0.0).to(tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = 0.0
        for m0 in range(m_start, m_end, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            mmask = ms < m_end
            if INT64:
                ms = ms.to(tl.int64)
            mask = mmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + _element_offsets(ms, cs, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x - pivot, 0.0)
            n_tile = tl.sum(mmask.to(tl.float32), axis=0)
            tile_mean = tl.sum(x, axis=0) / n_tile
            d = tl.where(mask, x - tile_mean[None, :], 0.0)
            tile_m2 = tl.sum(d * d, axis=0)
            total = count + n_tile
            delta = tile_mean - mean
            mean += delta * (n_tile / total)
            m2 += tile_m2 + delta * delta * (count * n_tile / total)
            count = total
        out = pid_m * C + cs
        tl.store(mean_ptr + out, mean, mask=cmask)  # still shifted: the finalize kernel merges, then adds the pivot
        tl.store(m2_ptr + out, m2, mask=cmask)

    @triton.jit
    def _stats_finalize_kernel(
        cnt_ptr, mean_ptr, m2_ptr, part_stride, K, M, m_per_prog, x_ptr, x_c_stride, C,
        w_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum, eps, out_ptr,
        SOURCE: tl.constexpr, PARAMS: tl.constexpr, HAS_AFFINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
        CUMULATIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Chan-merge K partial (count, mean, M2) per channel; write BN parameters or a (count, mean, M2) triple.

        SOURCE 0: partials of _channel_stats_kernel, rows k of mean_ptr/m2_ptr (stride part_stride), counts
        min(m_per_prog, M - k*m_per_prog), means relative to the pivot x[0, c, 0, 0] (at x_ptr + c*x_c_stride).
        SOURCE 1: (count, mean, M2) rows of K ranks (all-gathered), counts read from cnt_ptr.
        SOURCE 2: no partials: mean/var are the running statistics (eval, frozen BN).
        PARAMS: write rows (mean, var, rstd, scale = gamma*rstd, count) to out_ptr (5, C); else (count, mean, M2)
        (3, C). UPDATE_RUNNING: running_mean/var lerp towards mean/unbiased var by ``momentum`` (CUMULATIVE:
        by 1/num_batches_tracked read from nbt_ptr, already incremented).
        """
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            mask = kmask[:, None] & cmask[None, :]
            offs = ks[:, None] * part_stride + cs[None, :]
            if SOURCE == 1:
                n = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
            else:
                n = tl.where(mask, tl.minimum(tl.maximum(M - ks * m_per_prog, 0), m_per_prog).to(tl.float32)[:, None], 0.0)
            mu = tl.load(mean_ptr + offs, mask=mask, other=0.0)
            q = tl.load(m2_ptr + offs, mask=mask, other=0.0)
            n_tile = tl.sum(n, axis=0)
            tile_mean = tl.sum(n * mu, axis=0) / tl.maximum(n_tile, 1.0)
            d = tl.where(n > 0.0, mu - tile_mean[None, :], 0.0)
            tile_m2 = tl.sum(q + n * d * d, axis=0)
            total = count + n_tile
            delta = tile_mean - mean
            mean += delta * (n_tile / tl.maximum(total, 1.0))
            m2 += tile_m2 + delta * delta * (count * n_tile / tl.maximum(total, 1.0))
            count = total
        if SOURCE == 0:
            mean += tl.load(x_ptr + cs.to(tl.int64) * x_c_stride, mask=cmask, other=0.0).to(tl.float32)
        if PARAMS:
            if SOURCE == 2:
                mean = tl.load(rmean_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                var = tl.load(rvar_ptr + cs, mask=cmask, other=1.0).to(tl.float32)
                count = tl.zeros([BLOCK_C], dtype=tl.float32) + M
            else:
                var = m2 / tl.maximum(count, 1.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            if HAS_AFFINE:
                scale = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) * rstd
            else:
                scale = rstd
            tl.store(out_ptr + cs, mean, mask=cmask)
            tl.store(out_ptr + C + cs, var, mask=cmask)
            tl.store(out_ptr + 2 * C + cs, rstd, mask=cmask)
            tl.store(out_ptr + 3 * C + cs, scale, mask=cmask)
            tl.store(out_ptr + 4 * C + cs, count, mask=cmask)
            if UPDATE_RUNNING:
                if CUMULATIVE:
                    factor = 1.0 / tl.load(nbt_ptr).to(tl.float32)
                else:
                    factor = momentum
                unbiased = m2 / tl.maximum(count - 1.0, 1.0)
                rm = tl.load(rmean_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(rvar_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                tl.store(rmean_ptr + cs, (rm + factor * (mean - rm)).to(rmean_ptr.dtype.element_ty), mask=cmask)
                tl.store(rvar_ptr + cs, (rv + factor * (unbiased - rv)).to(rvar_ptr.dtype.element_ty), mask=cmask)
        else:
            tl.store(out_ptr + cs, count, mask=cmask)
            tl.store(out_ptr + C + cs, mean, mask=cmask)
            tl.store(out_ptr + 2 * C + cs, m2, mask=cmask)


def as_nchw_or_nhwc(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x, channels_last): x made dense in one of the two layouts the kernels index."""
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def tile_sizes(C: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): the contiguous axis gets the long side of the tile, for coalesced loads."""
    if channels_last:
        return (128, 16) if C <= 16 else (32, 64)
    return 128, 16


def reduction_grid(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_C, channel blocks, splits, positions per program) for a per-channel reduction of x."""
    N, C, H, W = x.shape
    M = N * H * W
    block_m, block_c = tile_sizes(C, channels_last)
    c_blocks = triton.cdiv(C, block_c)
    splits = max(1, min(triton.cdiv(M, block_m), _runtime.num_programs_hint(x) // c_blocks))
    m_per_prog = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return block_m, block_c, c_blocks, triton.cdiv(M, m_per_prog), m_per_prog


def merge_partials(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of K partial statistics: (K,) or (K, C) counts, (K, C) means and M2 -> (count, mean, M2)."""
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


def finalize_stats(
    x: torch.Tensor, *, weight: torch.Tensor | None = None, eps: float = 1e-5, sync: bool = False,
    process_group=None, running: tuple[torch.Tensor, torch.Tensor] | None = None, momentum: float | None = 0.1,
    num_batches_tracked: torch.Tensor | None = None, use_running: bool = False,
) -> torch.Tensor:
    """Triton statistics of x as one (5, C) fp32 tensor, rows :data:`STAT_ROWS` (mean, var, rstd, scale, count).

    Batch statistics (merged over the group with ``sync``) unless ``use_running``, then ``running``'s.
    ``weight``: gamma (scale = gamma * rstd; rstd without it). ``running`` = (running_mean, running_var),
    updated in place with batch statistics (unbiased variance) by ``momentum``, or by 1/num_batches_tracked
    when ``momentum`` is None (the caller increments ``num_batches_tracked`` first). Launches: stats kernel +
    finalize (+ all_gather and a second finalize with ``sync``); eval: finalize only.
    """
    x, channels_last = as_nchw_or_nhwc(x)
    N, C, H, W = x.shape
    M, HW = N * H * W, H * W
    dev = x.device
    out = torch.empty((len(STAT_ROWS), C), device=dev, dtype=torch.float32)
    has_affine = weight is not None
    w = weight.detach().float() if has_affine else out  # dummies are never read
    update = running is not None and not use_running
    if running is not None:
        rmean, rvar = running
        if rmean.dtype != torch.float32 or rvar.dtype != torch.float32:
            raise TypeError("the triton BN statistics need fp32 running_mean/running_var buffers")
    else:
        rmean = rvar = out
    cumulative = update and momentum is None
    nbt = num_batches_tracked if cumulative else out
    fin_grid = (triton.cdiv(C, FINALIZE_BLOCK_C),)
    common = dict(PARAMS=True, HAS_AFFINE=has_affine, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
                  BLOCK_K=FINALIZE_BLOCK_K, BLOCK_C=FINALIZE_BLOCK_C)
    mom = 0.0 if momentum is None else float(momentum)
    if use_running:
        _stats_finalize_kernel[fin_grid](out, out, out, C, 0, M, 1, out, 0, C, w, rmean, rvar, nbt, mom, eps, out,
                                         SOURCE=SRC_RUNNING, **common)
        return out
    block_m, block_c, c_blocks, splits, m_per_prog = reduction_grid(x, channels_last)
    part = torch.empty((2, splits, C), device=dev, dtype=torch.float32)
    _channel_stats_kernel[(c_blocks, splits)](
        x, part[0], part[1], M, C, HW, m_per_prog,
        CHANNELS_LAST=channels_last, INT64=needs_int64(x), BLOCK_M=block_m, BLOCK_C=block_c,
    )
    x_c_stride = x.stride(1)
    if not _dist_active(sync):
        _stats_finalize_kernel[fin_grid](out, part[0], part[1], C, splits, M, m_per_prog, x, x_c_stride, C,
                                         w, rmean, rvar, nbt, mom, eps, out, SOURCE=SRC_TILES, **common)
        return out
    local = torch.empty((3, C), device=dev, dtype=torch.float32)  # (count, mean, M2) of this rank
    _stats_finalize_kernel[fin_grid](out, part[0], part[1], C, splits, M, m_per_prog, x, x_c_stride, C,
                                     out, out, out, out, 0.0, eps, local, SOURCE=SRC_TILES,
                                     **dict(common, PARAMS=False, HAS_AFFINE=False, UPDATE_RUNNING=False,
                                            CUMULATIVE=False))
    g = _all_gather_rows(local, process_group)  # (world, 3, C)
    _stats_finalize_kernel[fin_grid](g[:, 0], g[:, 1], g[:, 2], 3 * C, g.shape[0], 0, 1, out, 0, C,
                                     w, rmean, rvar, nbt, mom, eps, out, SOURCE=SRC_GATHERED, **common)
    return out


def _stats_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    M = x.numel() // x.shape[1]
    if xf.device.type == "cpu" or not xf.numel():  # two-pass in ATen on CPU: no cancellation
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        return mean, var * M, M
    # CUDA's var_mean is a one-pass fp32 Welford that lost ~2% of the variance at |mean|/std ~ 1e6 (H100,
    # torch 2.11): shift by one sample per channel first (x - x[0] is exact for nearby values, Sterbenz).
    # Not on CPU: there the result stays bitwise equal to aten's batch_norm statistics.
    shift = xf[:1, :, :1, :1]
    var, mean = torch.var_mean(xf - shift, dim=(0, 2, 3), unbiased=False)
    return mean + shift.flatten(), var * M, M


def channel_stats(
    x: torch.Tensor, *, backend: str = "triton", sync: bool = False, process_group=None
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """Per-channel (mean, biased var, count) of x (N, C, H, W); fp32 vectors of length C (fp64 for torch fp64).

    ``sync=True`` with torch.distributed initialised merges the statistics of every rank in the group; the
    count is then a 0-dim device tensor (the group's total, never copied to the host), else an int.
    """
    if backend == "triton":
        out = finalize_stats(x, sync=sync, process_group=process_group)
        count = out[4, 0] if _dist_active(sync) else x.numel() // x.shape[1]
        return out[0], out[1], count
    mean, m2, count = _stats_torch(x)
    if _dist_active(sync):
        mean, m2, count = _sync(mean, m2, count, process_group)
        return mean, m2 / count.clamp_min(1), count
    return mean, m2 / max(count, 1), count


def _sync(mean: torch.Tensor, m2: torch.Tensor, count: int, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-backend merge over the group: (mean, M2, count as a 0-dim tensor of mean's dtype), no host sync."""
    local = torch.stack([torch.full_like(mean, float(count)), mean, m2])
    g = _all_gather_rows(local, group)  # (world, 3, C)
    total, mean, m2 = merge_partials(g[:, 0], g[:, 1], g[:, 2])
    return mean, m2, total[0]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (kernels/aot.py compiles each for sm_80 and sm_90 in CI)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_variants() -> list:
    """Every (kernel, dtypes, flags, tile) the CUDA launchers of this module can choose, as kernels.aot.Variant.

    Launches use Triton's defaults (4 warps, 3 stages). The finalize kernel sees fp32 vectors only (weights and
    running statistics of other dtypes are converted by the launcher); its x pointer is read only for SOURCE 0.
    """
    from .aot import Variant

    out = []
    for xdt, xs in _DTYPES.items():
        for cl in (False, True):
            for block_m, block_c in sorted({tile_sizes(c, cl) for c in (1, 16, 17, 4096)}):
                for int64 in (False, True):
                    sig = {"x_ptr": f"*{xs}", "mean_ptr": "*fp32", "m2_ptr": "*fp32",
                           **{s: "i32" for s in ("M", "C", "HW", "m_per_prog")}}
                    out.append(Variant(_channel_stats_kernel, sig, dict(CHANNELS_LAST=cl, INT64=int64,
                                                                        BLOCK_M=block_m, BLOCK_C=block_c),
                                       kernel="channel_stats", dtypes=f"x={xs}",
                                       config=f"{'nhwc' if cl else 'nchw'}{' i64' if int64 else ''} "
                                              f"{block_m}x{block_c}"))
    # (SOURCE, PARAMS, HAS_AFFINE, UPDATE_RUNNING, CUMULATIVE) the launcher can pass
    flags = [(SRC_TILES, False, False, False, False), (SRC_RUNNING, True, False, False, False),
             (SRC_RUNNING, True, True, False, False)]
    for src in (SRC_TILES, SRC_GATHERED):
        for affine in (False, True):
            flags += [(src, True, affine, False, False), (src, True, affine, True, False),
                      (src, True, affine, True, True)]
    for src, params, affine, update, cumulative in flags:
        for xdt, xs in (_DTYPES.items() if src == SRC_TILES else [(torch.float32, "fp32")]):
            sig = {"cnt_ptr": "*fp32", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "part_stride": "i32", "K": "i32",
                   "M": "i32", "m_per_prog": "i32", "x_ptr": f"*{xs}", "x_c_stride": "i32", "C": "i32",
                   "w_ptr": "*fp32", "rmean_ptr": "*fp32", "rvar_ptr": "*fp32",
                   "nbt_ptr": "*i64" if cumulative else "*fp32", "momentum": "fp32", "eps": "fp32", "out_ptr": "*fp32"}
            const = dict(SOURCE=src, PARAMS=params, HAS_AFFINE=affine, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
                         BLOCK_K=FINALIZE_BLOCK_K, BLOCK_C=FINALIZE_BLOCK_C)
            label = ["tiles", "gathered", "running"][src] + ("" if params else " triple") + (" affine" if affine else "") \
                + (" update" if update else "") + (" cumulative" if cumulative else "")
            out.append(Variant(_stats_finalize_kernel, sig, const, kernel="stats_finalize",
                               dtypes=f"x={xs}" if src == SRC_TILES else "fp32", config=label))
    return out
