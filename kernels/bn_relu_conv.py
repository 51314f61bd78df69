"""conv(act(bn(x))) as one autograd Function that saves x, not act(bn(x)), and recomputes it in backward.

act: ReLU (default), leaky ReLU or identity (``activation=``, ``activation_param=``; carried in the BNParams).

Several convolutions may read the same activation (a pre-activation unit's branch2a and its projection
shortcut): they share one BN-ReLU forward and one recompute. The convolutions are torch's (cuDNN on GPU);
with ``dropout`` the Bernoulli mask is kept as bool (1 byte/element) instead of the activation.

Shapes: x (N, C, H, W), NCHW or channels_last; outputs (N, C_out_i, H_i, W_i) per conv.
Dtypes: x fp32/fp16/bf16; the convs compute in the autocast dtype when autocast is on, else in x's dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conv as _conv  # module attribute: tests and tools can replace the launchers
from .bn_relu import (
    ACT_ARGS,
    BN_ARGS,
    SYNC_ARGS,
    BNParams,
    _as,
    bn_relu_backward,
    bn_relu_forward,
    param_grads,
)
from .opspec import Arg, OpSpec, memory_format


def _activation(x, p: BNParams, backend, dtype, mask, keep):
    a = bn_relu_forward(x, p, backend=backend, out_dtype=dtype)
    if mask is not None:
        a = a.mul_(mask).mul_(1.0 / keep)
    return a


def conv_forward(x, p: BNParams, backend: str, cdtype, mask, keep: float, weights, biases, geometry) -> tuple:
    """Forward of conv(dropout(act(bn(x)))) for each (weight, bias, geometry) with torch/cuDNN convolutions.

    Every operand is in ``cdtype`` (the autocast dtype when autocast is on), so autocast, if enabled, has
    nothing to cast. Shared by the autograd Function (eager) and the custom op (:mod:`kernels.ops`)."""
    a = _activation(x, p, backend, cdtype, mask, keep)
    return tuple(
        F.conv2d(a, _as(w, cdtype), None if b is None else _as(b, cdtype), *geo)
        for w, b, geo in zip(weights, biases, geometry)
    )


def conv_backward(
    x,
    p: BNParams,
    backend: str,
    cdtype,
    mask,
    keep: float,
    weights,
    has_bias,
    geometry,
    grad_outs,
    need_dx: bool,
    need_w,
    need_b,
    sync: bool = False,
    group=None,
    param_dtypes=None,
):
    """Backward of :func:`conv_forward`: (dx, dgamma, dbeta, [dW_i, db_i, ...]) recomputing act(bn(x)) once.

    ``weights`` may already be in ``cdtype`` (the forward's cast, kept: no second cast per step); ``param_dtypes``
    then names the parameters' dtypes. dgamma/dbeta are fp32; dW_i/db_i in the parameters' dtype or None where
    not needed; all None if no output received a gradient."""
    param_dtypes = param_dtypes or [w.dtype for w in weights]
    a = _activation(x, p, backend, cdtype, mask, keep)
    grad_a = None
    param_grads: list[torch.Tensor | None] = []
    for i, (w, gy, geo, has_b, pdt) in enumerate(zip(weights, grad_outs, geometry, has_bias, param_dtypes)):
        nw, nb = need_w[i], has_b and need_b[i]
        if gy is None:
            param_grads += [None, None]
            continue
        stride, padding, dilation, groups = geo
        gi, gw, gb = torch.ops.aten.convolution_backward(
            _as(gy, cdtype),
            a,
            _as(w, cdtype),
            [w.shape[0]] if has_b else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [True, nw, nb],
        )
        grad_a = gi if grad_a is None else grad_a.add_(gi)
        param_grads += [_as(gw, pdt) if nw else None, _as(gb, pdt) if nb else None]
    del a
    if grad_a is None:
        return None, None, None, param_grads
    if mask is not None:
        grad_a = grad_a.mul_(mask).mul_(1.0 / keep)
    dx, dgamma, dbeta = bn_relu_backward(x, grad_a, p, backend=backend, need_dx=need_dx, sync=sync, process_group=group)
    return dx, dgamma, dbeta, param_grads


def igemm_forward(x, p: BNParams, cdtype, weights, biases, geometry) -> tuple:
    """Forward with the implicit-GEMM kernels (:mod:`kernels.conv`): act(bn(x)) normalised in each operand load."""
    vec = (p.mean.float(), p.scale.float(), p.beta.float())
    act = dict(activation=p.activation, activation_param=p.activation_param)
    outs = []
    for w, b, (stride, padding, dilation, _groups) in zip(weights, biases, geometry):
        y = _conv.conv_fprop(x, w.to(cdtype), stride[0], padding[0], dilation[0], vec, **act)
        outs.append(y if b is None else y.add_(b.to(cdtype).view(1, -1, 1, 1)))
    return tuple(outs)


def igemm_backward(x, p: BNParams, cdtype, weights, has_bias, geometry, grad_outs):
    """Backward of :func:`igemm_forward`: (dx, dgamma, dbeta, [dW_i, db_i, ...]); all None without gradients."""
    vec = (p.mean.float(), p.scale.float(), p.beta.float())
    act = dict(activation=p.activation, activation_param=p.activation_param)
    g = sum_g = sum_gx = None
    param_grads: list[torch.Tensor | None] = []
    for w, gy, (stride, padding, dilation, _groups), has_b in zip(weights, grad_outs, geometry, has_bias):
        if gy is None:
            param_grads += [None, None]
            continue
        gi, sg, sgx = _conv.conv_dgrad(gy, w.to(cdtype), x, stride[0], padding[0], dilation[0], vec, **act)
        g, sum_g, sum_gx = (gi, sg, sgx) if g is None else (g.add_(gi), sum_g.add_(sg), sum_gx.add_(sgx))
        dw = _conv.conv_wgrad(gy, x, w.shape, stride[0], padding[0], dilation[0], vec, dtype=cdtype, **act)
        param_grads += [dw.to(w.dtype), gy.float().sum((0, 2, 3)).to(w.dtype) if has_b else None]
    if g is None:
        return None, None, None, param_grads
    dx, dgamma, dbeta = bn_relu_backward(x, g, p, backend="triton", sums=(sum_g, sum_gx), grad_wrt_z=True)
    return dx, dgamma, dbeta, param_grads


def _dropout_mask(x: torch.Tensor, dropout: float) -> tuple[torch.Tensor | None, float]:
    """(bool keep-mask in x's shape and layout, keep probability), or (None, 1.0) without dropout."""
    if dropout <= 0:
        return None, 1.0
    keep = 1.0 - dropout
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)
    return mask.contiguous(memory_format=memory_format(x)), keep  # a no-op for NCHW x


def _igemm_supported(convs: Sequence[nn.Conv2d], dropout: float, sync: bool) -> str | None:
    """Why the implicit-GEMM path cannot take these convs, or None when it can."""
    if dropout > 0 or sync:
        return "dropout and synchronised statistics use the cuDNN path"
    for c in convs:
        if (
            c.groups != 1
            or len(set(c.kernel_size)) != 1
            or len(set(c.stride)) != 1
            or len(set(c.dilation)) != 1
            or isinstance(c.padding, str)
            or len(set(c.padding)) != 1
            or c.padding_mode != "zeros"
        ):
            return f"{c} is not a square, ungrouped, zero-padded convolution"
    return None


def _geometry(conv: nn.Conv2d) -> tuple:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"bn_relu_conv supports zero padding given as numbers, not {conv.padding!r}/{conv.padding_mode!r}"
        )
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


# ---------------------------------------------------------------------------------------------------------------
# the op: one argument specification, the eager Function and the custom op generated from it (kernels/opspec.py)


def unflatten_geometry(flat) -> list[tuple]:
    """(stride, padding, dilation, groups) per conv from 7 ints per conv (the op's ``SymInt[] geometry``)."""
    return [
        ((flat[i], flat[i + 1]), (flat[i + 2], flat[i + 3]), (flat[i + 4], flat[i + 5]), flat[i + 6])
        for i in range(0, len(flat), 7)
    ]


def flat_geometry(geometry: Sequence[tuple]) -> list[int]:
    """7 ints per conv from its validated (stride, padding, dilation, groups) (:func:`_geometry`)."""
    return [v for stride, padding, dilation, groups in geometry for v in (*stride, *padding, *dilation, groups)]


def _decode_geometry(a):
    g = a.geometry
    return g if isinstance(g[0], tuple) else unflatten_geometry(g)  # eager callers pass the tuples


def _spread(present: Sequence, has: Sequence[bool], absent=None) -> list:
    """[present_i or ``absent``] per conv from the entries of the convs that have a bias."""
    it = iter(present)
    return [next(it) if h else absent for h in has]


def _bn_act_conv_forward(a, stash):
    biases = _spread(a.conv_biases, a.has_bias) if a.conv_biases else [None] * len(a.has_bias)
    if a.conv_impl == "triton":
        return igemm_forward(a.x, a.stats, a.cdtype, a.conv_weights, biases, a.geometry)
    weights = a.conv_weights
    if stash is not None:  # eager: cast once per step; the backward reuses these copies
        weights = [_as(w, a.cdtype) for w in weights]
        stash["conv_weights"], stash["weight_dtypes"] = weights, [w.dtype for w in a.conv_weights]
    return conv_forward(a.x, a.stats, a.backend, a.cdtype, a.mask, a.keep, weights, biases, a.geometry)


def _bn_act_conv_backward(a, grads, needs):
    n = len(a.conv_weights)
    if a.conv_impl == "triton":
        dx, dgamma, dbeta, pg = igemm_backward(a.x, a.stats, a.cdtype, a.conv_weights, a.has_bias, a.geometry, grads)
    else:
        dx, dgamma, dbeta, pg = conv_backward(
            a.x,
            a.stats,
            a.backend,
            a.cdtype,
            a.mask,
            a.keep,
            a.conv_weights,
            a.has_bias,
            a.geometry,
            grads,
            needs["x"],
            needs["conv_weights"],
            _spread(needs["conv_biases"], a.has_bias, False) if a.conv_biases else [False] * n,
            a.sync,
            a.group,
            a.weight_dtypes,
        )
    out = {"conv_weights": pg[0::2], "conv_biases": [g for g, h in zip(pg[1::2], a.has_bias) if h]}
    if dgamma is None:  # no output received a gradient
        return out
    out["x"] = dx
    return param_grads(a, needs, dgamma, dbeta, out)


def conv_out_shape(x: torch.Tensor, w: torch.Tensor, geo: tuple) -> tuple[int, ...]:
    (sh, sw), (ph, pw), (dh, dw), _g = geo
    N, _C, H, W = x.shape
    kh, kw = w.shape[2], w.shape[3]
    return (N, w.shape[0], (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _bn_act_conv_fake(a):
    geo = _decode_geometry(a)
    return [a.x.new_empty(conv_out_shape(a.x, w, g), dtype=a.cdtype) for w, g in zip(a.conv_weights, geo)]


def _bn_act_conv_layout(a) -> torch.memory_format:
    # x's layout only: Inductor re-derives the outputs' layouts from its own view of the inputs, and for the
    # parameters that view need not keep a channels_last weight's strides (cuDNN/oneDNN alone would follow them);
    # the implicit GEMMs write channels_last
    return torch.channels_last if a.conv_impl == "triton" else memory_format(a.x)


BN_ACT_CONV = OpSpec(
    "bn_act_conv",
    (
        *BN_ARGS,
        Arg("conv_weights", "Tensor[]", grad=True, saved=True),
        # only the biases that exist, ``has_bias`` says which convs have one (a list mixing tensors and None
        # would not get per-element gradients from torch.library's autograd)
        Arg("conv_biases", "Tensor[]", grad=True),
        Arg("has_bias", "bool[]"),
        Arg("geometry", "SymInt[]", decode=_decode_geometry),  # 7 ints per conv; eager: the tuples
        Arg("mask", "Tensor?", saved=True),  # dropout's bool keep-mask, or None
        Arg("keep", "float"),  # dropout's keep probability
        Arg("batch_stats", "bool"),
        Arg("backend", "str"),
        Arg("cdtype", "ScalarType"),
        Arg("conv_impl", "str"),  # "torch" (cuDNN/oneDNN) or "triton" (the implicit GEMMs of kernels.conv)
        *ACT_ARGS,
        *SYNC_ARGS,
        Arg("weight_dtypes", None),  # eager: the parameters' dtypes where the forward stashed cast weights
    ),
    forward=_bn_act_conv_forward,
    backward=_bn_act_conv_backward,
    fake=_bn_act_conv_fake,
    layout=_bn_act_conv_layout,
    returns="Tensor[]",
    stashes=("conv_weights", "weight_dtypes"),
)
"""[conv_i(dropout(act(bn(x))))] saving x (and the dropout mask), never act(bn(x)): outputs (N, K_i, H_i, W_i) in
``cdtype``. Eager: ``BN_ACT_CONV.apply(*values)``; compile: ``widedeep_kernels::bn_act_conv``."""
