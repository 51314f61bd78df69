"""Stride-2 dgrad by phases (kernels.conv._dgrad_kernel): each of the stride**2 input phases meets only the taps
that reach it, so no MMA runs on rows a tap cannot reach.

- the in-kernel tap arithmetic (``phase_constants`` + ``_phase_taps``: first tap, step, count) equals a brute-force
  search, for strides 1-3, dilations 1-12, paddings 0-12;
- fprop/dgrad/wgrad (+ BN sums) vs float64 torch for every (kernel, stride, dilation, padding) of A1 and A1-s8
  (read from the models on meta tensors), fp32 and bf16 operands, even and odd image sizes (phases of unequal
  size), with the interpreter's tile and a GPU tile. Tolerances as tests/test_conv_kernels.py: fp32 y 1e-4, bf16 y
  1e-2 (one rounding of y), dgrad/wgrad/BN sums 1e-4 (fp32 sums of exact products), relative to the largest value;
- the MMA work the dgrad kernel issues (every tl.dot the interpreter executes, counted) is within 10% of the useful
  multiply-adds (those whose dy position and tap are both inside the image), where masking all 9 taps issued ~4x.
"""

import functools

import pytest
import torch

from kernels import conv as kc
from tests.test_conv_kernels import DTYPES, _bn_vectors, _check_launchers


def _taps_formula(e, R, stride, dil):
    """Python mirror of the kernel's _phase_taps (same integer arithmetic)."""
    G, INV = kc.phase_constants(stride, dil)
    step = stride // G
    r0 = ((e // G) * INV) % step
    count = (R - r0 + step - 1) // step if e % G == 0 else 0
    return [r0 + t * step for t in range(count)]


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_phase_tap_arithmetic_matches_brute_force(stride):
    for dil in (1, 2, 3, 4, 6, 12):
        for pad in range(0, 13):
            for R in (1, 3, 5):
                for a in range(stride):
                    want = [r for r in range(R) if (a + pad - r * dil) % stride == 0]
                    assert _taps_formula(a + pad, R, stride, dil) == want, (stride, dil, pad, R, a)
    # each tap belongs to exactly one phase (a = (r*dil - pad) mod stride): the phases partition the taps' work
    for R, dil, pad in ((3, 1, 1), (1, 1, 0), (3, 2, 2), (3, 4, 4)):
        flat = sorted(r for taps in kc.dgrad_phase_taps(64, R, stride, pad, dil) for r in taps)
        assert flat == list(range(R)), (R, dil, pad)


@functools.lru_cache(maxsize=None)
def _model_geometries():
    """Distinct (kernel, stride, dilation, padding) of the pre-activated convs of A1 (224) and A1-s8 (504)."""
    from bench.conv_shapes import conv_shapes

    shapes = conv_shapes("ilsvrc-cls_rna-a1_cls1000", 224, 1) + conv_shapes("voc_rna-a1_cls21_s8", 504, 1)
    return sorted({(s["k"], s["stride"], s["dil"], s["pad"]) for s in shapes})


def test_model_geometries_are_the_expected_ones():
    geos = _model_geometries()
    assert (3, 2, 1, 1) in geos and (1, 2, 1, 0) in geos and (3, 1, 4, 4) in geos
    assert geos == sorted(GEOMETRIES), "A1/A1-s8 gained a conv geometry: add it to GEOMETRIES"


GEOMETRIES = [(1, 1, 1, 0), (1, 2, 1, 0), (3, 1, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4), (3, 2, 1, 1)]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("hw", [(6, 8), (7, 5)], ids=["even", "odd"])
@pytest.mark.parametrize("k, stride, dil, pad", GEOMETRIES, ids=lambda v: str(v))
def test_model_geometries_vs_torch(device, k, stride, dil, pad, hw, dt):
    odt = DTYPES[dt]
    C, K = 6, 5
    x = torch.randn(1, C, *hw, device=device)
    if dt == "bf16":
        x = x.to(odt)
    w = torch.randn(K, C, k, k, device=device) / (C * k * k) ** 0.5
    _check_launchers(device, x, w, _bn_vectors(C, device), stride, pad, dil, odt)


@pytest.mark.parametrize("k, stride, dil, pad", [(3, 2, 1, 1), (1, 2, 1, 0), (3, 3, 2, 2)], ids=lambda v: str(v))
def test_strided_dgrad_gpu_tile_and_deterministic(device, k, stride, dil, pad):
    """A GPU tile (64x64x32: one row tile spans several phase rows) and the deterministic per-(phase, tile) sums;
    stride 3 with dilation 2 (gcd 1, step 3) beyond the model's geometries."""
    C, K = 40, 36
    x = torch.randn(1, C, 7, 5, device=device)
    w = torch.randn(K, C, k, k, device=device) / (C * k * k) ** 0.5
    vec = _bn_vectors(C, device)
    cfg = kc.GPU_CONFIGS["16bit"][0]
    _check_launchers(device, x, w, vec, stride, pad, dil, torch.bfloat16, config=cfg)
    _check_launchers(device, x, w, vec, stride, pad, dil, torch.float32, deterministic=True)


def _useful_macs(N, H, W, C, K, R, stride, pad, dil):
    P = (H + 2 * pad - dil * (R - 1) - 1) // stride + 1
    Q = (W + 2 * pad - dil * (R - 1) - 1) // stride + 1
    rows = sum(1 for p in range(P) for r in range(R) if 0 <= p * stride - pad + r * dil < H)
    cols = sum(1 for q in range(Q) for s in range(R) if 0 <= q * stride - pad + s * dil < W)
    return N * rows * cols * C * K


@pytest.mark.parametrize("k, pad", [(3, 1), (1, 0)])
def test_stride2_dgrad_mma_work_is_useful(monkeypatch, k, pad):
    """Count the multiply-adds of every tl.dot the interpreted dgrad issues: within 10% of the useful ones."""
    from triton.runtime import interpreter

    issued = []
    real = interpreter.interpreter_builder.create_dot

    def counting(a, b, d, *args):
        issued.append(a.data.shape[0] * a.data.shape[1] * b.data.shape[1])
        return real(a, b, d, *args)

    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", counting)
    N, C, K, H, W = 1, 16, 16, 16, 16
    x = torch.randn(N, C, H, W)
    w = torch.randn(K, C, k, k)
    dy = torch.randn(N, K, 8, 8)
    g, _, _ = kc.conv_dgrad(dy, w, x, 2, pad, 1, config=kc.INTERPRETER_CONFIG)
    torch.testing.assert_close(g, torch.nn.grad.conv2d_input(x.shape, w, dy, 2, pad, 1), rtol=1e-4, atol=1e-4)
    useful = _useful_macs(N, H, W, C, K, k, 2, pad, 1)
    assert issued, "no tl.dot counted: is the interpreter on?"
    ratio = sum(issued) / useful
    assert 1.0 <= ratio <= 1.10, f"dgrad issued {sum(issued)} MACs for {useful} useful ones ({ratio:.3f}x)"
