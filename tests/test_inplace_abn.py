"""kernels.InPlaceABN / ABN / InPlaceABNSync: drop-ins for the inplace_abn package's modules, on the fused kernels.

References (kernels/reference.py): ``ref.inplace_abn``, inplace_abn's documented formula in plain differentiable
torch (y = act((x - mean) * rstd * (|weight| + eps) + bias), its running-stat update, and its weight gradient
through |.|: negated where weight < 0); ABN: F.batch_norm + activation, as inplace_abn's ABN. Weights include
negative values and an exact 0 (where inplace_abn's gradient is +sum(dy * x_hat)).

Tolerances as tests/test_bn_relu_kernels.py: fp32 rtol/atol 1e-4 x the reference's magnitude; bf16 inputs
(reference in fp32 on the same bf16 values, y rounded to bf16) 3e-2.

The inplace_abn package itself is compared only when importable: it builds a C++/CUDA extension at install time
(``pip install inplace-abn`` fails here: its sdist's setup needs setuptools_scm's ``vcs_versioning`` and a
compiler toolchain for the extension), so that comparison skips with the reason on machines without it.
"""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import reference as ref
from kernels.profiling import saved_tensor_bytes

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
ACTS = ["leaky_relu", "relu", "identity"]


def close(actual, expected, dtype, what):
    scale = max(expected.abs().max().item(), 1e-3)
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def _module(cls, C, activation, mode, device, backend, slope=0.2):
    m = cls(C, activation=activation, activation_param=slope, backend=backend).to(device)
    with torch.no_grad():
        m.weight.uniform_(-1.5, 1.5)
        m.weight[0] = 0.0  # |0| + eps: still a (tiny) scale; the gradient's sign convention at 0 is tested
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    return m.train(mode == "train")


def _check(cls, activation, dtype, mode, backend, device, shape=(2, 6, 5, 7), channels_last=False):
    C = shape[1]
    m = _module(cls, C, activation, mode, device, backend)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(*shape, device=device) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    y = m(x)
    if cls is kernels.ABN:
        yr = ref.activation_fn(F.batch_norm(xr, rm, rv, w, b, mode == "train", 0.1, m.eps), activation, 0.2)
    else:
        yr = ref.inplace_abn(xr, w, b, rm, rv, mode == "train", 0.1, m.eps, activation, 0.2)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(m.weight.grad, w.grad, dtype, "dweight")
    close(m.bias.grad, b.grad, dtype, "dbias")
    close(m.running_mean, rm, dtype, "running_mean")
    close(m.running_var, rv, dtype, "running_var")
    assert int(m.num_batches_tracked) == (1 if mode == "train" else 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ACTS)
def test_inplace_abn_matches_documented_formula(activation, dtype, mode, backend, device):
    """y, dx, dweight (through |weight| + eps, sign convention included), dbias and running statistics."""
    _check(kernels.InPlaceABN, activation, dtype, mode, backend, device, channels_last=dtype == torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation", ACTS)
def test_abn_matches_batch_norm_and_activation(activation, mode, backend, device):
    """ABN is inplace_abn's non-inplace module: F.batch_norm with the weight as is, then the activation."""
    _check(kernels.ABN, activation, torch.float32, mode, backend, device)


def test_weight_gradient_flows_through_abs(device):
    """dweight = sign(weight) * sum(dL/dz * x_hat), +1 at weight == 0 (inplace_abn's ``dweight[weight < 0] *= -1``):
    flipping the sign of weight flips its gradient and leaves y unchanged."""
    m = _module(kernels.InPlaceABN, 4, "leaky_relu", "train", device, "auto")
    x = torch.randn(3, 4, 5, 5, device=device)
    dy = torch.randn(3, 4, 5, 5, device=device)
    m(x).backward(dy)
    g1, y1 = m.weight.grad.clone(), m(x).detach()
    with torch.no_grad():
        m.weight[1:].neg_()
    m.weight.grad = None
    m(x).backward(dy)
    close(m(x).detach(), y1, torch.float32, "y with -weight")
    sign = torch.ones_like(g1)
    sign[1:] = -1
    close(m.weight.grad, sign * g1, torch.float32, "dweight with -weight")
    assert m.weight.grad[0] != 0  # at weight == 0 the gradient is not zeroed (torch.abs' would be)


def test_constructor_and_state_dict_match_inplace_abn():
    """inplace_abn 1.1's signature (positional order included), attributes, repr and state_dict keys; checkpoints
    from before its num_batches_tracked (version < 2) load with the counter at 0."""
    for cls in (kernels.ABN, kernels.InPlaceABN, kernels.InPlaceABNSync):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        want = ["num_features", "eps", "momentum", "affine", "track_running_stats", "activation", "activation_param"]
        assert positional == want + (["group"] if cls is kernels.InPlaceABNSync else [])
        defaults = {p.name: p.default for p in params if p.name in want[1:]}
        assert defaults == dict(
            eps=1e-5,
            momentum=0.1,
            affine=True,
            track_running_stats=True,
            activation="leaky_relu",
            activation_param=0.01,
        )
    m = kernels.InPlaceABN(8)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert (m.activation, m.activation_param, m.eps, m.momentum, m.affine) == ("leaky_relu", 0.01, 1e-5, 0.1, True)
    assert repr(m) == "InPlaceABN(8, eps=1e-05, momentum=0.1, affine=True, activation=leaky_relu[0.01])"
    assert list(kernels.ABN(4, affine=False, track_running_stats=False).state_dict()) == []
    from collections import OrderedDict

    old = OrderedDict((k, v) for k, v in kernels.InPlaceABN(8).state_dict().items() if k != "num_batches_tracked")
    old["running_mean"] = torch.arange(8.0)
    old._metadata = {"": {"version": 1}}  # what torch stores with a module's state_dict
    m.num_batches_tracked.fill_(5)
    m.load_state_dict(old)
    assert torch.equal(m.running_mean, torch.arange(8.0)) and int(m.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="elu"):
        kernels.InPlaceABN(8, activation="elu")


def test_inputs_of_other_ranks_and_without_affine(device):
    """(N, C), (N, C, L) and (N, C, D, H, W) inputs (inplace_abn takes any N x C x S1 x ...), affine=False,
    track_running_stats=False (batch statistics in eval too), momentum=None (cumulative average)."""
    for shape in [(5, 4), (3, 4, 7), (2, 4, 3, 2, 5)]:
        m = kernels.InPlaceABN(4, activation="leaky_relu", activation_param=0.2).to(device)
        x = torch.randn(*shape, device=device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y = m(x)
        yr = ref.inplace_abn(xr, m.weight, m.bias, None, None, True, 0.1, m.eps, "leaky_relu", 0.2)
        assert y.shape == x.shape
        close(y, yr, torch.float32, f"y {shape}")
        y.square().sum().backward()
        yr.square().sum().backward()
        close(x.grad, xr.grad, torch.float32, f"dx {shape}")
    m = kernels.InPlaceABN(4, affine=False, track_running_stats=False, activation="identity").to(device).eval()
    x = torch.randn(2, 4, 3, 3, device=device)
    close(m(x), F.batch_norm(x, None, None, training=True, eps=m.eps), torch.float32, "no affine, no running stats")
    m = kernels.InPlaceABN(4, momentum=None).to(device)
    xs = [torch.randn(2, 4, 3, 3, device=device) + i for i in range(3)]
    for x in xs:
        m(x)
    bn = nn.BatchNorm2d(4, momentum=None).to(device)
    for x in xs:
        bn(x)
    close(m.running_mean, bn.running_mean, torch.float32, "cumulative running_mean")
    close(m.running_var, bn.running_var, torch.float32, "cumulative running_var")
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernels.InPlaceABN(4).to(device)(torch.randn(1, 4, device=device))


def test_inplace_abn_sync_without_process_group_runs_unsynchronised(device):
    """InPlaceABNSync outside torch.distributed equals InPlaceABN (inplace_abn warns and does the same)."""
    a = kernels.InPlaceABNSync(5, group=None).to(device)
    b = kernels.InPlaceABN(5).to(device)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 4, 4, device=device)
    close(a(x), b(x), torch.float32, "y")
    close(a.running_var, b.running_var, torch.float32, "running_var")


def test_inplace_abn_saves_only_x():
    """InPlaceABN's backward keeps x (and the parameters), nothing else of activation size; BN + leaky_relu in
    eager torch keeps x and the BN output. Ratio printed for the record (about 0.5)."""
    C = 16
    x = torch.randn(4, C, 16, 16, requires_grad=True)
    m = kernels.InPlaceABN(C)
    fused = saved_tensor_bytes(lambda: m(x), exclude=m.parameters())
    bn = nn.BatchNorm2d(C)
    eager = saved_tensor_bytes(lambda: F.leaky_relu(bn(x), 0.01), exclude=bn.parameters())
    assert fused == x.numel() * 4
    assert fused < eager and eager >= 2 * x.numel() * 4
    print(f"saved bytes: InPlaceABN {fused}, BatchNorm2d + leaky_relu {eager}, ratio {fused / eager:.3f}")


def test_matches_the_inplace_abn_package_when_installed():
    """Against inplace_abn itself (values and gradients of x, weight, bias), where the package could be built."""
    iabn = pytest.importorskip(
        "inplace_abn",
        reason="inplace_abn not installed: it needs a C++/CUDA extension build (pip install "
        "inplace-abn fails on this machine), so only its documented formula is compared",
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for act in ("leaky_relu", "identity"):
        ours = kernels.InPlaceABN(6, activation=act, activation_param=0.2).to(dev)
        theirs = iabn.InPlaceABN(6, activation=act, activation_param=0.2).to(dev)
        with torch.no_grad():
            ours.weight.uniform_(-1.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 6, 5, 7, device=dev)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2 * 1.0)  # theirs overwrites its input: give it a temporary
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        for what, a, b in [
            ("y", y1, y2),
            ("dx", x1.grad, x2.grad),
            ("dweight", ours.weight.grad, theirs.weight.grad),
            ("dbias", ours.bias.grad, theirs.bias.grad),
            ("running_var", ours.running_var, theirs.running_var),
        ]:
            close(a, b.detach(), torch.float32, f"{act} {what}")
