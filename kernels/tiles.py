"""Tile and grid tables of the BN kernels, in one place, and the cached geometry of a tensor.

Every tile, warp count and threshold the BN launchers choose lives here; :func:`bn_variant_tiles` lists every
tile they can choose per layout and offset width, and the ahead-of-time variants (:mod:`kernels.aot`) loop over
exactly that list, so moving a threshold or adding a tile cannot drop compile coverage
(``tests/test_tiles.py`` checks that each entry appears among the AOT variants). The implicit-GEMM tiles have
their own table with their spill reasoning (``GPU_CONFIGS`` in :mod:`kernels.conv`).

A :class:`Geometry` is everything about an (N, C, H, W) tensor's launches that depends on its shape, layout,
offset width and device alone (the elementwise view and grid, the reduction grid), computed once per signature
(:func:`geometry`) and carried by the BN parameters from forward to backward, so a training step does the
arithmetic once per layer shape, not once per launch.

A leaf module: torch, :mod:`._runtime`, :mod:`._common`, :mod:`.launch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import _common, _runtime
from ._common import cdiv
from .launch import Slot

# ---- elementwise kernels (apply, dx): (rows, cols) view of x; NCHW rows are (n, c), channels_last rows positions
ELEMENTWISE_TILE = 4096  # elements per program: 16 per thread at 8 warps (2-4 vector loads per operand)
NCHW_BLOCK_L = (16, 64)  # spatial positions per row segment: 16 when H*W <= 16, else 64
NHWC_BLOCK_L = (16, 64)  # channels per tile: 16 when C <= 16, else 64
ELEMENTWISE_WARPS = 8  # 4 warps spilled on sm_80 (leaky, fp32)

# ---- reductions (statistics, gradient sums): (BLOCK_M positions, BLOCK_C channels) tiles, 8 warps
STATS_WARPS = 8
REDUCTION_TILES = {  # (channels_last, C > 16) -> (BLOCK_M, BLOCK_C); the contiguous axis gets the long side
    (True, True): (64, 64),
    (True, False): (256, 16),
    (False, True): (256, 16),
    (False, False): (256, 16),
}
INT64_BLOCK_M_DIVISOR = 2  # 64-bit offsets of 16 elements per thread spilled on sm_80/sm_90 with fp32 input
MIN_TILES_PER_PROGRAM = 4  # fewer, longer programs: the last program's merge of all partials stays short
MERGE_ELEMENTS = 1024  # partials merged per step by the finalising program: MERGE_K = MERGE_ELEMENTS // BLOCK_C
TICKETS = 1 << 16  # per-device ticket slots (channel blocks + 1); plenty for C = 2**16 at 16 channels a block

# ---- the gathered finalize (sync BN, eval statistics)
FINALIZE_BLOCK_K, FINALIZE_BLOCK_C = 16, 64  # ranks per merge step, channels per program


def tile_sizes(C: int, channels_last: bool, int64: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of the reduction kernels for C channels."""
    block_m, block_c = REDUCTION_TILES[(bool(channels_last), C > 16)]
    return (block_m // INT64_BLOCK_M_DIVISOR if int64 else block_m), block_c


def merge_k(block_c: int) -> int:
    return MERGE_ELEMENTS // block_c


def elementwise_tiling(shape: tuple[int, int, int, int], channels_last: bool) -> tuple[int, int, int, int]:
    """(R, L, BLOCK_R, BLOCK_L) of the (rows, cols) view of an (N, C, H, W) tensor: NCHW rows are (n, c) of
    length H*W, channels_last rows are positions of length C."""
    N, C, H, W = shape
    R, L = (N * H * W, C) if channels_last else (N * C, H * W)
    blocks = NHWC_BLOCK_L if channels_last else NCHW_BLOCK_L
    block_l = blocks[0] if L <= blocks[0] else blocks[1]
    return R, L, ELEMENTWISE_TILE // block_l, block_l


def elementwise_grid(R: int, L: int, block_r: int, block_l: int, channels_last: bool) -> tuple[int, int, int]:
    """Grid of the elementwise kernels: (row blocks, column blocks) for channels_last, (column, row blocks) for
    NCHW (axis 0, up to 2**31 - 1 programs, takes the long side)."""
    rb, lb = cdiv(R, block_r), cdiv(L, block_l)
    grid = (rb, lb, 1) if channels_last else (lb, rb, 1)
    if grid[1] > 65535:
        raise ValueError(
            f"BN-ReLU grid {grid[:2]} exceeds CUDA's 65535 programs on axis 1 "
            f"({'C' if channels_last else 'N*C'} too large)"
        )
    return grid


def bn_variant_tiles() -> dict:
    """Every tile the BN launchers can choose, per kernel family, for the AOT variants:
    ``{"elementwise": [(channels_last, BLOCK_R, BLOCK_L)],
    "reduction": [(channels_last, int64, BLOCK_M, BLOCK_C)]}``."""
    ew = [(cl, ELEMENTWISE_TILE // bl, bl) for cl in (False, True) for bl in (NHWC_BLOCK_L if cl else NCHW_BLOCK_L)]
    red = sorted(
        {(cl, i64, *tile_sizes(c, cl, i64)) for cl in (False, True) for i64 in (False, True) for c in (16, 17)}
    )  # one channel count on each side of the C > 16 threshold
    return {"elementwise": ew, "reduction": red}


class ReductionGrid:
    """Geometry of a per-channel reduction over an (N, C, H, W) tensor (one per shape, layout and device hint)."""

    __slots__ = ("M", "C", "HW", "block_m", "block_c", "merge_k", "c_blocks", "splits", "m_per_prog", "grid", "int64")

    def __init__(self, shape, channels_last: bool, hint: int, int64: bool):
        N, C, H, W = shape
        self.M, self.C, self.HW = N * H * W, C, H * W
        self.block_m, self.block_c = tile_sizes(C, channels_last, int64)
        self.merge_k = merge_k(self.block_c)
        self.c_blocks = cdiv(C, self.block_c)
        tiles = cdiv(self.M, self.block_m)
        splits = max(1, min(cdiv(tiles, MIN_TILES_PER_PROGRAM), hint // self.c_blocks))
        self.m_per_prog = cdiv(cdiv(self.M, splits), self.block_m) * self.block_m
        self.splits = cdiv(self.M, self.m_per_prog) if self.M else 1
        self.grid = (self.c_blocks, self.splits, 1)
        self.int64 = int64
        if self.c_blocks + 1 > TICKETS:
            raise ValueError(f"{C} channels need more than {TICKETS} ticket slots")


class Geometry:
    """The launch geometry of one (shape, layout, offset width, device) signature: the elementwise view
    (``R``, ``L``, ``block_r``, ``block_l``, ``ew_grid``), the reduction grid (``red``, built on first use) and
    a dict of launch slots the launchers fill (``slots``: their keys add dtypes, activation and alignment)."""

    __slots__ = (
        "shape",
        "channels_last",
        "int64",
        "device",
        "hint",
        "R",
        "L",
        "block_r",
        "block_l",
        "_ew_grid",
        "_red",
        "slots",
    )

    def __init__(self, shape, channels_last: bool, int64: bool, device: torch.device, hint: int):
        self.shape, self.channels_last, self.int64, self.device, self.hint = shape, channels_last, int64, device, hint
        self.R, self.L, self.block_r, self.block_l = elementwise_tiling(shape, channels_last)
        self._ew_grid = self._red = None
        self.slots: dict = {}

    def slot(self, key, kernel, grid: tuple, num_warps: int) -> Slot:
        """The launch slot of ``key`` (dtypes, activation, alignment: what the shape does not fix) for this
        geometry, created on first use."""
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(kernel, grid, num_warps)
        return slot

    @property
    def ew_grid(self) -> tuple[int, int, int]:
        if self._ew_grid is None:  # lazily: only the elementwise kernels' grid limit can refuse a shape
            self._ew_grid = elementwise_grid(self.R, self.L, self.block_r, self.block_l, self.channels_last)
        return self._ew_grid

    @property
    def red(self) -> ReductionGrid:
        if self._red is None:
            self._red = ReductionGrid(self.shape, self.channels_last, self.hint, self.int64)
        return self._red


_geometries: dict = {}


def geometry(x: torch.Tensor, channels_last: bool) -> Geometry:
    """The cached :class:`Geometry` of a dense (N, C, H, W) tensor in the given layout. The key holds every
    module-level tunable the geometry reads (tests change them), so a change can never reuse a stale one."""
    int64 = x.numel() >= _common.INT64_FROM
    key = (x.shape, channels_last, int64, x.device, _runtime.PROGRAMS_HINT, MIN_TILES_PER_PROGRAM, MERGE_ELEMENTS)
    g = _geometries.get(key)
    if g is None:
        g = _geometries[key] = Geometry(x.shape, channels_last, int64, x.device, _runtime.num_programs_hint(x))
    return g


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants: each kernel module lists its own (``aot_variants()``) from the tables above


@dataclass
class Variant:
    """One compilable kernel variant: the launch a launcher makes on CUDA, minus the tensors."""

    fn: Any  # the @triton.jit function (a JITFunction: import with TRITON_INTERPRET=0)
    signature: dict  # runtime argument name -> Triton type ("*bf16", "i32", "fp32", ...)
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = ""  # launcher / kernel label for the table
    dtypes: str = ""
    config: str = ""
    tensor_cores: bool = False  # must use tensor-core MMA instructions (wgmma on sm_90, mma on sm_80)
    divisible: tuple = field(default=())  # extra integer args assumed divisible by 16 (pointers always are)
    archs: tuple = field(default=())  # compile only for these compute capabilities (empty: every --arch)
    single_k_loop: bool = False  # its MMAs must sit in one loop (sm_90: with one async-copy wait, a pipelined K loop)
    tma: int = 0  # how many MMA operands come through a TMA tensor descriptor (cp.async.bulk.tensor, mbarrier waits)
    # reductions: the loop that streams the tensor (plain ld.global) has no bar.sync (per-lane accumulation)
    barrier_free_loop: bool = False
    vector_loads: bool = False  # elementwise passes: data loads vectorised (ld.global.v2/.v4) when L % 16 == 0

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__
