"""The public fused entry points, :func:`bn_relu` and :func:`bn_relu_conv`: the one place that chooses a path.

Per call, in this order: export/trace for inference takes plain aten ops (:mod:`kernels.plain`); under
``torch.compile`` the opaque custom ops of :mod:`kernels.ops` (Dynamo cannot trace the Triton launches and the
BNParams on ``ctx``); otherwise the eager autograd Functions (the lowest host cost). Functions and ops are both
generated from one spec per op (``BN_ACT``, ``BN_ACT_CONV``; :mod:`kernels.opspec`), so they take the same
arguments and call the same implementations: values are identical. This module sits above all of them, so the
imports run one way: ``api -> ops -> bn_relu_conv -> bn_relu -> opspec, bn_stats -> tiles/launch/_common``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import _runtime, ops
from . import plain as _plain  # export/trace in inference: plain aten ops
from .bn_relu import BN_ACT, activation_code, bn_params, compute_dtype
from .bn_relu_conv import BN_ACT_CONV, _dropout_mask, _geometry, _igemm_supported


def bn_relu(
    x: torch.Tensor,
    bn: torch.nn.modules.batchnorm._BatchNorm,
    *,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """act(bn(x)) for an nn.BatchNorm2d ``bn`` (its mode, statistics and parameters), storing only x for backward.

    x: (N, C, H, W) NCHW or channels_last, fp32/fp16/bf16. Output: x's layout, autocast dtype if autocast is on.
    ``activation``: "relu" (default), "leaky_relu" (negative slope ``activation_param``) or "identity".
    """
    activation_code(activation)  # an unknown name fails here, on every path
    if _plain.exporting() and _plain.take_plain(bn, "kernels.bn_relu"):  # export/trace for inference (plain.py)
        return _plain.bn_act_plain(x, bn, activation, activation_param, compute_dtype(x))
    resolved = _runtime.resolve_backend(backend, x)
    if torch.compiler.is_compiling() and not sync:  # one opaque custom op per step for Dynamo (kernels/ops.py)
        return ops.bn_relu_via_ops(x, bn, resolved, compute_dtype(x), activation, activation_param)
    p = bn_params(
        x,
        bn,
        backend=resolved,
        sync=sync,
        process_group=process_group,
        activation=activation,
        activation_param=activation_param,
    )
    # BN_ACT's arguments in spec order (kernels/bn_relu.py), the BNParams in the statistics' place
    return BN_ACT.apply(
        x,
        p,
        bn.weight,
        bn.bias,
        p.batch_stats,
        resolved,
        compute_dtype(x),
        activation,
        p.activation_param,
        sync,
        process_group,
    )


def bn_relu_conv(
    x: torch.Tensor,
    bn: nn.modules.batchnorm._BatchNorm,
    convs: Sequence[nn.Conv2d],
    *,
    dropout: float = 0.0,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
    conv: str = "torch",
    activation: str = "relu",
    activation_param: float = 0.01,
) -> list[torch.Tensor]:
    """``[conv(dropout(act(bn(x)))) for conv in convs]`` sharing one activation that is never stored.

    ``bn`` follows nn.BatchNorm2d semantics (batch statistics and running-stat updates in training,
    running statistics in eval; frozen statistics with trainable gamma/beta = bn.eval() with requires_grad).
    ``dropout`` is element-wise inverted dropout between the activation and the convs (applied when > 0).
    ``conv="triton"`` (with the triton backend) runs the convolutions as implicit GEMMs that normalise and
    rectify x while loading it (:mod:`kernels.conv`); ``"torch"`` (default) uses torch/cuDNN convolutions;
    ``"auto"`` picks per call from the table of :mod:`kernels.conv_choice` (device and shape; cuDNN where the
    table has no entry, off CUDA, or where the implicit GEMM cannot run these convs).
    ``activation``: "relu" (default), "leaky_relu" (negative slope ``activation_param``) or "identity".
    """
    if not convs:
        raise ValueError("bn_relu_conv needs at least one convolution")
    activation_code(activation)  # an unknown name fails here, on every path
    resolved = _runtime.resolve_backend(backend, x)
    if conv not in ("torch", "triton", "auto"):
        raise ValueError(f"conv must be 'torch', 'triton' or 'auto', got {conv!r}")
    if conv == "auto":  # per layer, from the shipped/overridden table (kernels/conv_choice.py); never off CUDA
        from .conv_choice import choose  # here, not at the top: `python -m kernels.conv_choice` stays clean

        conv = (
            "triton"
            if (
                resolved == "triton"
                and _igemm_supported(convs, dropout, sync) is None
                and choose(x, convs, compute_dtype(x)) == "triton"
            )
            else "torch"
        )
    if conv == "triton":
        why = "it needs backend='triton'" if resolved != "triton" else _igemm_supported(convs, dropout, sync)
        if why:
            raise ValueError(f"conv='triton' cannot be used here: {why}")
    cdtype = compute_dtype(x)
    geometry = tuple(_geometry(c) for c in convs)  # validates padding before any running statistic changes
    if _plain.exporting() and _plain.take_plain(bn, "kernels.bn_relu_conv"):  # export/trace for inference
        return _plain.bn_act_conv_plain(x, bn, convs, dropout, activation, activation_param)  # (plain.py)
    if torch.compiler.is_compiling() and not sync:  # opaque custom ops for Dynamo (kernels/ops.py)
        mask, keep = _dropout_mask(x, dropout)
        return ops.bn_relu_conv_via_ops(
            x, bn, convs, geometry, resolved, cdtype, mask, keep, conv, activation, activation_param
        )
    p = bn_params(
        x,
        bn,
        backend=resolved,
        sync=sync,
        process_group=process_group,
        activation=activation,
        activation_param=activation_param,
    )
    mask, keep = _dropout_mask(x, dropout) if conv == "torch" else (None, 1.0)
    outs = BN_ACT_CONV.apply(  # BN_ACT_CONV's arguments in spec order (kernels/bn_relu_conv.py)
        x,
        p,
        bn.weight,
        bn.bias,
        [c.weight for c in convs],
        [c.bias for c in convs if c.bias is not None],
        [c.bias is not None for c in convs],
        geometry,
        mask,
        keep,
        p.batch_stats,
        resolved,
        cdtype,
        conv,
        activation,
        p.activation_param,
        sync,
        process_group,
        None,
    )
    return list(outs)
