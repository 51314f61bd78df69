"""What every kernel module shares: activation codes and their jit functions, element offsets, layouts, the
int64-offset rule and Triton dtype names. A leaf module: it imports only torch, triton and :mod:`._runtime`.

Layout convention: an element at (n, c, hw) of an (N, C, H, W) tensor, with position m = n*HW + hw, sits at
``m*C + c`` (channels_last) or ``(n*C + c)*HW + hw`` (NCHW).
"""

from __future__ import annotations

import torch

from . import _runtime  # noqa: F401 (first: sets TRITON_INTERPRET before triton.jit runs)
from ._runtime import HAS_TRITON

# activation name -> the ACT constexpr of every kernel (0 keeps ReLU's code unchanged)
ACTIVATIONS = {"relu": 0, "leaky_relu": 1, "identity": 2}

# Triton's names for the dtypes the kernels take (signatures of the ahead-of-time variants)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

INT64_FROM = 2**31  # tensors with at least this many elements get int64 offsets (tests lower it)


def activation_code(activation: str) -> int:
    """The ``ACT`` constexpr for an activation name; ValueError for an unknown one."""
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}") from None


def needs_int64(x: torch.Tensor) -> bool:
    return x.numel() >= INT64_FROM


def as_nchw_or_nhwc(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x, channels_last): x made dense in one of the two layouts the kernels index."""
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr_function wrapper costing ~3.6 us a call)."""
    return -(-a // b)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _element_offsets(ms, cs, C, HW, CHANNELS_LAST: tl.constexpr):
        """(BLOCK_M, BLOCK_C) element offsets of positions ``ms`` (m = n*HW + hw) and channels ``cs``, in ms's
        integer type (int64 ms: int64 offsets throughout, c*HW included)."""
        cs = cs.to(ms.dtype)
        if CHANNELS_LAST:
            offs = ms[:, None] * C + cs[None, :]
        else:
            offs = ((ms // HW) * C * HW + ms % HW)[:, None] + cs[None, :] * HW
        return offs

    @triton.jit
    def _act_fwd(z, slope, ACT: tl.constexpr):
        """act(z) in fp32: ACT 0 relu, 1 leaky_relu (negative slope ``slope``), 2 identity (see ACTIVATIONS).

        Leaky: z > 0 ? z : z * slope, as torch's leaky_relu (so -0.0 and NaN come out alike)."""
        if ACT == 0:
            y = tl.maximum(z, 0.0)
        elif ACT == 1:
            y = tl.where(z > 0.0, z, z * slope)
        else:
            y = z
        return y

    @triton.jit
    def _act_bwd(z, dy, slope, ACT: tl.constexpr):
        """dL/dz = dy * act'(z) from the recomputed pre-activation z: relu [z > 0], leaky (z > 0 ? 1 : slope)."""
        if ACT == 0:
            g = tl.where(z > 0.0, dy, 0.0)
        elif ACT == 1:
            g = tl.where(z > 0.0, dy, dy * slope)
        else:
            g = dy
        return g

    @triton.jit
    def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
        """Chan's merge of two (mean, M2, count) summaries: THE statistics merge of every kernel (per-lane
        partials, program partials, ranks). Empty sides (count 0) merge to the other side exactly."""
        n = n_a + n_b
        w = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
        delta = mean_b - mean_a
        return mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w, n
