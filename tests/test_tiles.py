"""The tile tables of :mod:`kernels.tiles` and the ahead-of-time variants: every tile a BN launcher can choose is
compiled by the AOT check (``tests/test_aot_compile.py``), so changing a threshold or adding a tile cannot drop
compile coverage; and the launchers really choose from the table (a shape on each side of every threshold)."""

from __future__ import annotations

import importlib

import pytest
import torch

tiles = importlib.import_module("kernels.tiles")
bn_relu_mod = importlib.import_module("kernels.bn_relu")
bn_stats_mod = importlib.import_module("kernels.bn_stats")

ELEMENTWISE = {"bn_relu_forward", "bn_relu_forward_gathered", "bn_relu_backward"}
REDUCTION = {"channel_stats", "bn_relu_grad_sums"}


def _variants():
    return bn_relu_mod.aot_variants() + bn_stats_mod.aot_variants()


def test_every_table_entry_is_an_aot_variant():
    table = tiles.bn_variant_tiles()
    vs = _variants()
    for kernel in ELEMENTWISE:
        got = {
            (v.constexprs["CHANNELS_LAST"], v.constexprs["BLOCK_R"], v.constexprs["BLOCK_L"])
            for v in vs
            if v.kernel == kernel
        }
        assert set(table["elementwise"]) <= got, (kernel, set(table["elementwise"]) - got)
        for int64 in (False, True):  # both offset widths of every tile
            w = {
                (v.constexprs["CHANNELS_LAST"], v.constexprs["BLOCK_R"], v.constexprs["BLOCK_L"])
                for v in vs
                if v.kernel == kernel and v.constexprs["INT64"] == int64
            }
            assert set(table["elementwise"]) <= w, (kernel, int64)
    for kernel in REDUCTION:
        got = {
            (v.constexprs["CHANNELS_LAST"], v.constexprs["INT64"], v.constexprs["BLOCK_M"], v.constexprs["BLOCK_C"])
            for v in vs
            if v.kernel == kernel
        }
        assert set(table["reduction"]) <= got, (kernel, set(table["reduction"]) - got)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("C,HW", [(16, 16), (17, 17), (64, 49), (3, 4)])
@pytest.mark.parametrize("int64", [False, True])
def test_launchers_choose_from_the_table(monkeypatch, channels_last, C, HW, int64):
    """What the geometry of a real tensor picks is a table entry (the AOT list covers what runs)."""
    monkeypatch.setattr(importlib.import_module("kernels._common"), "INT64_FROM", 0 if int64 else 2**31)
    x = torch.empty(2, C, HW, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = tiles.geometry(x, channels_last)
    table = tiles.bn_variant_tiles()
    assert (channels_last, g.block_r, g.block_l) in table["elementwise"]
    assert (channels_last, int64, g.red.block_m, g.red.block_c) in table["reduction"]


def test_a_new_tile_is_compiled(monkeypatch):
    """Adding a tile to the table adds AOT variants (nothing else to edit): a 32-channel elementwise tile."""
    before = len(_variants())
    monkeypatch.setattr(tiles, "NHWC_BLOCK_L", (16, 32, 64))
    after = _variants()
    assert len(after) > before
    assert any(
        v.kernel == "bn_relu_forward" and v.constexprs["BLOCK_L"] == 32 and v.constexprs["CHANNELS_LAST"] for v in after
    )
