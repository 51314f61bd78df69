"""Swap BatchNorm2d -> ReLU -> Conv2d chains of existing models for the recompute-in-backward kernel.

Caught: three consecutive children ``BatchNorm2d``/``SyncBatchNorm``, ``ReLU``, ``Conv2d`` (zero padding) of
an ``nn.Sequential`` (exact type: a subclass with its own ``forward`` is left alone), anywhere in the model.
The modules themselves are untouched and stay where they are: only the container's class becomes
:class:`FusedSequential`, whose forward routes each chain through :func:`kernels.bn_relu_conv`. Hence
parameters, buffers, state_dict keys and optimizer state are exactly those of the original model.

Not caught: chains written in a custom ``forward`` (``F.relu(self.bn(x))`` then ``self.conv``): call
:func:`kernels.bn_relu_conv` there, as :class:`widedeep.models.ResNet38` does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bn_relu_conv import bn_relu_conv


def _is_chain(mods: list[nn.Module], i: int) -> bool:
    if i + 2 >= len(mods):
        return False
    bn, relu, conv = mods[i : i + 3]
    return (
        isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
        and type(relu) is nn.ReLU
        and type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class FusedSequential(nn.Sequential):
    """nn.Sequential whose BN-ReLU-Conv chains (at ``fused_starts``) run as one recompute kernel."""

    fused_starts: tuple[int, ...] = ()
    fused_backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            if i in self.fused_starts:
                bn, conv = mods[i], mods[i + 2]
                x = bn_relu_conv(x, bn, [conv], backend=self.fused_backend,
                                 sync=isinstance(bn, nn.SyncBatchNorm),
                                 process_group=getattr(bn, "process_group", None))[0]
                i += 3
            else:
                x = mods[i](x)
                i += 1
        return x


def fuse_bn_relu_conv(model: nn.Module, *, backend: str = "auto") -> int:
    """Fuse every BN -> ReLU -> Conv2d chain of ``model``'s nn.Sequential containers in place.

    Returns the number of chains fused. ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    fused = 0
    for module in list(model.modules()):
        if type(module) not in (nn.Sequential, FusedSequential):
            continue
        mods = list(module)
        starts, i = [], 0
        while i < len(mods):
            if _is_chain(mods, i):
                starts.append(i)
                i += 3
            else:
                i += 1
        if starts:
            module.__class__ = FusedSequential
            module.fused_starts = tuple(starts)
            module.fused_backend = backend
            fused += len(starts)
    return fused
