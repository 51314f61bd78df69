"""The fused BN-activation(-conv) paths as ``torch.library`` custom ops, for ``torch.compile``.

Eager code runs the autograd Functions generated from the specs ``BN_ACT`` (:mod:`kernels.bn_relu`) and
``BN_ACT_CONV`` (:mod:`kernels.bn_relu_conv`) (lowest host overhead). Under ``torch.compile`` those Functions
would be traced into: their Triton launches and the BNParams on ``ctx`` are not traceable as opaque ops. So while
compiling, :func:`kernels.bn_relu` and :func:`kernels.bn_relu_conv` call these ops instead: Dynamo and
AOTAutograd see each as one node with a fake (shape-only) implementation and a registered backward, Inductor
leaves it alone, and on a GPU the Triton kernels run as they do in eager. The ops are generated from the same
specs (:mod:`kernels.opspec`): same arguments, same implementations, so values are identical.

Ops (namespace ``widedeep_kernels``), C channels, x (N, C, H, W) NCHW or channels_last:

- ``bn_stats``: batch or running statistics packed as the (5, C) STAT_ROWS tensor ``[mean, var, rstd, scale,
  count]`` of :mod:`kernels.bn_stats` (fp32; fp64 for fp64 input on the torch backend; ``count`` repeated along C);
  updates running_mean / running_var /
  num_batches_tracked in place in training (declared mutations; empty tensors when the BN has no running stats).
- ``bn_act`` / ``bn_act_backward``: act(bn(x)) given packed statistics; backward gives (dx, dgamma, dbeta) in
  the inputs' dtypes (empty tensors for an absent gamma/beta).
- ``bn_act_conv`` / ``bn_act_conv_backward``: [conv_i(dropout(act(bn(x))))] with torch/cuDNN convolutions
  (``conv_impl="torch"``) or the implicit-GEMM kernels (``"triton"``); geometry is 7 ints per conv
  (stride h/w, padding h/w, dilation h/w, groups); backward gives (dx, dgamma, dbeta, [dW_i], [db_i]).

Synchronised statistics (``sync=True``) are not offered here: a process group cannot be an op argument, so
SyncBN-style blocks keep the eager Functions, which Dynamo then traces (collectives included).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .bn_relu import BN_ACT, bn_params
from .bn_relu_conv import BN_ACT_CONV, flat_geometry
from .bn_stats import STAT_ROWS
from .opspec import memory_format

NS = "widedeep_kernels"
# Inductor may hand an op inputs in other layouts than those it was traced with (it re-lays out buffers); the
# outputs' layouts follow the inputs', so the fake implementations hold only if the inputs keep their exact strides
_TAGS = (getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order),)


def _stats_dtype(x: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if (x.dtype == torch.float64 and backend != "triton") else torch.float32


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
# act(bn(x)) and [conv_i(dropout(act(bn(x))))]: generated from the specs the eager Functions come from

bn_act = BN_ACT.register(NS, _TAGS)
bn_act_conv = BN_ACT_CONV.register(NS, _TAGS)
bn_act_backward = bn_act.backward_op
bn_act_conv_backward = bn_act_conv.backward_op


# ---------------------------------------------------------------------------------------------------------------
# module-level entry points (what kernels.bn_relu / kernels.bn_relu_conv call while compiling)


def _dense_with_stats(x: Tensor, bn, backend: str) -> tuple[Tensor, Tensor, bool]:
    """(x made dense, its packed statistics, whether they are batch statistics: nn.BatchNorm2d's rule)."""
    x = x.contiguous(memory_format=memory_format(x))  # dense: a strided view's layout is ambiguous to Inductor
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
