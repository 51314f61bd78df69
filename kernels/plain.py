"""The fused blocks as standard aten ops while a model is exported or traced for inference.

Why: ``torch.export`` / ``torch.onnx.export(..., dynamo=True)`` of a fused model would otherwise record our
``widedeep_kernels`` custom ops (opaque to ONNX, TensorRT and anything without this package), and
``torch.jit.trace`` cannot record the eager autograd Functions at all. In inference the recompute-in-backward
machinery buys nothing: the forward is exactly ``conv(act(batch_norm(x)))`` with the running statistics, which
every deployment stack understands. So :func:`kernels.bn_relu` and :func:`kernels.bn_relu_conv` (and through
them ``FusedSequential``, fused ResNet-38, ``BNReLU``/``BNReLUConv2d``, ``InPlaceABN``/``ABN``) take this path
when :func:`plain_inference` says so, and the exported graph holds ``aten.batch_norm`` (``_native_batch_norm_
legit_no_training`` after decomposition; ONNX ``BatchNormalization``), the activation (``relu`` /
``leaky_relu``) and ``aten.convolution``.

When: exporting or tracing (:func:`exporting`: ``torch.jit.is_tracing()``, ``torch.compiler.is_exporting()``;
the ONNX exporters run under one of them) *and* the BN normalises with its running statistics (``bn.eval()``, or
frozen statistics: ``bn.training`` False with trainable gamma/beta; :func:`uses_batch_stats` False). Values equal
the eager fused path up to rounding (same formula, one fewer fused pass). ``torch.compile`` (not exporting)
keeps the custom ops: Inductor runs them as in eager.

Training mode (batch statistics) while exporting: ``torch.export.export`` keeps the custom ops (a training graph
whose BN updates running statistics is only meaningful to torch itself, e.g. for AOTAutograd); ONNX export and
``torch.jit.trace`` refuse with one line (:func:`refuse_training_export`): call ``model.eval()`` first.

Tensors: x (N, C, H, W) any float dtype and layout; output in ``out_dtype`` (the autocast dtype when autocast is
on, as the fused path), x's layout as F.batch_norm / F.conv2d give it.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


_CHECKS: tuple = ()


def exporting() -> bool:
    """True while torch.jit.trace, torch.export (incl. ONNX dynamo export) or the legacy ONNX exporter runs.

    Called on every eager step of the fused blocks, so it stays cheap (~0.3 us): the predicates are looked up
    once, and ``torch.onnx.is_in_onnx_export()`` (~1 us) is not asked here: the TorchScript-based ONNX exporter
    traces (``is_tracing``) and the dynamo one exports (``is_exporting``). (:func:`refuse_training_export` asks it.)"""
    global _CHECKS
    if not _CHECKS:
        is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
        _CHECKS = tuple(f for f in (torch.jit.is_tracing, is_exporting) if f) + (
            () if is_exporting else (torch.onnx.is_in_onnx_export,)
        )
    for check in _CHECKS:
        if check():
            return True
    return False


def uses_batch_stats(bn) -> bool:
    """nn.BatchNorm2d's rule: batch statistics in training or when there are no running statistics."""
    return bool(bn.training or bn.running_mean is None)


def plain_inference(bn) -> bool:
    """Take the plain aten path (:func:`bn_act_plain`, :func:`bn_act_conv_plain`) for ``bn`` now?"""
    return exporting() and not uses_batch_stats(bn)


def _onnx_exporting() -> bool:
    """torch.onnx.is_in_onnx_export(), also inside the dynamo ONNX exporter's strict torch.export attempt, where
    Dynamo answers that call with False: then the exporter's own flag is read (private; absent: False)."""
    if torch.onnx.is_in_onnx_export():
        return True
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def refuse_training_export(bn, what: str) -> None:
    """One-line error for ONNX export / jit.trace of a BN with batch statistics (training mode): those graphs
    cannot hold our custom ops. torch.export (no ONNX) is let through: it keeps the custom ops."""
    if not uses_batch_stats(bn):
        return
    if torch.jit.is_tracing() or _onnx_exporting():
        raise RuntimeError(
            f"{what}: a BatchNorm with batch statistics (training mode) cannot be traced or exported "
            "to ONNX as plain ops: call model.eval() (or freeze the BN statistics) first"
        )


def activation_plain(z: torch.Tensor, activation: str, activation_param: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, float(activation_param))
    if activation == "identity":
        return z
    raise ValueError(f"activation must be one of ('relu', 'leaky_relu', 'identity'), got {activation!r}")


def bn_act_plain(
    x: torch.Tensor,
    bn,
    activation: str = "relu",
    activation_param: float = 0.01,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """act(batch_norm(x)) with ``bn``'s running statistics, as aten ops (F.batch_norm, F.relu/leaky_relu).

    ``bn``: an nn.BatchNorm2d or any object with its attributes (``weight`` may be a computed tensor, e.g.
    InPlaceABN's |gamma| + eps). Running statistics are read, never updated."""
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    y = activation_plain(y, activation, activation_param)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def bn_act_conv_plain(
    x: torch.Tensor,
    bn,
    convs: Sequence[torch.nn.Conv2d],
    dropout: float = 0.0,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> list[torch.Tensor]:
    """``[conv(dropout(act(batch_norm(x)))) for conv in convs]`` as aten ops, sharing one activation.

    ``dropout`` (frozen statistics in training only) is F.dropout; the convolutions are the modules' own
    F.conv2d with their geometry (zero padding, as the fused path requires)."""
    a = bn_act_plain(x, bn, activation, activation_param)
    if dropout > 0:
        a = F.dropout(a, dropout, training=True)
    return [F.conv2d(a, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups) for c in convs]


def take_plain(bn, what: str) -> bool:
    """Called by the entry points while :func:`exporting`: True to take the plain path (running statistics);
    False for torch.export of batch statistics (the custom ops stay); one-line RuntimeError for jit.trace / ONNX
    export of batch statistics (:func:`refuse_training_export`)."""
    if not uses_batch_stats(bn):
        return True
    refuse_training_export(bn, what)
    return False
