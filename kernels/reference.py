"""Plain-torch formulas that every kernel is tested against (fp32/fp64 math, no fusion, no recompute)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> per-channel (mean, biased variance), float64 for a trustworthy reference."""
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_relu(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """relu((x - mean) / sqrt(var + eps) * weight + bias) with per-channel vectors broadcast over C."""
    shape = (1, -1, 1, 1)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return torch.relu(y)


def bn_relu_conv(
    x: torch.Tensor,
    bn: torch.nn.BatchNorm2d,
    conv: torch.nn.Conv2d,
    dropout_mask=None,
    p: float = 0.0,
    activation: str = "relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """The unfused pre-activation step conv(act(bn(x))) with torch modules (updates bn's running stats)."""
    a = activation_fn(bn(x), activation, activation_param)
    if dropout_mask is not None:
        a = a * dropout_mask / (1 - p)
    return conv(a)


def activation_fn(z: torch.Tensor, activation: str = "relu", activation_param: float = 0.01) -> torch.Tensor:
    """torch's own activation (autograd included): F.relu, F.leaky_relu(negative_slope=activation_param), identity."""
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, activation_param)
    if activation == "identity":
        return z
    raise ValueError(f"unknown activation {activation!r}")


def bn_act(
    x: torch.Tensor, bn: torch.nn.BatchNorm2d, activation: str = "relu", activation_param: float = 0.01
) -> torch.Tensor:
    """act(bn(x)) as F.batch_norm (the module's mode and running statistics, updated in training) + activation."""
    return activation_fn(bn(x), activation, activation_param)


def inplace_abn(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """inplace_abn's documented formula (``inplace_abn.functions.inplace_abn``), in plain differentiable torch:

        x_hat = (x - mu) / sqrt(sigma^2 + eps)                     (batch statistics in training, else running)
        y     = act(x_hat * (|weight| + eps) + bias)
        running_mean <- (1 - momentum) * running_mean + momentum * mu
        running_var  <- (1 - momentum) * running_var + momentum * sigma^2 * n / (n - 1)      (training only)

    (The docstring there writes ``act(x_hat) * (|w| + eps) + b`` and swaps momentum and 1 - momentum; its code,
    ``_backend.forward`` and the running-stat update in ``InPlaceABN.forward``, does the above.)
    The gradient wrt weight goes through |weight| as inplace_abn's backward does: ``dweight = sum(dy * x_hat)``,
    negated where weight < 0 (so +1 at weight == 0, where autograd's abs would give 0): see :func:`_abs_ipabn`.
    ``x`` is not modified. All math in x's dtype promoted to at least fp32.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
        if running_mean is not None:
            n = xf.numel() // xf.shape[1]
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * var.detach().to(running_var.dtype) * n / (n - 1))
    else:
        mean, var = running_mean.to(dt), running_var.to(dt)
    z = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        z = z * _abs_ipabn(weight.to(dt), eps).view(shape)
    if bias is not None:
        z = z + bias.to(dt).view(shape)
    return activation_fn(z, activation, activation_param)


class _AbsPlusEpsIPABN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, eps):
        ctx.save_for_backward(w)
        return w.abs() + eps

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return torch.where(w < 0, -g, g), None


def _abs_ipabn(w: torch.Tensor, eps: float) -> torch.Tensor:
    """|w| + eps with inplace_abn's gradient: g where w >= 0, -g where w < 0."""
    return _AbsPlusEpsIPABN.apply(w, eps)
