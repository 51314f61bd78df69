"""The fused kernels as torch.library custom ops (kernels/ops.py): opcheck, and torch.compile(fullgraph=True).

opcheck runs each op's schema, fake-tensor, autograd-registration and AOT-dispatch checks on real inputs, for the
torch backend and the triton one (compiled on CUDA, interpreted on CPU: the ``device`` fixture).

The compile tests run in a subprocess: Inductor's generated code and oneDNN convolutions run natively there, and a
native crash (oneDNN on AVX-512 CPUs with channels_last convolutions; see widedeep/train/memory_format.py) must be
one failed test with its output, not a dead test session. The subprocess also turns Inductor's layout optimisation
off on CPU (it would make the convolutions channels_last: the crash above).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kernels
from kernels import ops
from kernels.bn_relu_conv import _geometry

ROOT = Path(__file__).resolve().parents[1]


def _bn(C, device, training=True, affine=True, track=True):
    bn = nn.BatchNorm2d(C, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn.train(training)


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval", "no_running"])
def test_opcheck_stats_and_bn_act(device, backend, mode):
    bn = _bn(6, device, training=mode != "eval", track=mode != "no_running")
    x = torch.randn(2, 6, 5, 4, device=device, requires_grad=True)
    stats = ops.stats_of(x, bn, backend)
    assert stats.shape == (len(kernels.bn_stats.STAT_ROWS), 6)  # the one STAT_ROWS packing
    batch = mode != "eval"
    torch.library.opcheck(ops.bn_act, (x, stats, bn.weight, bn.bias, batch, backend, torch.float32, "relu", 0.01))
    has_running = bn.running_mean is not None
    empty = torch.empty(0, device=device)
    args = (
        x.detach(),
        bn.weight.detach(),
        bn.running_mean.clone() if has_running else empty,
        bn.running_var.clone() if has_running else empty,
        bn.num_batches_tracked.clone() if has_running else torch.zeros((), dtype=torch.long, device=device),
        has_running,
        0.1,
        False,
        1e-5,
        bn.training,
        bn.track_running_stats,
        backend,
    )
    torch.library.opcheck(ops.bn_stats, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["two_convs", "dropout", "eval", "bf16", "leaky_relu", "identity"])
def test_opcheck_bn_act_conv(device, backend, case):
    C = 6
    bn = _bn(C, device, training=case != "eval")
    convs = [nn.Conv2d(C, 5, 3, 1, 2, dilation=2).to(device), nn.Conv2d(C, 4, 1, 2, 0, bias=False).to(device)]
    x = torch.randn(2, C, 6, 5, device=device, requires_grad=True)
    mask, keep = (torch.rand(x.shape, device=device) < 0.7, 0.7) if case == "dropout" else (None, 1.0)
    cdtype = torch.bfloat16 if case == "bf16" else torch.float32
    stats = ops.stats_of(x, bn, backend)
    args = (
        x,
        stats,
        bn.weight,
        bn.bias,
        [c.weight for c in convs],
        [convs[0].bias],
        [True, False],
        ops.flat_geometry([_geometry(c) for c in convs]),
        mask,
        keep,
        case != "eval",
        backend,
        cdtype,
        "torch",
        case if case in ("leaky_relu", "identity") else "relu",
        0.2,
    )
    torch.library.opcheck(ops.bn_act_conv, args)


def test_opcheck_implicit_gemm(device):
    bn = _bn(6, device)
    conv = nn.Conv2d(6, 5, 3, 1, 1, bias=False).to(device)
    x = torch.randn(1, 6, 4, 5, device=device, requires_grad=True)
    stats = ops.stats_of(x, bn, "triton")
    args = (
        x,
        stats,
        bn.weight,
        bn.bias,
        [conv.weight],
        [],
        [False],
        ops.flat_geometry([_geometry(conv)]),
        None,
        1.0,
        True,
        "triton",
        torch.float32,
        "triton",
        "relu",
        0.01,
    )
    torch.library.opcheck(ops.bn_act_conv, args)


@pytest.mark.parametrize("backend,conv_impl", [("torch", "torch"), ("triton", "torch"), ("triton", "triton")])
def test_compile_module_keeps_custom_ops_and_matches_eager(device, backend, conv_impl):
    """A BNReLUConv2d + BNReLU stack compiled with fullgraph=True (a graph break would raise) and an op-counting
    Dynamo backend: the graph holds our ops, no aten batch_norm; then Inductor's result equals eager.
    ``conv_impl="triton"``: the implicit-GEMM convolution with the BN-ReLU prologue."""
    torch.manual_seed(0)
    block = nn.Sequential(
        kernels.BNReLUConv2d(6, 8, 3, padding=1, backend=backend, conv_impl=conv_impl),
        kernels.BNReLU(8, backend=backend),
        nn.Conv2d(8, 4, 1),
        kernels.BNReLUConv2d(
            4,
            4,
            3,
            padding=2,
            dilation=2,
            backend=backend,
            conv_impl=conv_impl,
            activation="leaky_relu",
            activation_param=0.2,
        ),
        kernels.InPlaceABN(4, backend=backend),
    ).to(device)
    with torch.no_grad():
        block[4].weight.uniform_(-1.5, 1.5)  # negative gammas: InPlaceABN's |gamma| + eps and its gradient
    ref = copy.deepcopy(block)
    seen = []

    def counting(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x = torch.randn(2, 6, 5, 5, device=device)
    torch._dynamo.reset()
    torch.compile(copy.deepcopy(block), backend=counting, fullgraph=True)(x)
    assert "widedeep_kernels.bn_act_conv.default" in seen and "widedeep_kernels.bn_act.default" in seen
    assert seen.count("widedeep_kernels.bn_stats.default") == 4
    assert not [s for s in seen if "batch_norm" in s]

    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = _inductor(block)(xc)
    yr = ref(xr)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(block.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6, msg=name)  # running stats updated once, as eager


def _inductor(module):
    torch._dynamo.reset()
    if next(module.parameters()).device.type == "cpu":  # channels_last CPU convs: the oneDNN crash (module doc)
        return torch.compile(module, fullgraph=True, options={"layout_optimization": False})
    return torch.compile(module, fullgraph=True)


CL = torch.channels_last


@pytest.mark.parametrize("case", ["weight_cl", "x_cl", "igemm_cl", "strided_view"])
def test_compile_with_mixed_layouts(device, case):
    """Inductor checks each op's real output strides against its fake implementation: channels_last weights with
    NCHW x, channels_last x with NCHW weights, an all-channels_last implicit GEMM, a non-dense input view."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 7, device=device)
    if case == "weight_cl":
        m = kernels.BNReLUConv2d(4, 6, 3, padding=1, backend="torch").to(device, memory_format=CL)
    elif case == "x_cl":
        m, x = kernels.BNReLUConv2d(4, 6, 3, padding=1, backend="torch").to(device), x.contiguous(memory_format=CL)
    elif case == "igemm_cl":
        m = kernels.BNReLUConv2d(4, 6, 3, padding=1, backend="triton", conv_impl="triton").to(device, memory_format=CL)
        x = x.contiguous(memory_format=CL)
    else:
        m, x = kernels.BNReLU(4, backend="triton").to(device), x.contiguous(memory_format=CL)[:, :, :, 1:]
    ref = copy.deepcopy(m)
    xc, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y, yr = _inductor(m)(xc), ref(xr)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_compiled_padding_mode_is_refused_as_in_eager():
    """A non-zero padding_mode is an error in eager; compiled, it must not silently become zero padding."""
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    fn = torch.compile(lambda t: kernels.bn_relu_conv(t, bn, [conv], backend="torch")[0], fullgraph=True)
    with pytest.raises(Exception, match="zero padding"):
        fn(torch.randn(2, 4, 5, 5))
    assert bn.num_batches_tracked.item() == 0  # refused before any running statistic changed


# ---------------------------------------------------------------------------------------------------------------
# a fused ResNet-38, compiled, in a subprocess


def _compile_model_check(default_backend: str, fused: str) -> dict:
    """fullgraph compile of a width-1/16 fused A1 classifier (training step) vs the same model in eager.

    ``fused``: "auto" (``create_model(fused=True)``: the kernels' default backend, set to ``default_backend``) or an
    explicit backend name (``fused="triton"``). The result lists the backends that reached the fused kernels' entry
    points (``kernels.ops``' statistics, BN-ReLU and BN-ReLU-conv forward/backward) during the compiled step, so a
    test can tell which path really ran."""
    from kernels import ops as kops
    from kernels.bn_relu import BN_ACT
    from kernels.bn_relu_conv import BN_ACT_CONV
    from widedeep.models import create_model

    kernels.set_default_backend(default_backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = (
        create_model(
            "ilsvrc-cls_rna-a1_cls1000", fused=True if fused == "auto" else fused, width=0.0625, num_classes=10
        )
        .to(device)
        .train()
    )
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device=device)
    seen = set()
    # the statistics op's entry point, and the implementations both paths of each fused op call (kernels/opspec.py)
    originals = [(kops, "bn_params", "bn_params")] + [
        (spec, attr, f"{spec.name}.{attr}")
        for spec in (BN_ACT, BN_ACT_CONV)
        for attr in ("forward_impl", "backward_impl")
    ]

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            seen.add((name, kwargs["backend"] if "backend" in kwargs else args[0].backend))
            return fn(*args, **kwargs)

        return wrapped

    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in originals]
    for (owner, attr, name), (_, _, fn) in zip(originals, saved):
        setattr(owner, attr, recording(name, fn))
    out = _inductor(model)(x)
    out.square().sum().backward()
    for owner, attr, fn in saved:
        setattr(owner, attr, fn)
    out_ref = ref(x)
    out_ref.square().sum().backward()
    grads = [
        (p.grad - q.grad).abs().max().item() / max(q.grad.abs().max().item(), 1e-6)
        for p, q in zip(model.parameters(), ref.parameters())
    ]
    bufs = [(b.double() - c.double()).abs().max().item() for b, c in zip(model.buffers(), ref.buffers())]
    return dict(
        out=(out - out_ref).abs().max().item() / out_ref.abs().max().item(),
        grad=max(grads),
        buffers=max(bufs),
        seen=sorted(seen),
    )


@pytest.mark.parametrize("default_backend, fused", [("torch", "auto"), ("triton", "auto"), ("torch", "triton")])
def test_compiled_fused_resnet38_equals_eager(default_backend, fused):
    """``fused="triton"`` with the default backend left at torch: the explicit backend must win in the compiled
    graph (every kernel entry point sees "triton"), and "auto" must follow the default."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, __file__, default_backend, fused],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["out"] < 1e-5 and res["grad"] < 1e-4 and res["buffers"] < 1e-6, res
    want = default_backend if fused == "auto" else fused
    entry_points = {"bn_params"} | {
        f"{op}.{f}" for op in ("bn_act", "bn_act_conv") for f in ("forward_impl", "backward_impl")
    }
    assert {tuple(s) for s in res["seen"]} == {(n, want) for n in entry_points}, res


if __name__ == "__main__":
    print(json.dumps(_compile_model_check(sys.argv[1], sys.argv[2])))
