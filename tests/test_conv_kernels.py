"""Implicit-GEMM BN-ReLU-conv (kernels.conv) vs plain torch, on ``device``: compiled on CUDA, interpreted on CPU.

Two levels:
- the module (kernels.BNReLUConv2d / bn_relu_conv with conv="triton") vs nn.BatchNorm2d + ReLU + nn.Conv2d, values
  and gradients of x, gamma, beta, W, b (train, eval and frozen BN; two convs sharing one activation);
- the launchers conv_fprop / conv_dgrad / conv_wgrad vs F.conv2d and torch.nn.grad.conv2d_input/weight on
  relu(bn(x)) in float64, with the GPU tile configs (every autotune config; 64x64x32 etc.) forced in the
  interpreter and channel counts spanning several tiles that are not multiples of them (C=150, K=136).

Tolerances (relative to the reference's largest magnitude). The launcher tests cast the reference's operands
exactly as the kernels do (activation rounded to the operand dtype), so only accumulation order and output
rounding differ: fp32 outputs 1e-4 (fp32 runs ``input_precision="ieee"``; opt-in TF32 5e-3), fp16 outputs 2e-3,
bf16 outputs 1e-2 (one rounding of y); dgrad/wgrad/BN sums are fp32 outputs of exact 16-bit products: 1e-4.
Module tests compare to an fp32 torch model: fp32 1e-4, bf16 3e-2 (dW 6e-2: it sums N*P*Q bf16 products).

Activations: the same launcher and module checks with leaky ReLU (slope 0.2) and identity as the prologue /
dgrad-epilogue activation (reference: F.leaky_relu / none on the same z), same tolerances.
"""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import _runtime
from kernels import conv as kc
from kernels.conv import GPU_CONFIGS, ConvConfig, conv_dgrad, conv_fprop, conv_wgrad

CASES = (
    [(1, s, 1, 0) for s in (1, 2)]
    + [(3, s, d, d) for s in (1, 2) for d in (1, 2, 4, 12)]
    + [(3, 1, 1, 0), (3, 2, 2, 3)]
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Y_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = 1e-4


def _close(a, b, tol, what):
    scale = max(b.abs().max().item(), 1e-3)
    torch.testing.assert_close(
        a.double().cpu(), b.double().cpu(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def _close_block(block, bn, conv, x, xr, y, yr, tol):
    """A BNReLUConv2d's output and every gradient against the torch reference modules (bn, conv)."""
    _close(y, yr, tol, "y")
    _close(x.grad, xr.grad, tol, "dx")
    _close(block.bn.weight.grad, bn.weight.grad, tol, "dgamma")
    _close(block.bn.bias.grad, bn.bias.grad, tol, "dbeta")
    _close(block.conv.weight.grad, conv.weight.grad, 2 * tol, "dW")
    _close(block.conv.bias.grad, conv.bias.grad, tol, "db")


def _bn_vectors(C, device):
    mean = torch.randn(C, device=device) * 0.3
    scale = torch.rand(C, device=device) + 0.5
    beta = torch.rand(C, device=device) - 0.5
    return mean, scale, beta


def _interpreted(device) -> bool:
    return not (device == "cuda" and not _runtime.INTERPRET)


def _round(a64, odt, device):
    """The kernels' fp32 -> operand dtype cast: round-to-nearest, except that the Triton interpreter truncates
    fp32 -> bf16 (rounds toward zero); emulated exactly so the gradient tolerances stay tight."""
    a32 = a64.float()
    if odt == torch.bfloat16 and _interpreted(device):
        a32 = (a32.view(torch.int32) & -65536).view(torch.float32)
    return a32.to(odt).double()


def _reference(x, w, dy, vec, stride, pad, dil, odt, activation="relu", slope=0.01):
    """fp64 fprop/dgrad/wgrad on act(bn(x)) with the kernels' operand roundings; and the BN-backward sums."""
    mean, scale, beta = (v.double().view(1, -1, 1, 1) for v in vec)
    xc = x.double() - mean
    z = (x.float() - mean.float()) * scale.float() + beta.float()  # fp32 as in the kernels
    act_z = {"relu": torch.relu, "leaky_relu": lambda t: torch.where(t > 0, t, t * slope), "identity": lambda t: t}[
        activation
    ]((z.double()))
    a = _round(act_z, odt, x.device.type)
    w64, dy64 = w.to(odt).double(), dy.to(odt).double()
    y = F.conv2d(a, w64, None, stride, pad, dil)
    dact = {
        "relu": (z > 0).double(),
        "leaky_relu": torch.where(z > 0, 1.0, slope).double(),
        "identity": torch.ones_like(z, dtype=torch.float64),
    }[activation]
    g = torch.nn.grad.conv2d_input(x.shape, w64, dy64, stride, pad, dil) * dact
    dw = torch.nn.grad.conv2d_weight(a, w.shape, dy64, stride, pad, dil)
    return y, g, dw, g.sum((0, 2, 3)), (g * xc).sum((0, 2, 3))


def _check_launchers(
    device,
    x,
    w,
    vec,
    stride,
    pad,
    dil,
    odt,
    config=None,
    precision=None,
    y_tol=None,
    grad_tol=GRAD_TOL,
    deterministic=None,
    activation="relu",
    slope=0.01,
):
    act = {} if activation == "relu" else dict(activation=activation, activation_param=slope)  # relu: the default
    y = conv_fprop(x, w.to(odt), stride, pad, dil, vec, config=config, precision=precision, **act)
    dy = torch.randn(y.shape, device=device)
    g, sg, sgx = conv_dgrad(
        dy, w.to(odt), x, stride, pad, dil, vec, config=config, precision=precision, deterministic=deterministic, **act
    )
    dw = conv_wgrad(
        dy,
        x,
        w.shape,
        stride,
        pad,
        dil,
        vec,
        dtype=odt,
        config=config,
        precision=precision,
        deterministic=deterministic,
        **act,
    )
    ry, rg, rdw, rsg, rsgx = _reference(x, w, dy, vec, stride, pad, dil, odt, activation, slope)
    assert y.dtype == odt and y.shape == ry.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert dw.shape == w.shape and dw.dtype == torch.float32
    _close(y, ry, y_tol or Y_TOL[odt], "y")
    _close(g, rg, grad_tol, "dgrad")
    _close(sg, rsg, grad_tol, "sum g")
    _close(sgx, rsgx, grad_tol, "sum g*(x-mean)")
    _close(dw, rdw, grad_tol, "wgrad")
    return y, g, sg, sgx, dw


def _class_of(odt, precision="ieee"):
    return kc.operand_class(odt, precision)


# --- launchers with the GPU tile configs, multi-tile channel counts -----------------------------------------------

# (kernel, stride, dilation, pad, operand dtype, config index in its class): every stride/dilation of the model
# family, each dtype on several; C=150, K=136 span 3 column tiles of 64 (neither a multiple), 5 K-steps of 32.
GPU_TILE_CASES = [
    (3, 1, 1, 1, "bf16", 0),
    (3, 2, 1, 1, "fp16", 0),
    (3, 1, 2, 2, "fp16", 0),
    (3, 1, 4, 4, "bf16", 0),
    (3, 2, 12, 12, "fp16", 0),
    (1, 2, 1, 0, "fp32", 0),
    (1, 1, 1, 0, "bf16", 0),
]


@pytest.mark.parametrize("k, stride, dil, pad, dt, ci", GPU_TILE_CASES, ids=lambda v: str(v))
def test_launchers_gpu_tiles_multi_tile_channels(device, k, stride, dil, pad, dt, ci):
    """fprop/dgrad/wgrad (+ BN sums) with a GPU tile config, C=150 and K=136, vs float64 torch."""
    odt = DTYPES[dt]
    C, K = 150, 136
    x = torch.randn(2 if k == 1 else 1, C, 5, 6, device=device)
    if dt == "bf16":
        x = x.to(odt)  # bf16 input; the fp16 cases take an fp32 input (the autocast combination)
    w = torch.randn(K, C, k, k, device=device) / (C * k * k) ** 0.5
    cfg = GPU_CONFIGS[_class_of(odt)][ci]
    _check_launchers(device, x, w, _bn_vectors(C, device), stride, pad, dil, odt, config=cfg)


@pytest.mark.parametrize(
    "cls, cfg",
    [(c, cfg) for c, cfgs in GPU_CONFIGS.items() for cfg in cfgs],
    ids=lambda v: v.label().replace(" ", "-") if isinstance(v, ConvConfig) else v,
)
def test_every_autotune_config(device, cls, cfg):
    """Each config the GPU autotuner may pick gives the right result (forced here); 1x1 stride 2 keeps it quick."""
    odt = torch.float32 if cls in ("tf32", "ieee") else torch.bfloat16
    prec = cls if cls in ("tf32", "ieee") else None
    C, K = 150, 136
    x = torch.randn(2, C, 5, 7, device=device)  # fp32 input: the autocast combination for bf16 operands
    w = torch.randn(K, C, 1, 1, device=device) / C**0.5
    compiled = device == "cuda" and not _runtime.INTERPRET
    tol = 5e-3 if (cls == "tf32" and compiled) else None  # the interpreter computes tf32 as fp32
    _check_launchers(
        device,
        x,
        w,
        _bn_vectors(C, device),
        2,
        0,
        1,
        odt,
        config=cfg,
        precision=prec,
        y_tol=tol,
        grad_tol=tol or GRAD_TOL,
    )


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("k, stride, dil, pad", [(1, 1, 1, 0), (3, 1, 2, 2)], ids=lambda v: str(v))
def test_launchers_with_activation(device, k, stride, dil, pad, activation, dt):
    """fprop prologue act(z), dgrad epilogue dy * act'(z) and its BN sums, wgrad's recomputed act(z): leaky ReLU
    (slope 0.2) and identity vs float64 torch, 1x1 and 3x3 dilated, fp32 and bf16 operands."""
    odt = DTYPES[dt]
    C, K = 6, 5
    x = torch.randn(2, C, 5, 6, device=device).to(odt)
    w = torch.randn(K, C, k, k, device=device) / (C * k * k) ** 0.5
    _check_launchers(device, x, w, _bn_vectors(C, device), stride, pad, dil, odt, activation=activation, slope=0.2)


def test_plain_conv_kernels_without_prologue(device):
    x, w = torch.randn(1, 16, 6, 5, device=device), torch.randn(8, 16, 3, 3, device=device)
    y = conv_fprop(x, w, 2, 1, 1)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 2, 1, 1), rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    g, s1, s2 = conv_dgrad(dy, w, x, 2, 1, 1)
    assert s1 is None and s2 is None
    torch.testing.assert_close(g, torch.nn.grad.conv2d_input(x.shape, w, dy, 2, 1, 1), rtol=1e-4, atol=1e-4)
    dw = conv_wgrad(dy, x, w.shape, 2, 1, 1)
    torch.testing.assert_close(dw, torch.nn.grad.conv2d_weight(x, w.shape, dy, 2, 1, 1), rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _programs_in_reverse_order():
    """Triton interpreter: run each grid's programs last to first. The interpreter otherwise runs them in one fixed
    order, so fp32 atomics are reproducible there by accident; reversed, they add in another order and their
    rounding changes, as it does between runs on a GPU."""
    from triton.runtime import interpreter as ti

    b = ti.interpreter_builder
    dims = [1, 1, 1]
    set_dim, set_idx = b.set_grid_dim, b.set_grid_idx

    def grid_dim(nx, ny, nz):
        dims[:] = [nx, ny, nz]
        return set_dim(nx, ny, nz)

    b.set_grid_dim = grid_dim
    b.set_grid_idx = lambda x, y, z: set_idx(dims[0] - 1 - x, dims[1] - 1 - y, dims[2] - 1 - z)
    try:
        yield
    finally:
        del b.set_grid_dim, b.set_grid_idx  # back to the class's methods


def _dgrad_wgrad(device, x, w, dy, vec, deterministic):
    g, sg, sgx = conv_dgrad(dy, w, x, 1, 0, 1, vec, deterministic=deterministic)
    dw = conv_wgrad(dy, x, w.shape, 1, 0, 1, vec, deterministic=deterministic)
    return g, sg, sgx, dw


def test_deterministic_mode_is_reproducible(device):
    """deterministic=True: no atomics. Interpreted, the same bits with the programs run in reverse order, where
    the atomic path's BN sums and split-M dW change bits (the control: the reversal is observable); compiled, the
    same bits twice. Values match the float64 reference and the atomic path."""
    C, K = 16, 16
    x = torch.randn(1, C, 16, 17, device=device)  # 1x1 conv, 272 rows: 17 dgrad row tiles, 3 wgrad splits (interpreted)
    w = torch.randn(K, C, 1, 1, device=device) / C**0.5
    vec = _bn_vectors(C, device)
    _check_launchers(device, x, w, vec, 1, 0, 1, torch.float32, deterministic=True)
    dy = torch.randn(1, K, 16, 17, device=device)
    a = _dgrad_wgrad(device, x, w, dy, vec, True)
    if _interpreted(device):
        assert kc.wgrad_splits(x, 16 * 17, K, C) >= 3  # a + b is b + a: order only shows from 3 terms on
        with _programs_in_reverse_order():
            b = _dgrad_wgrad(device, x, w, dy, vec, True)
            atomic_rev = _dgrad_wgrad(device, x, w, dy, vec, False)
        atomic = _dgrad_wgrad(device, x, w, dy, vec, False)
        assert not all(torch.equal(u, v) for u, v in zip(atomic[1:], atomic_rev[1:])), "reversal not observable"
    else:
        b = _dgrad_wgrad(device, x, w, dy, vec, True)
        atomic = _dgrad_wgrad(device, x, w, dy, vec, False)
    for name, u, v, at in zip(("g", "sum g", "sum gx", "dw"), a, b, atomic):
        assert torch.equal(u, v), name
        _close(u, at, GRAD_TOL, name)


def test_int64_offsets_chosen_for_big_tensors_on_meta(monkeypatch):
    """A tensor of 2**31 elements or more selects INT64 (and its fixed config); meta tensors: nothing allocated."""
    launches = []
    monkeypatch.setattr(kc, "_launch", lambda tuned, raw, grid, cfg, *a, **flags: launches.append((cfg, flags)))
    w = torch.empty(64, 4096, 1, 1, device="meta")
    # Cityscapes 1024x2048 at batch 16, a 4096-channel layer at 1/8 resolution: 16*4096*128*256 = 2**31 elements
    big = torch.empty(16, 4096, 128, 256, device="meta")
    small = torch.empty(16, 4096, 128, 255, device="meta")
    conv_fprop(big, w, 1, 0, 1)
    conv_fprop(small, w, 1, 0, 1)
    assert big.numel() == 2**31 and small.numel() < 2**31
    assert launches[0][1]["INT64"] is True and launches[1][1]["INT64"] is False
    dy = torch.empty(16, 64, 128, 256, device="meta")
    conv_dgrad(dy, w, big, 1, 0, 1)
    conv_wgrad(dy, big, w.shape, 1, 0, 1)
    assert launches[2][1]["INT64"] is True and launches[3][1]["INT64"] is True
    assert kc.needs_int64(2**31 - 1) is False and kc.needs_int64(2**31) is True
    with pytest.raises(ValueError, match="int32 row indices"):
        kc._check_positions(2**31)


if kc.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _offset_probe(out_ptr, first_row, C, INT64: tl.constexpr):
        """The kernels' offset expression: kernels.conv._idx(row, INT64) * C + c for int32 rows (two lanes)."""
        rows = first_row + tl.arange(0, 2)
        tl.store(out_ptr + tl.arange(0, 2), (kc._idx(rows, INT64) * C + (C - 1)).to(tl.int64))


@pytest.mark.skipif(not kc.HAS_TRITON, reason="needs triton")
def test_int64_offset_arithmetic(device):
    """Why the switch exists, through our own ``_idx``: past 2**31 elements the last offset ((n*H+h)*W+w)*C+c of
    a 16x4096x128x257 tensor wraps in int32 (INT64=False) and is exact with INT64=True."""
    N, H, W, C = 16, 128, 257, 4096
    last_row = N * H * W - 1
    want = [(last_row - 1) * C + C - 1, last_row * C + C - 1]
    for int64 in (True, False):
        out = torch.zeros(2, dtype=torch.int64, device=device)
        _offset_probe[(1,)](out, last_row - 1, C, INT64=int64)
        if int64:
            assert out.tolist() == want and want[1] == N * H * W * C - 1
        else:
            assert out.tolist() == [(v + 2**31) % 2**32 - 2**31 for v in want] and out[1] < 0  # int32 wrap


def test_int64_variant_matches_int32(device, monkeypatch):
    """The INT64 code path (forced on small tensors) computes the same as the int32 one."""
    C, K = 40, 24
    x = torch.randn(2, C, 6, 5, device=device, dtype=torch.bfloat16)
    w = torch.randn(K, C, 3, 3, device=device) / (C * 9) ** 0.5
    vec = _bn_vectors(C, device)
    monkeypatch.setattr(kc, "needs_int64", lambda *n: True)
    _check_launchers(device, x, w, vec, 2, 1, 1, torch.bfloat16, config=GPU_CONFIGS["16bit"][0])


def test_bad_precision_refused(device):
    x, w = torch.randn(1, 4, 5, 5, device=device), torch.randn(4, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="precision"):
        conv_fprop(x, w, 1, 0, 1, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        kc.set_fp32_precision("fast")


@pytest.mark.gpu
def test_compiled_on_gpu_autotuned_bf16_and_tf32():
    """Only on CUDA: the compiled, autotuned kernels (no interpreter) on a bigger shape; TF32 opt-in tolerance."""
    assert not _runtime.INTERPRET, "TRITON_INTERPRET is set: the GPU tests must run compiled kernels"
    C, K = 192, 160
    x = torch.randn(4, C, 28, 30, device="cuda")
    w = torch.randn(K, C, 3, 3, device="cuda") / (C * 9) ** 0.5
    vec = _bn_vectors(C, "cuda")
    _check_launchers("cuda", x.bfloat16(), w, vec, 1, 2, 2, torch.bfloat16)
    _check_launchers("cuda", x, w, vec, 2, 1, 1, torch.float32, precision="tf32", y_tol=5e-3, grad_tol=5e-3)
    _check_launchers("cuda", x, w, vec, 1, 1, 1, torch.float32)  # ieee


# --- the module -------------------------------------------------------------------------------------------------


def _pair(C, K, k, stride, pad, dil, device, **act):
    block = kernels.BNReLUConv2d(C, K, k, stride, pad, dil, bias=True, backend="triton", conv_impl="triton", **act).to(
        device
    )
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-0.3, 0.3)
        block.bn.running_var.uniform_(0.5, 1.5)
    bn, conv = nn.BatchNorm2d(C).to(device), nn.Conv2d(C, K, k, stride, pad, dil, bias=True).to(device)
    bn.load_state_dict(block.bn.state_dict())
    conv.load_state_dict(block.conv.state_dict())
    return block, bn, conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k, stride, dil, pad", CASES, ids=lambda v: str(v))
def test_igemm_block_matches_modules(device, k, stride, dil, pad, dtype):
    C, K = 5, 6
    block, bn, conv = _pair(C, K, k, stride, pad, dil, device)
    x = torch.randn(2, C, 7, 9, device=device).to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    yr = conv(F.relu(bn(xr)))
    assert y.shape == yr.shape and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    _close_block(block, bn, conv, x, xr, y, yr, 1e-4 if dtype == torch.float32 else 3e-2)
    _close(block.bn.running_mean, bn.running_mean, 1e-4, "running mean")


@pytest.mark.parametrize("mode, dt, k", [("eval", "fp16", 1), ("frozen", "fp32", 1)])
def test_igemm_block_eval_and_frozen_bn_gpu_tiles(device, mode, dt, k):
    """Running statistics (eval: no grads wrt BN params needed; frozen: eval statistics, trainable gamma/beta)
    with the GPU tiles and C=150, K=136. fp16 under autocast from fp32 input."""
    dtype = DTYPES[dt]
    C, K = 150, 136
    block, bn, conv = _pair(C, K, k, 1, 2 if k == 3 else 0, 2, device)
    block.eval(), bn.eval()
    if mode == "eval":
        for p in (*block.bn.parameters(), *bn.parameters()):
            p.requires_grad_(False)
    x = torch.randn(1, C, 5, 6, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with (
        kc.use_config(GPU_CONFIGS[_class_of(dtype)][0]),
        torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32),
    ):
        y = block(x)
    yr = conv(F.relu(bn(xr)))
    dy = torch.randn_like(yr)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    _close(y, yr, tol, "y")
    _close(x.grad, xr.grad, tol, "dx")
    _close(block.conv.weight.grad, conv.weight.grad, tol, "dW")
    if mode == "frozen":
        _close(block.bn.weight.grad, bn.weight.grad, tol, "dgamma")
        _close(block.bn.bias.grad, bn.bias.grad, tol, "dbeta")
    else:
        assert block.bn.weight.grad is None
    _close(block.bn.running_mean, bn.running_mean, 0, "running mean untouched")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("k, stride, dil, pad", [(1, 1, 1, 0), (3, 1, 2, 2)], ids=lambda v: str(v))
def test_igemm_block_with_activation_matches_modules(device, k, stride, dil, pad, activation, dtype, mode):
    """conv_impl="triton" with leaky ReLU (0.2) / identity vs nn.BatchNorm2d + F.leaky_relu / none + nn.Conv2d:
    y, dx, dgamma, dbeta, dW, db; train and eval (frozen statistics, trainable gamma/beta)."""
    from kernels import reference as ref

    C, K = 5, 6
    block, bn, conv = _pair(C, K, k, stride, pad, dil, device, activation=activation, activation_param=0.2)
    block.train(mode == "train"), bn.train(mode == "train")
    x = (torch.randn(2, C, 6, 7, device=device) + 0.2).to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    yr = ref.bn_relu_conv(xr, bn, conv, activation=activation, activation_param=0.2)
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    _close_block(block, bn, conv, x, xr, y, yr, 1e-4 if dtype == torch.float32 else 3e-2)
    _close(block.bn.running_var, bn.running_var, 1e-4, "running var")


def test_two_convs_share_one_activation_gpu_tiles(device):
    """A unit's branch2a and projection shortcut read one relu(bn(x)): both outputs and the summed gradients."""
    C = 150
    bn = nn.BatchNorm2d(C).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    convs = [nn.Conv2d(C, 136, 3, 2, 1, bias=False).to(device), nn.Conv2d(C, 72, 1, 2, 0, bias=False).to(device)]
    bnr, convsr = (
        nn.BatchNorm2d(C).to(device),
        [nn.Conv2d(C, 136, 3, 2, 1, bias=False).to(device), nn.Conv2d(C, 72, 1, 2, 0, bias=False).to(device)],
    )
    bnr.load_state_dict(bn.state_dict())
    for a, b in zip(convs, convsr):
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, C, 6, 5, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with kc.use_config(GPU_CONFIGS["ieee"][0]):
        ys = kernels.bn_relu_conv(x, bn, convs, backend="triton", conv="triton")
        a = F.relu(bnr(xr))
        yrs = [c(a) for c in convsr]
        dys = [torch.randn_like(t) for t in yrs]
        torch.autograd.backward(ys, dys)
        torch.autograd.backward(yrs, dys)
    for i, (y, yr) in enumerate(zip(ys, yrs)):
        _close(y, yr, 1e-4, f"y{i}")
        _close(convs[i].weight.grad, convsr[i].weight.grad, 1e-4, f"dW{i}")
    _close(x.grad, xr.grad, 1e-4, "dx")
    _close(bn.weight.grad, bnr.weight.grad, 1e-4, "dgamma")
    _close(bn.bias.grad, bnr.bias.grad, 1e-4, "dbeta")


def test_igemm_refuses_what_it_cannot_do():
    bn = nn.BatchNorm2d(4)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="backend='triton'"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 3, padding=1)], backend="torch", conv="triton")
    with pytest.raises(ValueError, match="not a square, ungrouped"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 3, padding=1, groups=2)], backend="triton", conv="triton")
    with pytest.raises(ValueError, match="dropout"):
        kernels.bn_relu_conv(x, bn, [nn.Conv2d(4, 4, 1)], dropout=0.5, backend="triton", conv="triton")
