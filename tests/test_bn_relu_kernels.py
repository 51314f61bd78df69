"""Triton (compiled on CUDA, interpreted on CPU) and torch recompute paths vs nn.BatchNorm2d + ReLU (+ Conv2d).

Every kernel test takes the ``device`` fixture (tests/conftest.py): on a CUDA machine the kernels run compiled
and these tests are ``gpu`` tests; on CPU they run in Triton's interpreter, with the tile shapes the CUDA
launchers choose (the launchers pick tiles from the tensor shape only).

Tolerances: fp32 inputs: rtol 1e-4, atol 1e-4 x the reference's magnitude (fp32 reassociation in the
reductions). bf16/fp16 inputs: the reference runs in fp32 on the *same* low-precision inputs; outputs are
rounded to bf16 (8 mantissa bits) so rtol/atol 3e-2 x magnitude; fp16 1e-2.

Activations: leaky ReLU (slope 0.2, so a wrong negative side shows) and identity against F.leaky_relu / no
activation on F.batch_norm, for bn_relu and bn_relu_conv, same tolerances; ReLU is the default everywhere.

Also: the launch budget of one BN-ReLU step (Triton launches and leftover torch ops), every launch being one
of the variants the ahead-of-time GPU compile check compiles (``aot_variants()``), the int64 offset paths, and
synchronised statistics over two gloo ranks with no host synchronisation.
"""

import importlib
import os
import random
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import reference as ref

bn_relu_mod = importlib.import_module("kernels.bn_relu")  # kernels.bn_relu is also the function
bn_stats_mod = importlib.import_module("kernels.bn_stats")

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
BACKENDS = ["triton", "torch"]


def close(actual, expected, dtype, what):
    scale = max(expected.abs().max().item(), 1e-3)
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def _cases(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            dict(
                N=rng.choice([1, 2, 3]),
                C=rng.choice([1, 3, 6, 17, 20]),
                H=rng.choice([1, 4, 7, 9]),
                W=rng.choice([1, 5, 6, 11]),
                channels_last=rng.random() < 0.5,
                dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
                mode=rng.choice(["train", "eval", "frozen"]),
            )
        )
    return out


def _bn(C, mode, device="cpu", momentum=0.1):
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.train(mode == "train").to(device)


def _input(c, device="cpu", offset=0.0):
    x = torch.randn(c["N"], c["C"], c["H"], c["W"], device=device) * 2 + offset
    if c["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(c["dtype"])


def _check_against_torch(case, backend, device):
    """bn_relu forward/backward vs F.relu(nn.BatchNorm2d) in fp32 on the same inputs: y, dx, dgamma, dbeta,
    running stats.

    ``case["activation"]`` (default relu) / ``case["slope"]``: the same against ref.activation_fn (F.leaky_relu...)."""
    bn = _bn(case["C"], case["mode"], device, case.get("momentum", 0.1))
    bn_ref = _bn(case["C"], case["mode"], device, case.get("momentum", 0.1))
    bn_ref.load_state_dict(bn.state_dict())
    x = _input(case, device, case.get("offset", 0.0)).requires_grad_()
    xr = x.detach().float().requires_grad_()
    if "activation" in case:
        act = dict(activation=case["activation"], activation_param=case.get("slope", 0.01))
        y = kernels.bn_relu(x, bn, backend=backend, **act)
        yr = ref.bn_act(xr, bn_ref, **act)
    else:  # the default: ReLU
        y = kernels.bn_relu(x, bn, backend=backend)
        yr = F.relu(bn_ref(xr))
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    dt = case["dtype"]
    assert y.dtype == dt and y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
        memory_format=torch.channels_last
    )
    close(y, yr, dt, "y")
    close(x.grad, xr.grad, dt, "dx")
    close(bn.weight.grad, bn_ref.weight.grad, dt, "dgamma")
    close(bn.bias.grad, bn_ref.bias.grad, dt, "dbeta")
    close(bn.running_mean, bn_ref.running_mean, dt, "running_mean")
    close(bn.running_var, bn_ref.running_var, dt, "running_var")
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", _cases(24, seed=1), ids=lambda c: "{N}x{C}x{H}x{W}-{mode}-{dtype}-cl{channels_last}".format(**c)
)
def test_bn_relu_matches_batchnorm_relu(case, backend, device):
    if case["N"] * case["H"] * case["W"] == 1 and case["mode"] == "train":
        case = dict(case, H=2)  # BatchNorm2d refuses one value per channel in training
    _check_against_torch(case, backend, device)


# Shapes that make the launchers use every GPU tile and span several tiles with a partial last one:
# elementwise (rows, cols) tiles 64x16 (H*W or C <= 16) and 16x64; reductions 128x16 (NCHW, channels_last C <= 16)
# and 32x64 (channels_last C > 16); finalize kernels 64 channels per program.
MULTI_TILE = [
    dict(N=2, C=37, H=5, W=9, channels_last=False),  # 45 positions: 1 partial 64-column block; 3 channel blocks of 16
    dict(N=1, C=5, H=13, W=11, channels_last=False),  # 143 positions: 3 column blocks, the last 15 wide
    dict(N=2, C=150, H=3, W=5, channels_last=True),  # 3 channel tiles of 64 (the last 22 wide); 3 finalize blocks
    dict(N=3, C=13, H=7, W=6, channels_last=True),  # C <= 16: 64x16 / 128x16 tiles, 126 positions
    dict(N=3, C=20, H=3, W=4, channels_last=False),  # H*W <= 16: 64x16 tiles over 60 rows
]


@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", MULTI_TILE, ids=lambda s: "{N}x{C}x{H}x{W}-cl{channels_last}".format(**s))
def test_gpu_tiles_with_partial_multi_tile_channels(shape, dtype, mode, device):
    _check_against_torch(dict(shape, dtype=dtype, mode=mode, offset=3.0), "triton", device)


# leaky ReLU / identity: every backend, dtype and mode on two tiny shapes (one per layout), slope 0.2
ACT_CASES = [dict(N=2, C=6, H=3, W=5, channels_last=False), dict(N=1, C=17, H=4, W=3, channels_last=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_bn_activation_matches_torch(activation, dtype, mode, backend, device):
    """bn_relu(activation=...) vs F.batch_norm + F.leaky_relu(0.2) / identity: y, dx, dgamma, dbeta, running stats."""
    for shape in ACT_CASES:
        _check_against_torch(
            dict(shape, dtype=dtype, mode=mode, activation=activation, slope=0.2, offset=0.5), backend, device
        )


def test_leaky_relu_gradient_uses_slope_where_z_is_not_positive(device):
    """dL/dz = dy * (z > 0 ? 1 : slope) elementwise (eval: dx = scale * dL/dz exactly), both backends agree."""
    bn = _bn(4, "eval", device)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    dy = torch.randn(2, 4, 3, 3, device=device)
    p = kernels.bn_params(x, bn, backend="torch", activation="leaky_relu", activation_param=0.3)
    z = (x.detach() - p.mean.view(1, -1, 1, 1)) * p.scale.view(1, -1, 1, 1) + p.bias.view(1, -1, 1, 1)
    want = p.scale.view(1, -1, 1, 1) * dy * torch.where(z > 0, 1.0, 0.3)
    assert (z < 0).any() and (z > 0).any()
    for backend in BACKENDS:
        x.grad = None
        kernels.bn_relu(x, bn, backend=backend, activation="leaky_relu", activation_param=0.3).backward(dy)
        close(x.grad, want, torch.float32, f"dx {backend}")


def test_unknown_activation_is_refused():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    running = bn.running_mean.clone()
    for call in (
        lambda: kernels.bn_relu(x, bn, activation="gelu"),
        lambda: kernels.bn_relu_conv(x, bn, [nn.Conv2d(3, 3, 1)], activation="elu"),
        lambda: kernels.BNReLU(3, activation="swish"),
        lambda: kernels.BNReLUConv2d(3, 3, 1, activation="tanh"),
    ):
        with pytest.raises(ValueError, match="activation must be one of"):
            call()
    assert torch.equal(bn.running_mean, running) and int(bn.num_batches_tracked) == 0  # refused before any update
    assert kernels.bn_params(x, bn, backend="torch").activation == "relu"  # BNParams default: today's ReLU


def test_tiling_covers_gpu_shapes():
    """The tile the launchers pick per layout and size, and the grid limits of full-resolution Cityscapes."""
    t = importlib.import_module("kernels.tiles").elementwise_tiling
    assert t((2, 37, 5, 9), False) == (74, 45, 64, 64)
    assert t((1, 5, 13, 11), False) == (5, 143, 64, 64)
    assert t((2, 150, 3, 5), True) == (30, 150, 64, 64)
    assert t((3, 13, 7, 6), True) == (126, 13, 256, 16)
    assert t((3, 20, 3, 4), False) == (60, 12, 256, 16)
    R, L, br, bl = t((16, 4096, 1024, 2048), True)  # 1.4e11 elements: INT64 offsets, grid within CUDA's limits
    assert R * L >= 2**31
    grid = importlib.import_module("kernels.tiles").elementwise_grid(R, L, br, bl, True)
    assert grid[0] < 2**31 - 1 and grid[1] <= 65535
    R, L, br, bl = t((16, 4096, 1024, 2048), False)
    grid = importlib.import_module("kernels.tiles").elementwise_grid(R, L, br, bl, False)
    assert grid[0] < 2**31 - 1 and grid[1] <= 65535


def triton_cdiv(a, b):
    return -(-a // b)


def test_int64_offsets_give_the_same_result(device, monkeypatch):
    """The INT64 code paths (taken from 2**31 elements; forced here on small tensors) of every BN kernel give
    the same statistics, y, dx, dgamma, dbeta and running statistics (to fp32 rounding)."""
    results = {}
    for int64_from in (2**31, 0):
        monkeypatch.setattr(importlib.import_module("kernels._common"), "INT64_FROM", int64_from)
        for cl in (False, True):
            torch.manual_seed(1)
            bn = _bn(70, "train", device)
            x = torch.randn(2, 70, 9, 13, device=device) + 2
            x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format).requires_grad_()
            y = kernels.bn_relu(x, bn, backend="triton")
            y.backward(torch.randn_like(y))
            results[int64_from, cl] = [y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
    for cl in (False, True):
        for a, b in zip(results[2**31, cl], results[0, cl]):
            # the reductions take half as many positions per tile with int64 offsets (register budget), so
            # their summation order differs: equal to fp32 rounding, not bitwise
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_stable_on_large_mean_inputs(backend, device):
    x = torch.randn(4, 8, 16, 16, device=device) * 0.01 + 1e4  # |mean| / std = 1e6
    mean, var, count = kernels.channel_stats(x, backend=backend)
    rmean, rvar = ref.channel_stats(x)
    assert count == 4 * 16 * 16
    torch.testing.assert_close(var.double(), rvar, rtol=2e-3, atol=0)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what we avoid: catastrophically wrong in fp32
    assert (naive.double() - rvar).abs().max() > 100 * (var.double() - rvar).abs().max()


@pytest.mark.parametrize("momentum", [None, 0.1, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_over_several_steps(backend, momentum, device):
    bn, bn_ref = _bn(5, "train", device, momentum), _bn(5, "train", device, momentum)
    bn_ref.load_state_dict(bn.state_dict())
    for step in range(4):
        x = torch.randn(3, 5, 6, 7, device=device) * (step + 1) + step
        if step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        kernels.bn_relu(x, bn, backend=backend)
        bn_ref(x)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_count_is_a_0dim_device_tensor_in_every_mode(backend, mode, device):
    """The BN statistics' count is one type (issue 24): a 0-dim tensor on x's device of the statistics dtype
    (fp64 for fp64 inputs on the torch backend, else fp32) holding x's elements per channel, for BNParams (batch
    statistics, running statistics through fp32 or other running buffers), channel_stats and the bn_stats op."""
    from kernels import ops

    dtypes = (torch.float32, torch.float64) if backend == "torch" else (torch.float32, torch.bfloat16)
    for dtype, running_dtype in [(d, d if d == torch.float64 else torch.float32) for d in dtypes] + [
        (torch.float32, torch.float16)  # running buffers that are not fp32: the torch-ops fallbacks
    ]:
        bn = _bn(5, mode, device)
        bn.running_mean.data, bn.running_var.data = bn.running_mean.to(running_dtype), bn.running_var.to(running_dtype)
        x = torch.randn(3, 5, 6, 7, device=device).to(dtype)
        want = torch.float64 if (backend, dtype) == ("torch", torch.float64) else torch.float32
        counts = {
            "BNParams": kernels.bn_params(x, bn, backend=backend).count,
            "channel_stats": kernels.channel_stats(x, backend=backend)[2],
        }
        if running_dtype != torch.float16:  # the op: one pass per input dtype is enough
            counts["bn_stats op"] = ops.stats_of(x, bn, backend)[4]
        for name, count in counts.items():
            case = (name, backend, mode, dtype, running_dtype)
            assert isinstance(count, torch.Tensor) and count.device == x.device, case
            assert count.dtype == want and count.shape == (() if name != "bn_stats op" else (5,)), case
            assert bool((count == 3 * 6 * 7).all()), case


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_running_statistics_are_the_int_count_formula_bitwise(dtype, momentum, device):
    """With a tensor count the torch backend's running statistics keep the bits of the Python-int formula they
    had (Bessel's factor n / max(n - 1, 1) as a Python double) over 3 steps, and stay close to nn.BatchNorm2d's.
    Not bitwise nn.BatchNorm2d's: its own update (momentum * new + (1 - momentum) * old, var_sum / (n - 1))
    rounds differently from lerp_ and var * n / (n - 1), by a few ulps, with an int count as well."""
    bn, bn_ref = _bn(5, "train", device, momentum).to(dtype), _bn(5, "train", device, momentum).to(dtype)
    bn_ref.load_state_dict(bn.state_dict())
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(3):
        x = (torch.randn(3, 5, 6, 7, device=device) * (step + 1) + step).to(dtype)
        mean, var, _ = kernels.channel_stats(x, backend="torch")
        n = x.numel() // x.shape[1]
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        rm.lerp_(mean, factor)
        rv.lerp_(var * (n / max(n - 1, 1)), factor)
        kernels.bn_relu(x, bn, backend="torch")
        bn_ref(x)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)


def test_bn_without_affine_or_running_stats(device):
    for bn in (nn.BatchNorm2d(6, affine=False), nn.BatchNorm2d(6, track_running_stats=False)):
        bn = bn.to(device)
        x = (torch.randn(2, 6, 5, 5, device=device) + 1).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y = kernels.bn_relu(x, bn, backend="triton")
        yr = F.relu(F.batch_norm(xr, None, None, bn.weight, bn.bias, True, 0.1, bn.eps))
        close(y, yr, torch.float32, "y")
        y.square().sum().backward()
        yr.square().sum().backward()
        close(x.grad, xr.grad, torch.float32, "dx")


CONV_CASES = [
    # (k, stride, dilation, N, C, O, H, W)
    (1, 1, 1, 2, 6, 5, 7, 9),
    (1, 2, 1, 1, 3, 4, 9, 8),
    (3, 1, 1, 2, 5, 7, 6, 11),
    (3, 2, 1, 1, 6, 3, 9, 7),
    (3, 1, 2, 2, 4, 5, 9, 10),
    (3, 1, 4, 1, 7, 3, 11, 9),
    (3, 1, 12, 1, 3, 4, 13, 14),
    (3, 2, 2, 3, 5, 6, 8, 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, stride, dil, N, C, O, H, W", CONV_CASES)
def test_bn_relu_conv_matches_modules(k, stride, dil, N, C, O, H, W, dtype, backend, device):
    block = kernels.BNReLUConv2d(C, O, k, stride, dil * (k // 2), dil, bias=True, backend=backend).to(device)
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
    bn, conv = nn.BatchNorm2d(C).to(device), nn.Conv2d(C, O, k, stride, dil * (k // 2), dil, bias=True).to(device)
    bn.load_state_dict(block.bn.state_dict())
    conv.load_state_dict(block.conv.state_dict())
    x = (torch.randn(N, C, H, W, device=device) + 0.3).contiguous(
        memory_format=torch.channels_last if k == 3 else torch.contiguous_format
    )
    x = x.to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    if dtype == torch.float32:
        y = block(x)
    else:
        with torch.autocast(device, dtype=dtype):
            y = block(x)
    with torch.autocast(device, enabled=False):
        yr = conv(F.relu(bn(xr)))
    assert y.dtype == dtype and y.shape == yr.shape
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    for name, a, b in [
        ("dgamma", block.bn.weight.grad, bn.weight.grad),
        ("dbeta", block.bn.bias.grad, bn.bias.grad),
        ("dW", block.conv.weight.grad, conv.weight.grad),
        ("db", block.conv.bias.grad, conv.bias.grad),
    ]:
        assert a.dtype == torch.float32
        close(a, b, dtype, name)
    close(block.bn.running_var, bn.running_var, dtype, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("k, dil, mode", [(1, 1, "train"), (3, 2, "eval"), (3, 2, "train")])
def test_bn_act_conv_matches_modules(k, dil, mode, activation, dtype, backend, device):
    """BNReLUConv2d(activation=...) with torch convs vs nn.BatchNorm2d + F.leaky_relu(0.2) / identity + nn.Conv2d:
    y, dx, dgamma, dbeta, dW; 1x1 and 3x3 dilated, train and eval (frozen statistics, trainable gamma/beta)."""
    C, O = 5, 4
    block = kernels.BNReLUConv2d(
        C, O, k, 1, dil * (k // 2), dil, bias=False, backend=backend, activation=activation, activation_param=0.2
    ).to(device)
    bn = _bn(C, mode, device)
    block.bn.load_state_dict(bn.state_dict())
    block.train(mode == "train")
    conv = nn.Conv2d(C, O, k, 1, dil * (k // 2), dil, bias=False).to(device)
    conv.load_state_dict(block.conv.state_dict())
    x = (torch.randn(2, C, 6, 7, device=device) + 0.3).to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    with torch.autocast(device, enabled=False):
        yr = ref.bn_relu_conv(xr, bn, conv, activation=activation, activation_param=0.2)
    assert y.dtype == dtype and y.shape == yr.shape
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    for name, a, b in [
        ("dgamma", block.bn.weight.grad, bn.weight.grad),
        ("dbeta", block.bn.bias.grad, bn.bias.grad),
        ("dW", block.conv.weight.grad, conv.weight.grad),
    ]:
        close(a, b, dtype, name)
    close(block.bn.running_var, bn.running_var, dtype, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_activation_feeds_two_convs_like_a_projection_unit(backend, device):
    bn = _bn(6, "train", device)
    c1, c2 = nn.Conv2d(6, 4, 3, 2, 1, bias=False).to(device), nn.Conv2d(6, 8, 1, 2, bias=False).to(device)
    bn_r, c1_r = _bn(6, "train", device), nn.Conv2d(6, 4, 3, 2, 1, bias=False).to(device)
    c2_r = nn.Conv2d(6, 8, 1, 2, bias=False).to(device)
    for a, b in [(bn, bn_r), (c1, c1_r), (c2, c2_r)]:
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 9, 7, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y1, y2 = kernels.bn_relu_conv(x, bn, [c1, c2], backend=backend)
    a = F.relu(bn_r(xr))
    r1, r2 = c1_r(a), c2_r(a)
    (y1.square().sum() + y2.sum()).backward()
    (r1.square().sum() + r2.sum()).backward()
    for got, want in [
        (y1, r1),
        (y2, r2),
        (x.grad, xr.grad),
        (bn.weight.grad, bn_r.weight.grad),
        (c1.weight.grad, c1_r.weight.grad),
        (c2.weight.grad, c2_r.weight.grad),
    ]:
        close(got, want, torch.float32, "shared")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_reused_in_backward(backend, device):
    bn, conv = _bn(4, "eval", device), nn.Conv2d(4, 3, 1, bias=False).to(device)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    torch.manual_seed(5)
    y = kernels.bn_relu_conv(x, bn, [conv], dropout=0.5, backend=backend)[0]
    torch.manual_seed(5)
    mask = torch.empty(x.shape, dtype=torch.bool, device=device).bernoulli_(0.5)
    xr = x.detach().clone().requires_grad_()
    yr = ref.bn_relu_conv(xr, bn, conv, dropout_mask=mask, p=0.5)
    close(y, yr, torch.float32, "y")
    y.sum().backward()
    yr.sum().backward()
    close(x.grad, xr.grad, torch.float32, "dx")
    assert 0.3 < mask.float().mean() < 0.7


def test_backward_saves_only_the_input():
    """The activation relu(bn(x)) is not among the tensors saved for backward."""
    from kernels.profiling import saved_tensor_bytes

    block = kernels.BNReLUConv2d(8, 8, 3, padding=1, backend="torch")
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    fused = saved_tensor_bytes(lambda: block(x), exclude=block.parameters())
    plain = nn.Sequential(block.bn, nn.ReLU(), block.conv)
    unfused = saved_tensor_bytes(lambda: plain(x), exclude=block.parameters())
    assert fused == x.numel() * 4  # x itself, nothing else of activation size
    assert unfused >= 2 * x.numel() * 4


def test_backend_switch():
    x = torch.randn(1, 2, 3, 3)
    assert kernels.resolve_backend("auto", x) == "torch"
    if kernels.INTERPRET:
        assert kernels.resolve_backend("triton", x) == "triton"  # interpreter on a CPU machine
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda", x)


# ----------------------------------------------------------------------------------------------------------------
# Launch budget, AOT variant list, synchronised statistics without host syncs

# aten ops that allocate or alias without launching a kernel
_NONCOMPUTE = {
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_like",
    "view",
    "_unsafe_view",
    "unbind",
    "select",
    "slice",
    "detach",
    "alias",
    "as_strided",
    "expand",
    "unsqueeze",
    "squeeze",
    "t",
    "permute",
    "transpose",
    "_reshape_alias",
    "reshape",
    "lift_fresh",
    "is_same_size",
    "contiguous",
}
_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}


@contextmanager
def recording():
    """(launches, ops): every Triton kernel launch as (name, {arg: value, tensors as their dtype}), and the aten
    ops run outside launches (under the interpreter a launch runs aten ops of its own)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if kernels.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as cls
    else:
        from triton.runtime.jit import JITFunction as cls
    inside, launches, ops = [0], [], []
    orig = cls.run

    def run(self, *args, grid, warmup, **kw):
        if not warmup:
            named = dict(zip(self.arg_names, args), **kw)  # tensors as dtypes: no references kept
            launches.append(
                (self.__name__, {k: v.dtype if isinstance(v, torch.Tensor) else v for k, v in named.items()})
            )
        inside[0] += 1
        try:
            return orig(self, *args, grid=grid, warmup=warmup, **kw)
        finally:
            inside[0] -= 1

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    cls.run = run
    try:
        with Mode():
            yield launches, ops
    finally:
        cls.run = orig


@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_launches_per_bn_relu_step(mode, channels_last, device):
    """Training: statistics (finalised in-kernel: running statistics and num_batches_tracked too) + apply,
    gradient sums (finalised in-kernel) + dx = 4 Triton launches and no torch compute op; frozen: apply + the
    gradient sums that also write dx = 2. (Round 2: 6 launches + 1 torch op, and 5; before that 4 + 37 torch ops.)"""
    bn = _bn(70, mode, device)
    x = torch.randn(2, 70, 5, 6, device=device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
    dy = torch.randn_like(x)
    kernels.bn_relu(x, bn, backend="triton").backward(dy)  # compile / warm up
    x.grad = bn.weight.grad = bn.bias.grad = None  # no gradient accumulation (add_) in the counted step
    with recording() as (launches, ops):
        kernels.bn_relu(x, bn, backend="triton").backward(dy)
    names = [n for n, _ in launches]
    expect = (
        ["_stats_kernel", "_bn_act_fwd_kernel", "_bn_act_grad_sums_kernel", "_bn_act_bwd_kernel"]
        if mode == "train"
        else ["_bn_act_fwd_kernel", "_bn_act_grad_sums_kernel"]
    )
    assert names == expect
    compute = [o for o in ops if o not in _NONCOMPUTE]
    assert compute == [], compute


def test_sync_launches_per_bn_relu_step(tmp_path, device):
    """Sync BN (a one-rank gloo group: the all_gather and all_reduce really run): statistics (this rank's triple,
    num_batches_tracked bumped) + the gathered apply that merges the ranks and writes the statistics and running
    statistics, gradient sums + dx = 4 launches (5 with the recompute of bn_relu_conv), no finalize launch; and
    the running statistics move as nn.BatchNorm2d's (momentum=None: the cumulative average of two steps)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bn = nn.BatchNorm2d(70, momentum=None).to(device)
        ref = nn.BatchNorm2d(70, momentum=None).to(device)
        for step in range(2):
            x = (torch.randn(2, 70, 5, 6, device=device) * 2 + 3).requires_grad_()
            dy = torch.randn_like(x)
            with recording() as (launches, _):
                kernels.bn_relu(x, bn, backend="triton", sync=True).backward(dy)
            F.relu(ref(x.detach())).backward(dy)
            assert [n for n, _ in launches] == [
                "_stats_kernel",
                "_bn_act_fwd_gathered_kernel",
                "_bn_act_grad_sums_kernel",
                "_bn_act_bwd_kernel",
            ], step
        assert int(bn.num_batches_tracked) == 2
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def _variant_key(name, constexprs, pointers):
    return name, tuple(sorted(constexprs.items())), tuple(sorted(pointers.items()))


def test_every_launch_is_an_aot_variant(device):
    """Each launch the BN launchers make (dtypes, layouts, tiles, flags) is listed by the modules' aot_variants(),
    which the ahead-of-time GPU compile check compiles for sm_80 and sm_90."""
    known, const_names = set(), {}
    for v in bn_relu_mod.aot_variants() + bn_stats_mod.aot_variants():
        ptrs = {k: t for k, t in v.signature.items() if t.startswith("*")}
        known.add(_variant_key(v.name, v.constexprs, ptrs))
        const_names[v.name] = set(v.constexprs)
    # the smallest tensors that make the launchers pick each tile (H*W or C <= / > 16)
    shapes = [
        dict(N=1, C=3, H=2, W=3, channels_last=False),
        dict(N=1, C=2, H=3, W=6, channels_last=False),
        dict(N=1, C=3, H=2, W=2, channels_last=True),
        dict(N=1, C=17, H=2, W=2, channels_last=True),
    ]
    with recording() as (launches, _):
        for shape in shapes:
            for dtype, autocast in [
                (torch.float32, None),
                (torch.bfloat16, None),
                (torch.float16, None),
                (torch.float32, torch.bfloat16),
                (torch.float32, torch.float16),
            ]:
                case = dict(shape, dtype=dtype, mode="train")
                bn = _bn(shape["C"], "train", device, momentum=None if dtype == torch.float16 else 0.1)
                x = _input(case, device).requires_grad_()
                with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    y = kernels.bn_relu(x, bn, backend="triton")
                y.backward(torch.ones_like(y))
                kernels.bn_relu(x, bn.eval(), backend="triton").sum().backward()
        for bn in (nn.BatchNorm2d(6, affine=False), nn.BatchNorm2d(6, track_running_stats=False)):
            x = torch.randn(2, 6, 3, 3, device=device, requires_grad=True)
            kernels.bn_relu(x, bn.to(device), backend="triton").sum().backward()
        kernels.channel_stats(torch.randn(2, 6, 3, 3, device=device))
    assert {(a["CHANNELS_LAST"], a["BLOCK_L"]) for n, a in launches if n == "_bn_act_fwd_kernel"} == {
        (False, 16),
        (False, 64),
        (True, 16),
        (True, 64),
    }
    for name, args in launches:
        const = {k: v for k, v in args.items() if k in const_names[name]}
        ptrs = {k: "*" + _TRITON_TYPES[v] for k, v in args.items() if isinstance(v, torch.dtype)}
        assert _variant_key(name, const, ptrs) in known, (name, const, ptrs)


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_activation_launches_are_aot_variants(activation, device):
    """Leaky ReLU / identity launches (every layout, tile and dtype pair, train and eval, int32 offsets) are
    among the variants the ahead-of-time check compiles."""
    known, const_names = set(), {}
    for v in bn_relu_mod.aot_variants() + bn_stats_mod.aot_variants():
        known.add(_variant_key(v.name, v.constexprs, {k: t for k, t in v.signature.items() if t.startswith("*")}))
        const_names[v.name] = set(v.constexprs)
    shapes = [
        dict(N=1, C=3, H=2, W=3, channels_last=False),
        dict(N=1, C=2, H=3, W=6, channels_last=False),
        dict(N=1, C=3, H=2, W=2, channels_last=True),
        dict(N=1, C=17, H=2, W=2, channels_last=True),
    ]
    with recording() as (launches, _):
        for shape in shapes:
            for dtype, autocast in [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.float16)]:
                bn = _bn(shape["C"], "train", device)
                x = _input(dict(shape, dtype=dtype), device).requires_grad_()
                for mode in ("train", "eval"):
                    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                        y = kernels.bn_relu(
                            x, bn.train(mode == "train"), backend="triton", activation=activation, activation_param=0.2
                        )
                    y.backward(torch.ones_like(y))
    acts = {a["ACT"] for n, a in launches if "ACT" in a}
    assert acts == {kernels.ACTIVATIONS[activation]}
    for name, args in launches:
        const = {k: v for k, v in args.items() if k in const_names[name]}
        ptrs = {k: "*" + _TRITON_TYPES[v] for k, v in args.items() if isinstance(v, torch.dtype)}
        assert _variant_key(name, const, ptrs) in known, (name, const, ptrs)


def _sync_worker(rank, world, port, result):
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    class Ops(TorchDispatchMode):  # .item(), float(t), int(t), bool(t) all dispatch aten::_local_scalar_dense
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        torch.ones(()).item()
    assert Ops.seen == ["ones", "_local_scalar_dense"], Ops.seen  # the detector sees a host sync
    out = {}
    for key, (backend, cl, momentum, C) in SYNC_CONFIGS.items():
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(C, momentum=momentum)
        host_syncs = 0
        for _step in range(2):  # two steps: running statistics (and 1/num_batches_tracked with momentum=None)
            x = torch.randn(4, C, 5, 6) * 3 + 1
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            dy = torch.randn(4, C, 5, 6)
            xs = x[rank * 2 : (rank + 1) * 2].clone().requires_grad_()
            Ops.seen = []
            with Ops():
                y = kernels.bn_relu(xs, bn, backend=backend, sync=True)
                y.backward(dy[rank * 2 : (rank + 1) * 2])
                count = kernels.channel_stats(xs.detach(), backend=backend, sync=True)[2]
            host_syncs += Ops.seen.count("_local_scalar_dense")
        dist.all_reduce(bn.weight.grad)  # what DDP does to parameter gradients (sum here)
        dist.all_reduce(bn.bias.grad)
        out[key] = (
            y.detach(),
            xs.grad,
            bn.weight.grad,
            bn.bias.grad,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            int(bn.num_batches_tracked),
            isinstance(count, torch.Tensor),
            float(count),
            host_syncs,
        )
    result[rank] = out
    dist.destroy_process_group()


# (backend, channels_last, momentum, C): C = 70 spans two finalize blocks (64) and two channels_last tiles
SYNC_CONFIGS = {
    f"{b}-cl{int(cl)}-m{m}": (b, cl, m, C)
    for b, cl, m, C in [
        ("triton", False, 0.1, 70),
        ("triton", True, None, 70),
        ("torch", False, None, 5),
        ("torch", True, 0.1, 5),
    ]
}


def test_sync_statistics_over_two_gloo_ranks_equal_one_big_batch_without_host_sync():
    """Two gloo ranks with half a batch each give the full batch's y, dx, dgamma/dbeta (summed as DDP would)
    and running statistics over two steps, with the merged count a device tensor and no host sync
    (no aten::_local_scalar_dense: .item(), int(t), float(t)) in forward or backward."""
    if not kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter for CPU tensors")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        result = manager.dict()
        port = 30500 + os.getpid() % 1000
        mp.start_processes(_sync_worker, args=(2, port, result), nprocs=2, start_method="spawn")
        out = dict(result)
    for key, (_backend, cl, momentum, C) in SYNC_CONFIGS.items():
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(C, momentum=momentum)
        for _step in range(2):
            x = torch.randn(4, C, 5, 6) * 3 + 1
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            dy = torch.randn(4, C, 5, 6)
            x.requires_grad_()
            y = F.relu(bn(x))
            y.backward(dy)
        for r in (0, 1):
            yr, dxr, dgr, dbr, rm, rv, nbt, count_is_tensor, count, host_syncs = out[r][key]
            torch.testing.assert_close(yr, y.detach()[r * 2 : (r + 1) * 2], rtol=1e-5, atol=1e-5, msg=key)
            torch.testing.assert_close(dxr, x.grad[r * 2 : (r + 1) * 2], rtol=1e-4, atol=1e-5, msg=key)
            # two steps accumulate into .grad on both sides; the reference's second step used the full batch
            torch.testing.assert_close(dgr, bn.weight.grad, rtol=1e-4, atol=1e-4, msg=key)
            torch.testing.assert_close(dbr, bn.bias.grad, rtol=1e-4, atol=1e-4, msg=key)
            torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-5, msg=key)
            torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-5, msg=key)
            assert nbt == 2 and count_is_tensor and count == 4 * 5 * 6, key
            assert host_syncs == 0, f"{key}: {host_syncs} host syncs"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_step_makes_no_host_sync(mode, channels_last):
    """On CUDA, a compiled bf16 BN-ReLU step (statistics, running-stat update, forward, backward) never
    synchronises with the host (torch's sync debug mode raises on any)."""
    bn = _bn(70, mode, "cuda")
    x = torch.randn(2, 70, 17, 19, device="cuda", dtype=torch.bfloat16) + 1
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
    dy = torch.randn_like(x)
    kernels.bn_relu(x, bn, backend="triton").backward(dy)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.bn_relu(x, bn, backend="triton").backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
