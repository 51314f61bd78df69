"""The fused BN-activation(-conv) paths as ``torch.library`` custom ops, for ``torch.compile``.

Eager code runs the autograd Functions of :mod:`kernels.bn_relu` / :mod:`kernels.bn_relu_conv` (lowest host
overhead). Under ``torch.compile`` those Functions would be traced into: their Triton launches, a dataclass and
strings on ``ctx`` are not traceable as opaque ops. So while compiling, :func:`kernels.bn_relu` and
:func:`kernels.bn_relu_conv` call these ops instead: Dynamo and AOTAutograd see each as one node with a fake
(shape-only) implementation and a registered backward, Inductor leaves it alone, and on a GPU the Triton kernels
run as they do in eager. Both paths call the same forward/backward functions, so values are identical.

Ops (namespace ``widedeep_kernels``), C channels, x (N, C, H, W) NCHW or channels_last:

- ``bn_stats``: batch or running statistics packed as the (5, C) STAT_ROWS tensor ``[mean, var, rstd, scale,
  count]`` of :mod:`kernels.bn_stats` (fp32; fp64 for fp64 input on the torch backend; ``count`` repeated along C);
  updates running_mean / running_var /
  num_batches_tracked in place in training (declared mutations; empty tensors when the BN has no running stats).
- ``bn_act`` / ``bn_act_backward``: act(bn(x)) given packed statistics; backward gives (dx, dgamma, dbeta).
- ``bn_act_conv`` / ``bn_act_conv_backward``: [conv_i(dropout(act(bn(x))))] with torch/cuDNN convolutions
  (``conv_impl="torch"``) or the implicit-GEMM kernels (``"triton"``); geometry is 7 ints per conv
  (stride h/w, padding h/w, dilation h/w, groups).

Synchronised statistics (``sync=True``) are not offered here: a process group cannot be an op argument, so
SyncBN-style blocks keep the eager Functions, which Dynamo then traces (collectives included).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .bn_relu import BNParams, bn_params, bn_relu_backward, bn_relu_forward
from .bn_stats import STAT_ROWS
from .bn_relu_conv import conv_backward, conv_forward, igemm_backward, igemm_forward

NS = "widedeep_kernels"
# Inductor may hand an op inputs in other layouts than those it was traced with (it re-lays out buffers); the
# outputs' layouts follow the inputs', so the fake implementations hold only if the inputs keep their exact strides
_TAGS = (getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order),)


def _stats_dtype(x: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if (x.dtype == torch.float64 and backend != "triton") else torch.float32


def _is_cl(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _fmt(t: Tensor) -> torch.memory_format:
    """The layout an op output takes from the tensor ``t`` it follows: channels_last if ``t`` is, else NCHW.

    The real implementations pin their outputs to it (a no-op in the usual cases) so that the fake
    implementations can state it: what the kernels and cuDNN/oneDNN would pick by themselves also depends on the
    weights' layouts and on denseness."""
    return torch.channels_last if _is_cl(t) else torch.contiguous_format


# ---------------------------------------------------------------------------------------------------------------
# statistics


@torch.library.custom_op(
    f"{NS}::bn_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked"), tags=_TAGS
)
def bn_stats(
    x: Tensor,
    weight: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    has_running: bool,
    momentum: float,
    cumulative: bool,
    eps: float,
    training: bool,
    track_running_stats: bool,
    backend: str,
) -> Tensor:
    """The (5, C) STAT_ROWS ``[mean, var, rstd, scale = gamma * rstd, count]`` following nn.BatchNorm2d's rules
    (see module doc; the var row is not read by the ops).

    ``cumulative``: momentum=None (cumulative moving average); ``momentum`` is then ignored."""
    bn = SimpleNamespace(
        training=training,
        track_running_stats=track_running_stats,
        weight=weight,
        bias=None,
        eps=eps,
        momentum=None if cumulative else momentum,
        running_mean=running_mean if has_running else None,
        running_var=running_var if has_running else None,
        num_batches_tracked=num_batches_tracked if has_running else None,
    )
    p = bn_params(x, bn, backend=backend)
    if p.stats is not None:  # the triton statistics kernel's own (fresh) buffer
        return p.stats
    C = x.shape[1]
    dt = _stats_dtype(x, backend)
    count = p.count.to(dt).expand(C)  # a 0-dim device tensor in every mode: no host-to-device copy to wait for
    return torch.stack([p.mean.to(dt), torch.zeros_like(count), p.rstd.to(dt), p.scale.to(dt), count])


@bn_stats.register_fake
def _(
    x,
    weight,
    running_mean,
    running_var,
    num_batches_tracked,
    has_running,
    momentum,
    cumulative,
    eps,
    training,
    track_running_stats,
    backend,
):
    return x.new_empty((len(STAT_ROWS), x.shape[1]), dtype=_stats_dtype(x, backend))


def unpack(
    stats: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    batch_stats: bool,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> BNParams:
    """The BNParams of a packed (5, C) STAT_ROWS tensor and the BN's (gamma, beta) (detached)."""
    return BNParams.from_stats(
        stats,
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
        batch_stats,
        activation,
        activation_param,
    )


def stats_of(x: Tensor, bn, backend: str) -> Tensor:
    """Call :func:`bn_stats` for an nn.BatchNorm2d-like ``bn`` (its mode, buffers and momentum)."""
    has_running = bn.running_mean is not None
    empty = x.new_empty(0, dtype=torch.float32)
    nbt = (
        bn.num_batches_tracked
        if has_running and bn.num_batches_tracked is not None
        else x.new_zeros((), dtype=torch.long)
    )
    return bn_stats(
        x.detach(),
        bn.weight.detach() if bn.weight is not None else None,
        bn.running_mean if has_running else empty,
        bn.running_var if has_running else empty,
        nbt,
        has_running,
        0.0 if bn.momentum is None else float(bn.momentum),
        bn.momentum is None,
        float(bn.eps),
        bool(bn.training),
        bool(bn.track_running_stats),
        backend,
    )


# ---------------------------------------------------------------------------------------------------------------
# act(bn(x))


@torch.library.custom_op(f"{NS}::bn_act", mutates_args=(), tags=_TAGS)
def bn_act(
    x: Tensor,
    stats: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    batch_stats: bool,
    backend: str,
    out_dtype: torch.dtype,
    activation: str,
    activation_param: float,
) -> Tensor:
    """act(bn(x)) in x's layout and ``out_dtype``."""
    p = unpack(stats, weight, bias, batch_stats, activation, activation_param)
    return bn_relu_forward(x, p, backend=backend, out_dtype=out_dtype).contiguous(memory_format=_fmt(x))


@bn_act.register_fake
def _(x, stats, weight, bias, batch_stats, backend, out_dtype, activation, activation_param):
    return x.new_empty(x.shape, dtype=out_dtype).contiguous(memory_format=_fmt(x))


@torch.library.custom_op(f"{NS}::bn_act_backward", mutates_args=(), tags=_TAGS)
def bn_act_backward(
    x: Tensor,
    dy: Tensor,
    stats: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    batch_stats: bool,
    backend: str,
    activation: str,
    activation_param: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype and layout, dgamma fp32 (C,), dbeta fp32 (C,))."""
    p = unpack(stats, weight, bias, batch_stats, activation, activation_param)
    dx, dgamma, dbeta = bn_relu_backward(x, dy, p, backend=backend)
    # (dgamma/dbeta: rows of one buffer; outputs of an op must not alias each other)
    return dx.contiguous(memory_format=_fmt(x)), dgamma.float().clone(), dbeta.float().clone()


@bn_act_backward.register_fake
def _(x, dy, stats, weight, bias, batch_stats, backend, activation, activation_param):
    C = x.shape[1]
    return (
        x.new_empty(x.shape).contiguous(memory_format=_fmt(x)),
        x.new_empty(C, dtype=torch.float32),
        x.new_empty(C, dtype=torch.float32),
    )


def _bn_act_setup(ctx, inputs, output):
    x, stats, weight, bias, batch_stats, backend, _out_dtype, activation, activation_param = inputs
    ctx.save_for_backward(x, stats, weight, bias)
    ctx.flags = (batch_stats, backend, activation, activation_param)


def _bn_act_bwd(ctx, dy):
    x, stats, weight, bias = ctx.saved_tensors
    dx, dgamma, dbeta = bn_act_backward(x, dy, stats, weight, bias, *ctx.flags)
    return (
        dx,
        None,
        None if weight is None else dgamma.to(weight.dtype),
        None if bias is None else dbeta.to(bias.dtype),
        None,
        None,
        None,
        None,
        None,
    )


bn_act.register_autograd(_bn_act_bwd, setup_context=_bn_act_setup)


# ---------------------------------------------------------------------------------------------------------------
# [conv_i(dropout(act(bn(x))))]


def _geometry(flat: Sequence[int]) -> list[tuple]:
    return [
        ((flat[i], flat[i + 1]), (flat[i + 2], flat[i + 3]), (flat[i + 4], flat[i + 5]), flat[i + 6])
        for i in range(0, len(flat), 7)
    ]


def _spread(present: Sequence[Tensor], has: Sequence[bool]) -> list[Optional[Tensor]]:
    """[b_i or None] from the tensors that exist and a flag per position."""
    it = iter(present)
    return [next(it) if h else None for h in has]


def flat_geometry(geometry: Sequence[tuple]) -> list[int]:
    """7 ints per conv from its validated (stride, padding, dilation, groups) (``bn_relu_conv._geometry``)."""
    return [v for stride, padding, dilation, groups in geometry for v in (*stride, *padding, *dilation, groups)]


def _conv_out_shape(x: Tensor, w: Tensor, geo: tuple) -> tuple[int, ...]:
    (sh, sw), (ph, pw), (dh, dw), _g = geo
    N, _C, H, W = x.shape
    kh, kw = w.shape[2], w.shape[3]
    return (N, w.shape[0], (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


@torch.library.custom_op(f"{NS}::bn_act_conv", mutates_args=(), tags=_TAGS)
def bn_act_conv(
    x: Tensor,
    stats: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    conv_weights: Sequence[Tensor],
    conv_biases: Sequence[Tensor],
    has_bias: Sequence[bool],
    geometry: Sequence[int],
    mask: Optional[Tensor],
    keep: float,
    batch_stats: bool,
    backend: str,
    cdtype: torch.dtype,
    conv_impl: str,
    activation: str,
    activation_param: float,
) -> list[Tensor]:
    """Outputs (N, K_i, H_i, W_i) in ``cdtype``; channels_last if x is or with the implicit GEMMs, else NCHW.

    ``conv_biases`` holds only the biases that exist, ``has_bias`` says which convs have one (a list mixing
    tensors and None would not get per-element gradients from torch.library's autograd)."""
    p = unpack(stats, weight, bias, batch_stats, activation, activation_param)
    geo = _geometry(geometry)
    conv_biases = _spread(conv_biases, has_bias)
    if conv_impl == "triton":
        outs = igemm_forward(x, p, cdtype, conv_weights, conv_biases, geo)
    else:
        outs = conv_forward(x, p, backend, cdtype, mask, keep, conv_weights, conv_biases, geo)
    fmt = _out_fmt(x, conv_impl)
    return [y.contiguous(memory_format=fmt) for y in outs]


def _out_fmt(x: Tensor, conv_impl: str) -> torch.memory_format:
    # x's layout only: Inductor re-derives the outputs' layouts from its own view of the inputs, and for the
    # parameters that view need not keep a channels_last weight's strides (cuDNN/oneDNN alone would follow them)
    return torch.channels_last if conv_impl == "triton" else _fmt(x)


@bn_act_conv.register_fake
def _(
    x,
    stats,
    weight,
    bias,
    conv_weights,
    conv_biases,
    has_bias,
    geometry,
    mask,
    keep,
    batch_stats,
    backend,
    cdtype,
    conv_impl,
    activation,
    activation_param,
):
    fmt = _out_fmt(x, conv_impl)
    return [
        x.new_empty(_conv_out_shape(x, w, g), dtype=cdtype).contiguous(memory_format=fmt)
        for w, g in zip(conv_weights, _geometry(geometry))
    ]


@torch.library.custom_op(f"{NS}::bn_act_conv_backward", mutates_args=(), tags=_TAGS)
def bn_act_conv_backward(
    grads: Sequence[Tensor],
    x: Tensor,
    stats: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    conv_weights: Sequence[Tensor],
    has_bias: Sequence[bool],
    geometry: Sequence[int],
    mask: Optional[Tensor],
    keep: float,
    batch_stats: bool,
    backend: str,
    cdtype: torch.dtype,
    conv_impl: str,
    activation: str,
    activation_param: float,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(dx, dgamma fp32, dbeta fp32, [dW_i], [db_i of the convs that have a bias])."""
    p = unpack(stats, weight, bias, batch_stats, activation, activation_param)
    geo = _geometry(geometry)
    n = len(conv_weights)
    if conv_impl == "triton":
        dx, dgamma, dbeta, pg = igemm_backward(x, p, cdtype, conv_weights, has_bias, geo, grads)
    else:
        dx, dgamma, dbeta, pg = conv_backward(
            x, p, backend, cdtype, mask, keep, conv_weights, has_bias, geo, grads, True, [True] * n, [True] * n
        )
    # dgamma/dbeta are rows of one buffer on the triton backend: outputs of an op must not alias each other.
    # dx takes x's layout, each dW its weight's (_fmt): what the fake implementation states.
    dws = [g.contiguous(memory_format=_fmt(w)) for g, w in zip(pg[0::2], conv_weights)]
    return (
        dx.contiguous(memory_format=_fmt(x)),
        dgamma.float().clone(),
        dbeta.float().clone(),
        dws,
        [g for g in pg[1::2] if g is not None],
    )


@bn_act_conv_backward.register_fake
def _(
    grads,
    x,
    stats,
    weight,
    bias,
    conv_weights,
    has_bias,
    geometry,
    mask,
    keep,
    batch_stats,
    backend,
    cdtype,
    conv_impl,
    activation,
    activation_param,
):
    C = x.shape[1]
    dbs = [x.new_empty(w.shape[0], dtype=w.dtype) for w, hb in zip(conv_weights, has_bias) if hb]
    return (
        x.new_empty(x.shape).contiguous(memory_format=_fmt(x)),
        x.new_empty(C, dtype=torch.float32),
        x.new_empty(C, dtype=torch.float32),
        [w.new_empty(w.shape).contiguous(memory_format=_fmt(w)) for w in conv_weights],
        dbs,
    )


def _bn_act_conv_setup(ctx, inputs, output):
    (
        x,
        stats,
        weight,
        bias,
        conv_weights,
        _conv_biases,
        has_bias,
        geometry,
        mask,
        keep,
        batch_stats,
        backend,
        cdtype,
        conv_impl,
        activation,
        activation_param,
    ) = inputs
    ctx.out_meta = [(o.shape, o.dtype, o.device) for o in output]
    ctx.has_bias = list(has_bias)
    ctx.save_for_backward(x, stats, weight, bias, mask, *conv_weights)
    ctx.flags = (list(geometry), keep, batch_stats, backend, cdtype, conv_impl, activation, activation_param)


def _bn_act_conv_bwd(ctx, grads):
    x, stats, weight, bias, mask, *conv_weights = ctx.saved_tensors
    geometry, keep, batch_stats, backend, cdtype, conv_impl, activation, activation_param = ctx.flags
    # an output nobody used gets a zero gradient (the op needs one tensor per output)
    grads = [
        torch.zeros(shape, dtype=dt, device=dev) if g is None else g for g, (shape, dt, dev) in zip(grads, ctx.out_meta)
    ]
    dx, dgamma, dbeta, dws, dbs = bn_act_conv_backward(
        grads,
        x,
        stats,
        weight,
        bias,
        conv_weights,
        ctx.has_bias,
        geometry,
        mask,
        keep,
        batch_stats,
        backend,
        cdtype,
        conv_impl,
        activation,
        activation_param,
    )
    return (
        dx,
        None,
        None if weight is None else dgamma.to(weight.dtype),
        None if bias is None else dbeta.to(bias.dtype),
        list(dws),
        list(dbs),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


bn_act_conv.register_autograd(_bn_act_conv_bwd, setup_context=_bn_act_conv_setup)


# ---------------------------------------------------------------------------------------------------------------
# module-level entry points (what kernels.bn_relu / kernels.bn_relu_conv call while compiling)


def _dense_with_stats(x: Tensor, bn, backend: str) -> tuple[Tensor, Tensor, bool]:
    """(x made dense, its packed statistics, whether they are batch statistics: nn.BatchNorm2d's rule)."""
    x = x.contiguous(memory_format=_fmt(x))  # dense: a strided view's layout is ambiguous to Inductor
    return x, stats_of(x, bn, backend), bool(bn.training or bn.running_mean is None)


def bn_relu_via_ops(
    x: Tensor, bn, backend: str, out_dtype: torch.dtype, activation: str = "relu", activation_param: float = 0.01
) -> Tensor:
    x, stats, batch_stats = _dense_with_stats(x, bn, backend)
    return bn_act(x, stats, bn.weight, bn.bias, batch_stats, backend, out_dtype, activation, activation_param)


def bn_relu_conv_via_ops(
    x: Tensor,
    bn,
    convs,
    geometry: Sequence[tuple],
    backend: str,
    cdtype: torch.dtype,
    mask: Optional[Tensor],
    keep: float,
    conv_impl: str,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> list[Tensor]:
    x, stats, batch_stats = _dense_with_stats(x, bn, backend)
    return bn_act_conv(
        x,
        stats,
        bn.weight,
        bn.bias,
        [c.weight for c in convs],
        [c.bias for c in convs if c.bias is not None],
        [c.bias is not None for c in convs],
        flat_geometry(geometry),
        mask,
        keep,
        batch_stats,
        backend,
        cdtype,
        conv_impl,
        activation,
        activation_param,
    )
