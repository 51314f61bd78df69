"""Batched colour ops run in torch on the batch's device (GPU when there is one), after decode/geometry.

Images are float (N, 3, H, W) RGB in [0, 1]. The parameters come from :func:`recipes.photometric_params`.
"""

from __future__ import annotations

import torch

from .recipes import MEAN, STD

# AlexNet PCA of ImageNet RGB (fb.resnet.torch): eigenvalues and eigenvectors (rows = RGB).
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """fb.resnet ColorJitter in a per-sample random order: each op blends ``x`` with a target by factor f.

    brightness: target 0; contrast: the mean of the grayscale image; saturation: the per-pixel grayscale.
    ``params``: (N, 9) from the recipe (factors in 0:3, order in 3:6).
    """
    factors, order = params[:, 0:3].to(x), params[:, 3:6].long()
    for step in range(3):
        op = order[:, step]
        f = factors.gather(1, op[:, None]).view(-1, 1, 1, 1)
        gray = _gray(x)
        contrast = gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(gray)
        target = torch.where(
            (op == 0).view(-1, 1, 1, 1),
            torch.zeros_like(gray),
            torch.where((op == 1).view(-1, 1, 1, 1), contrast, gray),
        )
        x = x * f + target * (1 - f)
    return x


def lighting(x: torch.Tensor, params: torch.Tensor, std: float) -> torch.Tensor:
    """AlexNet PCA lighting noise with the seed's quirk: the result is divided by (1 + std)."""
    if std <= 0:
        return x
    alpha = params[:, 6:9].to(x)
    vec, val = (
        torch.tensor(EIGVEC, dtype=x.dtype, device=x.device),
        torch.tensor(EIGVAL, dtype=x.dtype, device=x.device),
    )
    rgb = (alpha * val) @ vec.T  # (N, 3): sum_j eigvec[i, j] * alpha_j * eigval_j
    return (x + rgb.view(-1, 3, 1, 1)) / (1 + std)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
