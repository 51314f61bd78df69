"""Implicit-GEMM BN-ReLU-conv (kernels.conv) vs nn.BatchNorm2d + ReLU + nn.Conv2d, under the interpreter.

Every kernel size / stride / dilation of the model family (1x1 and 3x3; stride 1, 2; dilation 1, 2, 4, 12 with
padding = dilation) plus general padding; values and gradients of x, gamma, beta, W, b; fp32 and bf16.
Tolerances as in test_bn_relu_kernels: fp32 1e-4, bf16 3e-2 (x the reference's magnitude); the weight
gradient sums N*P*Q bf16 products, so its bf16 tolerance is 6e-2.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.conv import conv_dgrad, conv_fprop, conv_wgrad

CASES = [(1, s, 1, 0) for s in (1, 2)] + [(3, s, d, d) for s in (1, 2) for d in (1, 2, 4, 12)] + [(3, 1, 1, 0), (3, 2, 2, 3)]


def _close(a, b, tol, what):
    scale = max(b.abs().max().item(), 1e-3)
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k, stride, dil, pad", CASES, ids=lambda v: str(v))
def test_igemm_block_matches_modules(k, stride, dil, pad, dtype):
    C, K = 5, 6
    block = kernels.BNReLUConv2d(C, K, k, stride, pad, dil, bias=True, backend="triton", conv="triton")
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
    bn, conv = nn.BatchNorm2d(C), nn.Conv2d(C, K, k, stride, pad, dil, bias=True)
    bn.load_state_dict(block.bn.state_dict())
    conv.load_state_dict(block.conv.state_dict())
    x = torch.randn(2, C, 7, 9).to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    yr = conv(F.relu(bn(xr)))
    assert y.shape == yr.shape and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _close(y, yr, tol, "y")
    _close(x.grad, xr.grad, tol, "dx")
    _close(block.bn.weight.grad, bn.weight.grad, tol, "dgamma")
    _close(block.bn.bias.grad, bn.bias.grad, tol, "dbeta")
    _close(block.conv.weight.grad, conv.weight.grad, 2 * tol, "dW")
    _close(block.conv.bias.grad, conv.bias.grad, tol, "db")


def test_plain_conv_kernels_without_prologue():
    x, w = torch.randn(1, 16, 6, 5), torch.randn(8, 16, 3, 3)
    y = conv_fprop(x, w, 2, 1, 1)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 2, 1, 1), rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    g, _, _ = conv_dgrad(dy, w, x, 2, 1, 1)
    torch.testing.assert_close(g, torch.nn.grad.conv2d_input(x.shape, w, dy, 2, 1, 1), rtol=1e-4, atol=1e-4)
    dw = conv_wgrad(dy, x, w.shape, 2, 1, 1)
    torch.testing.assert_close(dw, torch.nn.grad.conv2d_weight(x, w.shape, dy, 2, 1, 1), rtol=1e-4, atol=1e-4)


def test_igemm_refuses_what_it_cannot_do():
    bn = nn.BatchNorm2d(4)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="backend='triton'"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 3, padding=1)], backend="torch", conv="triton")
    with pytest.raises(ValueError, match="not a square, ungrouped"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 3, padding=1, groups=2)], backend="triton", conv="triton")
    with pytest.raises(ValueError, match="dropout"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 1)], dropout=0.5, backend="triton", conv="triton")
