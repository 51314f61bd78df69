"""conv(act(bn(x))) as one autograd Function that saves x, not act(bn(x)), and recomputes it in backward.

act: ReLU (default), leaky ReLU or identity (``activation=``, ``activation_param=``; carried in the BNParams).

Several convolutions may read the same activation (a pre-activation unit's branch2a and its projection
shortcut): they share one BN-ReLU forward and one recompute. The convolutions are torch's (cuDNN on GPU);
with ``dropout`` the Bernoulli mask is kept as bool (1 byte/element) instead of the activation.

Shapes: x (N, C, H, W), NCHW or channels_last; outputs (N, C_out_i, H_i, W_i) per conv.
Dtypes: x fp32/fp16/bf16; the convs compute in the autocast dtype when autocast is on, else in x's dtype.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conv as _conv  # module attribute: tests and tools can replace the launchers
from .bn_relu import BNParams, bn_relu_backward, bn_relu_forward


def _activation(x, p: BNParams, backend, dtype, mask, keep):
    a = bn_relu_forward(x, p, backend=backend, out_dtype=dtype)
    if mask is not None:
        a = a.mul_(mask).mul_(1.0 / keep)
    return a


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``; no dispatch when it already is (the common case: a saved cast, an autocast gradient)."""
    return t if t.dtype == dtype else t.to(dtype)


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


def _fixed_inputs(fn_cls) -> int:
    """How many inputs an autograd Function's forward takes before ``*params``: its backward returns one
    gradient (or None) per input, so the padding follows the signature instead of a hand count."""
    n = getattr(fn_cls, "_n_fixed", None)
    if n is None:
        params = list(inspect.signature(fn_cls.forward).parameters.values())[1:]  # without ctx
        n = fn_cls._n_fixed = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
    return n


class _BNReLUConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, gamma, beta, p: BNParams, backend: str, cdtype, mask, keep: float, sync, group, geometry: tuple, *params
    ):
        # params: for each conv, (weight, bias-or-None); geometry: for each conv (stride, padding, dilation, groups)
        weights, biases = params[0::2], params[1::2]
        ctx.weight_dtypes = [w.dtype for w in weights]
        weights = [_as(w, cdtype) for w in weights]  # cast once per step: backward reuses these copies
        outs = conv_forward(x, p, backend, cdtype, mask, keep, weights, biases, geometry)
        ctx.p, ctx.backend, ctx.cdtype, ctx.keep, ctx.sync, ctx.group = p, backend, cdtype, keep, sync, group
        ctx.param_dtype = gamma.dtype if gamma is not None else x.dtype
        ctx.geometry, ctx.has_bias, ctx.has_mask = geometry, [b is not None for b in biases], mask is not None
        ctx.save_for_backward(x, *(() if mask is None else (mask,)), *weights)
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        saved = ctx.saved_tensors
        x, rest = saved[0], saved[1:]
        mask, weights = (rest[0], rest[1:]) if ctx.has_mask else (None, rest)
        n_fixed = _fixed_inputs(_BNReLUConvFunction)
        need = ctx.needs_input_grad
        dx, dgamma, dbeta, param_grads = conv_backward(
            x,
            ctx.p,
            ctx.backend,
            ctx.cdtype,
            mask,
            ctx.keep,
            weights,
            ctx.has_bias,
            ctx.geometry,
            grad_outs,
            need[0],
            need[n_fixed::2],
            need[n_fixed + 1 :: 2],
            ctx.sync,
            ctx.group,
            ctx.weight_dtypes,
        )
        if dgamma is None:
            return (None,) * (n_fixed + len(param_grads))
        return (
            dx,
            _as(dgamma, ctx.param_dtype) if need[1] else None,
            _as(dbeta, ctx.param_dtype) if need[2] else None,
            *([None] * (n_fixed - 3)),
            *param_grads,
        )


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


class _IGemmBNReLUConvFunction(torch.autograd.Function):
    """Same contract as _BNReLUConvFunction, with the implicit-GEMM kernels of :mod:`kernels.conv`:
    relu(bn(x)) is never written, not even in forward or backward (it is recomputed in each operand load)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, p: BNParams, cdtype, geometry: tuple, *params):
        weights, biases = params[0::2], params[1::2]
        outs = igemm_forward(x, p, cdtype, weights, biases, geometry)
        ctx.p, ctx.cdtype, ctx.geometry, ctx.has_bias = p, cdtype, geometry, [b is not None for b in biases]
        ctx.param_dtype = gamma.dtype if gamma is not None else x.dtype
        ctx.save_for_backward(x, *weights)
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        x, *weights = ctx.saved_tensors
        dx, dgamma, dbeta, param_grads = igemm_backward(
            x, ctx.p, ctx.cdtype, weights, ctx.has_bias, ctx.geometry, grad_outs
        )
        n_fixed = _fixed_inputs(_IGemmBNReLUConvFunction)
        if dgamma is None:
            return (None,) * (n_fixed + len(param_grads))
        return (dx, dgamma.to(ctx.param_dtype), dbeta.to(ctx.param_dtype), None, None, None, *param_grads)


def _dropout_mask(x: torch.Tensor, dropout: float) -> tuple[torch.Tensor | None, float]:
    """(bool keep-mask in x's shape and layout, keep probability), or (None, 1.0) without dropout."""
    if dropout <= 0:
        return None, 1.0
    keep = 1.0 - dropout
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        mask = mask.contiguous(memory_format=torch.channels_last)
    return mask, keep


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
