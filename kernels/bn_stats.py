"""Per-channel batch statistics of an (N, C, H, W) tensor, NCHW or channels_last, fp32/fp16/bf16 in.

Two-level and cancellation-free: each program runs Welford/Chan updates over tiles of its slice of the
N*H*W positions (fp32), writing a partial (mean, M2) per channel; the launcher merges the partials with
Chan's formula. No E[x^2] - E[x]^2 anywhere, so inputs with |mean| >> std keep their precision.
With ``sync=True`` and torch.distributed initialised, the per-rank (count, mean, M2) are all-gathered
and merged the same way (gloo on CPU, NCCL on GPU).

Layout convention shared with :mod:`kernels.bn_relu`: an element at (n, c, hw) with m = n*HW + hw sits at
``m*C + c`` (channels_last) or ``(n*C + c)*HW + hw`` (NCHW).
"""

from __future__ import annotations

import torch

from . import _runtime  # first: sets TRITON_INTERPRET before triton.jit runs
from ._runtime import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _element_offsets(ms, cs, C, HW, CHANNELS_LAST: tl.constexpr):
        if CHANNELS_LAST:
            return ms[:, None] * C + cs[None, :]
        n = ms // HW
        return (n * C * HW + ms % HW)[:, None] + cs[None, :] * HW

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
        pivot = tl.load(x_ptr + _element_offsets(tl.zeros([1], dtype=tl.int32), cs, C, HW, CHANNELS_LAST),
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
        tl.store(mean_ptr + out, mean, mask=cmask)  # still shifted: the launcher merges, then adds the pivot
        tl.store(m2_ptr + out, m2, mask=cmask)


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
        block_c = min(64, triton.next_power_of_2(C))
        return max(16, 2048 // block_c), block_c
    return 128, min(16, triton.next_power_of_2(C))


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


def _stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x, channels_last = as_nchw_or_nhwc(x)
    N, C, H, W = x.shape
    M, HW = N * H * W, H * W
    block_m, block_c, c_blocks, splits, m_per_prog = reduction_grid(x, channels_last)
    mean = torch.empty((splits, C), device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _channel_stats_kernel[(c_blocks, splits)](
        x, mean, m2, M, C, HW, m_per_prog,
        CHANNELS_LAST=channels_last, INT64=x.numel() >= 2**31, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    counts = (M - torch.arange(splits, device=x.device, dtype=torch.float32) * m_per_prog).clamp(0, m_per_prog)
    _, mean, m2 = merge_partials(counts, mean, m2)
    pivot = x[0, :, 0, 0].float()
    return mean + pivot, m2, M


def _stats_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)  # two-pass in ATen: no cancellation
    M = x.numel() // x.shape[1]
    return mean, var * M, M


def channel_stats(
    x: torch.Tensor, *, backend: str = "triton", sync: bool = False, process_group=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, biased var, count) of x (N, C, H, W); fp32 vectors of length C.

    ``sync=True`` with torch.distributed initialised merges the statistics of every rank in the group.
    """
    mean, m2, count = (_stats_triton if backend == "triton" else _stats_torch)(x)
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        mean, m2, count = _sync(mean, m2, count, process_group)
    return mean, m2 / max(count, 1), count


def _sync(mean: torch.Tensor, m2: torch.Tensor, count: int, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.stack([torch.full_like(mean, float(count)), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    stacked = torch.stack(gathered)  # (world, 3, C)
    total, mean, m2 = merge_partials(stacked[:, 0], stacked[:, 1], stacked[:, 2])
    return mean, m2, int(total[0].item())
