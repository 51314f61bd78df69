"""pytest-benchmark profiling of the BN-ReLU kernels vs torch eager.

On a GPU run ``pytest bench/bench_kernels.py --benchmark-enable``: each benchmark times with
``triton.testing.do_bench`` (CUDA events, L2 cleared) and records the median in ``extra_info``.
On CPU (CI) the files run once with tiny shapes as smoke tests (``--benchmark-disable`` is the default).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (N, C, H, W): Model A1 stage inputs at 224 (GPU) or tiny shapes (CPU smoke)
SHAPES = [(64, 128, 112, 112), (64, 512, 28, 28), (64, 1024, 14, 14)] if CUDA else [(2, 16, 8, 8)]
BACKENDS = ["triton", "eager"] if CUDA else ["torch", "eager"]


def _step(backend, x, bn, conv):
    if backend == "eager":
        y = conv(F.relu(bn(x)))
    else:
        y = kernels.bn_relu_conv(x, bn, [conv], backend=backend)[0]
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_relu_conv_fwd_bwd(benchmark, backend, shape):
    N, C, H, W = shape
    dtype = torch.bfloat16 if CUDA else torch.float32
    bn = nn.BatchNorm2d(C).to(DEVICE)
    conv = nn.Conv2d(C, C, 3, padding=1, bias=False).to(DEVICE, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    benchmark.group = f"bn_relu_conv3x3 {shape} {dtype}"
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(lambda: _step(backend, x, bn, conv), grad_to_none=[x], return_mode="median")
        benchmark.extra_info["median_ms"] = ms
        benchmark.pedantic(lambda: (_step(backend, x, bn, conv), torch.cuda.synchronize()), rounds=3)
    else:
        benchmark(_step, backend, x, bn, conv)
    assert x.grad is not None and torch.isfinite(x.grad).all()
