"""Drop-in nn.Modules built on the recompute kernels."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn_relu import bn_relu
from .bn_relu_conv import bn_relu_conv


class BNReLU(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, saving only its input for backward.

    Same parameters, buffers and state_dict keys as nn.BatchNorm2d, so it replaces one in place.
    ``sync=True`` synchronises batch statistics over torch.distributed (gloo or NCCL).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, backend: str = "auto", sync: bool = False,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.backend, self.sync, self.process_group = backend, sync, process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(x, self, backend=self.backend, sync=self.sync, process_group=self.process_group)


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
    ``"torch"`` (default): torch/cuDNN convolutions. (The old keyword ``conv=`` still works, with a
    DeprecationWarning.) String padding (``"same"``) or a ``padding_mode`` other than ``"zeros"`` runs
    BN-ReLU fused and the convolution as nn.Conv2d, which then keeps the activation for backward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 dropout: float = 0.0, backend: str = "auto", sync: bool = False, process_group=None,
                 conv_impl: str = "torch", conv: str | None = None):
        super().__init__()
        if conv is not None:
            warnings.warn("BNReLUConv2d(conv=...) is deprecated (it shadowed the .conv attribute): use conv_impl=",
                          DeprecationWarning, stacklevel=2)
            conv_impl = conv
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device=device, dtype=dtype)
        self._set_options(dropout, backend, sync, process_group, conv_impl)

    def _set_options(self, dropout=0.0, backend="auto", sync=False, process_group=None, conv_impl="torch",
                     conv=None) -> None:
        if conv is not None:
            warnings.warn("conv= is deprecated: use conv_impl=", DeprecationWarning, stacklevel=3)
            conv_impl = conv
        self.dropout, self.backend, self.sync, self.process_group = dropout, backend, sync, process_group
        self.conv_impl = conv_impl

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
            a = bn_relu(x, self.bn, backend=self.backend, sync=self.sync, process_group=self.process_group)
            return self.conv(F.dropout(a, p, training=True) if p else a)
        return bn_relu_conv(x, self.bn, [self.conv], dropout=p, backend=self.backend, sync=self.sync,
                            process_group=self.process_group, conv=self.conv_impl)[0]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, conv_impl={self.conv_impl!r}, dropout={self.dropout}, sync={self.sync}"
