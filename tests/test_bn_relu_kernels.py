"""Triton (interpreted on CPU) and torch recompute paths vs nn.BatchNorm2d + ReLU (+ Conv2d).

Tolerances: fp32 inputs: rtol 1e-4, atol 1e-4 x the reference's magnitude (fp32 reassociation in the
reductions). bf16/fp16 inputs: the reference runs in fp32 on the *same* low-precision inputs; outputs are
rounded to bf16 (8 mantissa bits) so rtol/atol 3e-2 x magnitude; fp16 1e-2.
"""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import reference as ref

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
BACKENDS = ["triton", "torch"]


def close(actual, expected, dtype, what):
    scale = max(expected.abs().max().item(), 1e-3)
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _cases(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(dict(N=rng.choice([1, 2, 3]), C=rng.choice([1, 3, 6, 17, 20]), H=rng.choice([1, 4, 7, 9]),
                        W=rng.choice([1, 5, 6, 11]), channels_last=rng.random() < 0.5,
                        dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
                        mode=rng.choice(["train", "eval", "frozen"])))
    return out


def _bn(C, mode):
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.train(mode == "train")


def _input(c, offset=0.0):
    x = torch.randn(c["N"], c["C"], c["H"], c["W"]) * 2 + offset
    if c["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(c["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(24, seed=1), ids=lambda c: "{N}x{C}x{H}x{W}-{mode}-{dtype}-cl{channels_last}".format(**c))
def test_bn_relu_matches_batchnorm_relu(case, backend):
    if case["N"] * case["H"] * case["W"] == 1 and case["mode"] == "train":
        case = dict(case, H=2)  # BatchNorm2d refuses one value per channel in training
    bn, bn_ref = _bn(case["C"], case["mode"]), None
    bn_ref = _bn(case["C"], case["mode"])
    bn_ref.load_state_dict(bn.state_dict())
    x = _input(case).requires_grad_()
    xr = x.detach().float().requires_grad_()
    y = kernels.bn_relu(x, bn, backend=backend)
    yr = F.relu(bn_ref(xr))
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    dt = case["dtype"]
    assert y.dtype == dt and y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    close(y, yr, dt, "y")
    close(x.grad, xr.grad, dt, "dx")
    close(bn.weight.grad, bn_ref.weight.grad, dt, "dgamma")
    close(bn.bias.grad, bn_ref.bias.grad, dt, "dbeta")
    close(bn.running_mean, bn_ref.running_mean, dt, "running_mean")
    close(bn.running_var, bn_ref.running_var, dt, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_stable_on_large_mean_inputs(backend):
    x = torch.randn(4, 8, 16, 16) * 0.01 + 1e4  # |mean| / std = 1e6
    mean, var, count = kernels.channel_stats(x, backend=backend)
    rmean, rvar = ref.channel_stats(x)
    assert count == 4 * 16 * 16
    torch.testing.assert_close(var.double(), rvar, rtol=2e-3, atol=0)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what we avoid: catastrophically wrong in fp32
    assert (naive.double() - rvar).abs().max() > 100 * (var.double() - rvar).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_over_several_steps(backend):
    bn, bn_ref = _bn(5, "train"), _bn(5, "train")
    bn_ref.load_state_dict(bn.state_dict())
    bn.momentum = bn_ref.momentum = None  # cumulative average exercises num_batches_tracked too
    for step in range(4):
        x = torch.randn(3, 5, 6, 7) * (step + 1) + step
        kernels.bn_relu(x, bn, backend=backend)
        bn_ref(x)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-5)


CONV_CASES = [
    # (k, stride, dilation, N, C, O, H, W)
    (1, 1, 1, 2, 6, 5, 7, 9), (1, 2, 1, 1, 3, 4, 9, 8), (3, 1, 1, 2, 5, 7, 6, 11), (3, 2, 1, 1, 6, 3, 9, 7),
    (3, 1, 2, 2, 4, 5, 9, 10), (3, 1, 4, 1, 7, 3, 11, 9), (3, 1, 12, 1, 3, 4, 13, 14), (3, 2, 2, 3, 5, 6, 8, 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, stride, dil, N, C, O, H, W", CONV_CASES)
def test_bn_relu_conv_matches_modules(k, stride, dil, N, C, O, H, W, dtype, backend):
    block = kernels.BNReLUConv2d(C, O, k, stride, dil * (k // 2), dil, bias=True, backend=backend)
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
    bn, conv = nn.BatchNorm2d(C), nn.Conv2d(C, O, k, stride, dil * (k // 2), dil, bias=True)
    bn.load_state_dict(block.bn.state_dict())
    conv.load_state_dict(block.conv.state_dict())
    x = (torch.randn(N, C, H, W) + 0.3).contiguous(memory_format=torch.channels_last if k == 3 else torch.contiguous_format)
    x = x.to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    if dtype == torch.float32:
        y = block(x)
    else:
        with torch.autocast("cpu", dtype=dtype):
            y = block(x)
    yr = conv(F.relu(bn(xr)))
    assert y.dtype == dtype and y.shape == yr.shape
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    for name, a, b in [("dgamma", block.bn.weight.grad, bn.weight.grad), ("dbeta", block.bn.bias.grad, bn.bias.grad),
                       ("dW", block.conv.weight.grad, conv.weight.grad), ("db", block.conv.bias.grad, conv.bias.grad)]:
        assert a.dtype == torch.float32
        close(a, b, dtype, name)
    close(block.bn.running_var, bn.running_var, dtype, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_activation_feeds_two_convs_like_a_projection_unit(backend):
    bn = _bn(6, "train")
    c1, c2 = nn.Conv2d(6, 4, 3, 2, 1, bias=False), nn.Conv2d(6, 8, 1, 2, bias=False)
    bn_r, c1_r, c2_r = _bn(6, "train"), nn.Conv2d(6, 4, 3, 2, 1, bias=False), nn.Conv2d(6, 8, 1, 2, bias=False)
    for a, b in [(bn, bn_r), (c1, c1_r), (c2, c2_r)]:
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y1, y2 = kernels.bn_relu_conv(x, bn, [c1, c2], backend=backend)
    a = F.relu(bn_r(xr))
    r1, r2 = c1_r(a), c2_r(a)
    (y1.square().sum() + y2.sum()).backward()
    (r1.square().sum() + r2.sum()).backward()
    for got, want in [(y1, r1), (y2, r2), (x.grad, xr.grad), (bn.weight.grad, bn_r.weight.grad),
                      (c1.weight.grad, c1_r.weight.grad), (c2.weight.grad, c2_r.weight.grad)]:
        close(got, want, torch.float32, "shared")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_reused_in_backward(backend):
    bn, conv = _bn(4, "eval"), nn.Conv2d(4, 3, 1, bias=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.manual_seed(5)
    y = kernels.bn_relu_conv(x, bn, [conv], dropout=0.5, backend=backend)[0]
    torch.manual_seed(5)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.5)
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
    assert kernels.resolve_backend("triton", x) == "triton"  # interpreter on this CPU machine
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda", x)
