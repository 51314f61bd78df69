"""GPU-shaped reduction grids and numerics edges, run on CPU under the Triton interpreter.

On CPU the reduction launchers aim for a handful of programs, so the statistics and gradient merges see one
block of partials; every real GPU layer sees hundreds (4 x 132 programs on an H100). Here the programs hint is
forced to GPU sizes (and to odd counts) so that every multi-block merge path runs, for batch statistics,
frozen statistics and synchronised statistics, against float64 references. Channels with zero or near-zero
variance make ``eps`` observable. The interpreter's numpy RuntimeWarnings (divide by zero, overflow, invalid)
are errors here: a kernel that divides by zero in a lane it keeps is wrong even when the result is masked.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import _runtime

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # also set for the interpreter in pyproject
bn_stats_mod = importlib.import_module("kernels.bn_stats")
tiles = importlib.import_module("kernels.tiles")

# an H100's 4 x 132 programs and an odd count (uneven splits per channel block)
HINTS = (4 * 132, 37)


def gpu_shaped(monkeypatch, hint: int = 4 * 132) -> None:
    """A GPU's programs hint; one tile per program and merge blocks of 64 partial elements, so that the small
    tensors an interpreter can afford produce as many merge blocks as a real layer does on the GPU (the merge
    code is the same; only its block size, a constexpr, shrinks)."""
    monkeypatch.setattr(_runtime, "PROGRAMS_HINT", hint)
    monkeypatch.setattr(tiles, "MIN_TILES_PER_PROGRAM", 1)
    monkeypatch.setattr(tiles, "MERGE_ELEMENTS", 64)


@pytest.fixture(params=HINTS, ids=lambda h: f"hint{h}")
def hint(request, monkeypatch):
    gpu_shaped(monkeypatch, request.param)
    return request.param


def _bn(C: int, frozen: bool = False, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.train(not frozen)


def _x(C: int, channels_last: bool, shape=None, offset: float = 0.5) -> torch.Tensor:
    # more partial blocks than one merge block takes: NCHW tiles hold 128 positions, channels_last ones 32
    N, H, W = shape or ((2, 20, 30) if channels_last else (2, 40, 40))
    x = torch.randn(N, C, H, W) * 2 + offset
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fp64_reference(x, bn, dy):
    """y, dx, dgamma, dbeta and the updated running statistics of relu(bn(x)) in float64 (plain torch)."""
    b = copy.deepcopy(bn).double()
    xr = x.detach().double().requires_grad_()
    y = F.relu(b(xr))
    y.backward(dy.double())
    return y.detach(), xr.grad, b.weight.grad, b.bias.grad, b.running_mean, b.running_var


def _run(x, bn, dy, **kw):
    x = x.detach().clone().requires_grad_()
    y = kernels.bn_relu(x, bn, backend="triton", **kw)
    y.backward(dy)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _assert_close(actual, expected, what, rtol=1e-4):
    # relative to the reference's magnitude (the fp32 kernels against exact fp64)
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


NAMES = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("frozen", [False, True], ids=["batch", "frozen"])
def test_multi_block_merges_match_fp64(hint, channels_last, frozen):
    """Statistics, running statistics and the gradient sums merged from many partial blocks equal float64
    (70 channels: several channel blocks in both layouts, a partial last one)."""
    C = 70
    x = _x(C, channels_last)
    bn = _bn(C, frozen)
    g = tiles.geometry(x, channels_last).red
    # the last program merges the partials in blocks: more than one block is merged
    assert g.splits > g.merge_k, (g.splits, g.block_c)
    dy = torch.randn_like(x)
    ref = _fp64_reference(x, bn, dy)
    got = _run(x, bn, dy)
    for name, a, e in zip(NAMES, got, ref):
        _assert_close(a, e, name)
    assert int(bn.num_batches_tracked) == (0 if frozen else 1)


def test_multi_block_merge_with_the_shipped_constants(monkeypatch):
    """The same with the merge block and tiles per program the GPU runs (channels_last, 70 channels: 75 tiles of
    64 positions, 18 programs per channel block, merged 16 at a time)."""
    monkeypatch.setattr(_runtime, "PROGRAMS_HINT", 4 * 132)
    x = _x(70, True, shape=(2, 40, 60))
    g = tiles.geometry(x, True).red
    assert g.splits > g.merge_k, (g.splits, g.block_c)
    bn = _bn(70)
    dy = torch.randn_like(x)
    ref = _fp64_reference(x, bn, dy)
    for name, a, e in zip(NAMES, _run(x, bn, dy), ref):
        _assert_close(a, e, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_stats_multi_block_fp64(monkeypatch, channels_last):
    """channel_stats alone (mean, biased var) from many partials, with a large common offset (|mean|/std 1e3)."""
    gpu_shaped(monkeypatch, 37)
    x = _x(70, channels_last, offset=1e3)
    mean, var, count = kernels.channel_stats(x, backend="triton")
    xd = x.double()
    assert count == x.numel() // 70
    _assert_close(mean, xd.mean((0, 2, 3)), "mean", rtol=1e-6)
    _assert_close(var, xd.var((0, 2, 3), unbiased=False), "var", rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("frozen", [False, True], ids=["batch", "frozen"])
def test_zero_and_near_zero_variance_channels(monkeypatch, channels_last, frozen):
    """A constant channel (a dead ReLU upstream) and a channel with variance 1e-10: rstd is 1/sqrt(var + eps),
    so eps decides the output; without it the constant channel divides by zero."""
    gpu_shaped(monkeypatch)
    x = _x(8, False, shape=(2, 20, 30))
    x[:, 0] = 3.0
    x[:, 1] = 5.0 + 1e-5 * torch.randn_like(x[:, 1])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = _bn(8, frozen)
    if frozen:  # a channel whose running variance is exactly zero
        with torch.no_grad():
            bn.running_var[0] = 0.0
    dy = torch.randn_like(x)
    ref = _fp64_reference(x, bn, dy)
    got = _run(x, bn, dy)
    for name, a, e in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        _assert_close(a, e, name, rtol=2e-4)


def test_sync_statistics_multi_block_single_rank(monkeypatch, tmp_path):
    """sync=True in a one-rank gloo group: the per-rank merge (before the all_gather) walks many partial blocks."""
    import torch.distributed as dist

    gpu_shaped(monkeypatch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for channels_last in (False, True):
            x = _x(70, channels_last)
            bn = _bn(70)
            dy = torch.randn_like(x)
            ref = _fp64_reference(x, bn, dy)
            got = _run(x, bn, dy, sync=True)
            for name, a, e in zip(NAMES, got, ref):
                _assert_close(a, e, f"{name} cl={channels_last}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_over_steps_multi_block(monkeypatch, momentum):
    """Three training steps (cumulative average with momentum=None) from many partials equal float64."""
    gpu_shaped(monkeypatch)
    bn = _bn(70, momentum=momentum)
    ref_bn = copy.deepcopy(bn).double()
    for step in range(3):
        x = _x(70, step % 2 == 1, shape=(2, 20, 30))  # 5+ merge blocks in either layout
        with torch.no_grad():
            kernels.bn_relu(x, bn, backend="triton")
            ref_bn(x.double())
    _assert_close(bn.running_mean, ref_bn.running_mean, "running_mean")
    _assert_close(bn.running_var, ref_bn.running_var, "running_var")
    assert int(bn.num_batches_tracked) == 3
