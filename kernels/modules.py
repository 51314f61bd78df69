"""Drop-in nn.Modules built on the recompute kernels.

- :class:`BNReLU`, :class:`BNReLUConv2d`: nn.BatchNorm2d (+ nn.Conv2d) followed by ReLU (or ``activation=``
  "leaky_relu" / "identity"), saving only x for backward.
- :class:`ABN`, :class:`InPlaceABN`, :class:`InPlaceABNSync`: drop-ins for the ``inplace_abn`` package's modules
  (same constructors, attributes and state_dict keys; no CUDA extension to build, CPU and GPU).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plain as _plain
from ._common import activation_code
from .api import bn_relu, bn_relu_conv


class BNReLU(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, saving only its input for backward.

    Same parameters, buffers and state_dict keys as nn.BatchNorm2d, so it replaces one in place.
    ``sync=True`` synchronises batch statistics over torch.distributed (gloo or NCCL).
    ``activation``: "relu" (default), "leaky_relu" (negative slope ``activation_param``) or "identity".
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        backend: str = "auto",
        sync: bool = False,
        process_group=None,
        device=None,
        dtype=None,
        activation: str = "relu",
        activation_param: float = 0.01,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        activation_code(activation)
        self.backend, self.sync, self.process_group = backend, sync, process_group
        self.activation, self.activation_param = activation, activation_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(
            x,
            self,
            backend=self.backend,
            sync=self.sync,
            process_group=self.process_group,
            activation=self.activation,
            activation_param=self.activation_param,
        )

    def extra_repr(self) -> str:
        act = (
            ""
            if self.activation == "relu"
            else f", activation={self.activation!r}"
            + (f"[{self.activation_param}]" if self.activation == "leaky_relu" else "")
        )
        return super().extra_repr() + act


class BNReLUConv2d(nn.Module):
    """The pre-activation step ``conv(relu(bn(x)))`` that stores x, not relu(bn(x)), for backward.

    A drop-in for ``nn.Conv2d`` placed after BN-ReLU: the positional arguments and defaults are
    ``nn.Conv2d``'s (``in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    bias=True, padding_mode="zeros", device=None, dtype=None``); the BatchNorm (``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, on ``in_channels``) and the kernel options are keyword-only.
    ``.bn`` is an nn.BatchNorm2d and ``.conv`` an nn.Conv2d holding exactly their usual parameters and
    buffers, so state_dict keys are ``bn.*`` / ``conv.*`` and weights move freely to and from plain models.
    ``dropout``: element-wise dropout between ReLU and conv in training (mask kept as bool).
    ``conv_impl="triton"``: implicit-GEMM convolutions with the BN-ReLU prologue (see :mod:`kernels.conv`);
    ``"torch"`` (default): torch/cuDNN convolutions; ``"auto"``: per layer from :mod:`kernels.conv_choice`'s
    table (device and shape; cuDNN where it has no entry or off CUDA). (The old keyword ``conv=`` still works, with a
    DeprecationWarning.) ``activation``: "relu" (default), "leaky_relu" (negative slope ``activation_param``)
    or "identity", between BN and conv. String padding (``"same"``) or a ``padding_mode`` other than ``"zeros"`` runs
    BN-ReLU fused and the convolution as nn.Conv2d, which then keeps the activation for backward.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        sync: bool = False,
        process_group=None,
        conv_impl: str = "torch",
        conv: str | None = None,
        activation: str = "relu",
        activation_param: float = 0.01,
    ):
        super().__init__()
        if conv is not None:
            warnings.warn(
                "BNReLUConv2d(conv=...) is deprecated (it shadowed the .conv attribute): use conv_impl=",
                DeprecationWarning,
                stacklevel=2,
            )
            conv_impl = conv
        self.bn = nn.BatchNorm2d(
            in_channels,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._set_options(
            dropout, backend, sync, process_group, conv_impl, activation=activation, activation_param=activation_param
        )

    def _set_options(
        self,
        dropout=0.0,
        backend="auto",
        sync=False,
        process_group=None,
        conv_impl="torch",
        conv=None,
        activation="relu",
        activation_param=0.01,
    ) -> None:
        if conv is not None:
            warnings.warn("conv= is deprecated: use conv_impl=", DeprecationWarning, stacklevel=3)
            conv_impl = conv
        activation_code(activation)
        self.dropout, self.backend, self.sync, self.process_group = dropout, backend, sync, process_group
        self.conv_impl = conv_impl
        self.activation, self.activation_param = activation, activation_param

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, **options) -> "BNReLUConv2d":
        """Wrap existing modules (their parameters are shared, not copied); options as in ``__init__``."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.bn, block.conv = bn, conv
        block._set_options(**options)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if isinstance(self.conv.padding, str) or self.conv.padding_mode != "zeros":
            a = bn_relu(
                x,
                self.bn,
                backend=self.backend,
                sync=self.sync,
                process_group=self.process_group,
                activation=self.activation,
                activation_param=self.activation_param,
            )
            return self.conv(F.dropout(a, p, training=True) if p else a)
        return bn_relu_conv(
            x,
            self.bn,
            [self.conv],
            dropout=p,
            backend=self.backend,
            sync=self.sync,
            process_group=self.process_group,
            conv=self.conv_impl,
            activation=self.activation,
            activation_param=self.activation_param,
        )[0]

    def extra_repr(self) -> str:
        act = (
            ""
            if self.activation == "relu"
            else f", activation={self.activation!r}"
            + (f"[{self.activation_param}]" if self.activation == "leaky_relu" else "")
        )
        return f"backend={self.backend!r}, conv_impl={self.conv_impl!r}, dropout={self.dropout}, sync={self.sync}{act}"


# ----------------------------------------------------------------------------------------------------------------
# inplace_abn drop-ins


class _AbsPlusEps(torch.autograd.Function):
    """|gamma| + eps, the scale InPlaceABN applies, with inplace_abn's gradient: dgamma = g, negated where
    gamma < 0 (at gamma == 0 it is +g; autograd's abs would give 0 there and freeze a zeroed gamma)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(weight)  # a parameter: no activation-sized memory
        return weight.abs() + eps

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return torch.where(weight < 0, -grad, grad), None


class _BNView:
    """The attributes of a BatchNorm that :func:`kernels.bn_relu` reads (mode, buffers, eps, momentum), with
    ``weight`` replaced by another tensor (InPlaceABN's |gamma| + eps). Buffers are the module's own tensors,
    so running statistics are updated in place as usual."""

    __slots__ = (
        "training",
        "track_running_stats",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "momentum",
        "eps",
        "weight",
        "bias",
    )

    def __init__(self, m: nn.Module, weight: Optional[torch.Tensor]):
        self.training, self.track_running_stats = m.training, m.track_running_stats
        self.running_mean, self.running_var = m.running_mean, m.running_var
        self.num_batches_tracked = m.num_batches_tracked
        self.momentum, self.eps, self.weight, self.bias = m.momentum, m.eps, weight, m.bias


class ABN(nn.Module):
    """Activated Batch Normalization, a drop-in for ``inplace_abn.ABN``: BatchNorm then an activation.

    Constructor, attributes and state_dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) as inplace_abn 1.1's ``ABN``::

        ABN(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
            activation="leaky_relu", activation_param=0.01)

    Math as that ``ABN`` (``F.batch_norm`` + activation): ``y = act((x - mean) * rstd * weight + bias)``, the
    weight used as is. (:class:`InPlaceABN` scales by ``|weight| + eps`` instead, as inplace_abn's does.)
    ``activation``: "leaky_relu" (negative slope ``activation_param``), "relu" or "identity"; inplace_abn's
    "elu" is not implemented by these kernels (ValueError). ``momentum=None``: cumulative average.
    Runs the fused recompute kernels (:func:`kernels.bn_relu`): Triton on CUDA, the torch backend on CPU
    (``backend=`` keyword-only to choose), and like them stores only x for backward.
    x: (N, C, *spatial) with 0 to 3 spatial dims (reshaped to the kernels' (N, C, H, W)), fp32/fp16/bf16.
    """

    _version = 2
    _abs_weight = False  # scale by |weight| + eps (InPlaceABN) instead of weight

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if activation == "elu":
            raise ValueError("activation='elu' is not implemented by the kernels (relu, leaky_relu, identity are)")
        activation_code(activation)
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.track_running_stats = track_running_stats
        self.activation, self.activation_param = activation, activation_param
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _sync_args(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(f"expected an (N, C, *spatial) input with 0 to 3 spatial dims, got {tuple(x.shape)}")
        if self.training and x.numel() // max(x.shape[1], 1) <= 1:
            raise ValueError(
                f"{type(self).__name__} needs more than one value per channel to compute batch "
                f"statistics, got input of shape {tuple(x.shape)}"
            )
        shape = x.shape
        if x.dim() != 4:  # the kernels take (N, C, H, W): fold the spatial dims (a view for contiguous x)
            x = x.reshape(shape[0], shape[1], -1, shape[-1] if x.dim() == 5 else 1)
        weight = self.weight
        if self._abs_weight and weight is not None:
            # export/trace: plain ops (an autograd Function is opaque to jit.trace; kernels/plain.py)
            weight = weight.abs() + self.eps if _plain.exporting() else _AbsPlusEps.apply(weight, self.eps)
        y = bn_relu(
            x,
            _BNView(self, weight),
            backend=self.backend,
            activation=self.activation,
            activation_param=self.activation_param,
            **self._sync_args(),
        )
        return y.reshape(shape) if y.shape != shape else y

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # checkpoints from before inplace_abn's version 2 have no num_batches_tracked: start it at 0, as it does
        key = prefix + "num_batches_tracked"
        if (local_metadata.get("version") or 0) < 2 and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        rep = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"activation={self.activation}"
        )
        return rep + (f"[{self.activation_param}]" if self.activation == "leaky_relu" else "")


class InPlaceABN(ABN):
    """InPlace Activated Batch Normalization, a drop-in for ``inplace_abn.InPlaceABN`` (change the import only).

        y = act((x - mean) * rstd * (|weight| + eps) + bias)

    ``eps`` both regularises the variance and keeps the scale away from 0, as in inplace_abn; the gradient
    wrt ``weight`` flows through ``|.|`` as there: ``dweight = sign(weight) * sum(dL/dz * x_hat)`` (+1 at 0).
    Constructor and state_dict as :class:`ABN` (inplace_abn 1.1's). Batch statistics in training (running
    statistics updated by ``momentum`` with the unbiased variance), running statistics in eval.

    Not literally in place: x is not overwritten and y is a new tensor. What in-place ABN is for, memory,
    holds all the same: only x is saved for backward (inplace_abn saves y and inverts the activation; here
    the activation is recomputed from x and the per-channel statistics), so a BN + activation costs one
    activation-sized tensor instead of two. Unlike inplace_abn, "relu" is accepted (it needs no inversion).
    """

    _abs_weight = True


class InPlaceABNSync(InPlaceABN):
    """:class:`InPlaceABN` with batch statistics synchronised over a torch.distributed group (gloo or NCCL),
    a drop-in for ``inplace_abn.InPlaceABNSync`` (extra argument ``group``, default the whole world; without
    an initialised process group it runs unsynchronised). Gradients of weight/bias stay local (DDP averages
    them); dx uses the group-wide sums, like SyncBatchNorm."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        group: Optional[Any] = None,
        *,
        backend: str = "auto",
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, activation, activation_param, backend=backend
        )
        self.group = group

    def set_group(self, group: Optional[Any]) -> None:
        """The distributed group to synchronise with (None: the default group); not between forward and backward."""
        self.group = group

    def _sync_args(self) -> dict:
        return dict(sync=True, process_group=self.group)
