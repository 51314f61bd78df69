"""Plain-torch formulas that every kernel is tested against (fp32/fp64 math, no fusion, no recompute)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> per-channel (mean, biased variance), float64 for a trustworthy reference."""
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_relu(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """relu((x - mean) / sqrt(var + eps) * weight + bias) with per-channel vectors broadcast over C."""
    shape = (1, -1, 1, 1)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return torch.relu(y)


def bn_relu_conv(x: torch.Tensor, bn: torch.nn.BatchNorm2d, conv: torch.nn.Conv2d, dropout_mask=None,
                 p: float = 0.0) -> torch.Tensor:
    """The unfused pre-activation step conv(relu(bn(x))) with torch modules (updates bn's running stats)."""
    a = F.relu(bn(x))
    if dropout_mask is not None:
        a = a * dropout_mask / (1 - p)
    return conv(a)
