"""The seed's optimisers, parameter groups and learning-rate schedules."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cli import TASK_DEFAULTS


def param_groups(model: nn.Module, *, weight_decay: float, bias_lr_mult: float) -> list[dict]:
    """Conv/FC weights and BN gamma: decay, lr x1. Biases and BN beta: no decay, lr x ``bias_lr_mult``.

    This is MXNet's default ``wd_mult`` (decay only on ``*_weight`` / ``*_gamma``) and, with
    ``bias_lr_mult=2``, the segmentation ``'alex'`` multipliers of the seed.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if name == "bias" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": bias_lr_mult},
    ]


def make_optimizer(
    model: nn.Module, task: str, base_lr: float, weight_decay: float | None = None, momentum: float = 0.9
) -> torch.optim.SGD:
    """Classification: Nesterov SGD (the seed's TorchNesterov = torch's nesterov SGD). Segmentation: SGD momentum
    0.9, biases/beta lr x2. Weight decay on weights and BN gamma only; None: the task's (``cli.TASK_DEFAULTS``)."""
    if weight_decay is None:
        weight_decay = TASK_DEFAULTS[task].weight_decay
    if task == "cls":
        groups = param_groups(model, weight_decay=weight_decay, bias_lr_mult=1.0)
        return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=True)
    groups = param_groups(model, weight_decay=weight_decay, bias_lr_mult=2.0)
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum)


def learning_rate(kind: str, base: float, step: int, total: int, power: float = 0.9) -> float:
    """``fixed``: base. ``linear`` (seed): base (1 - n / (T + 1)), floored at min(base / 100, 1e-6).
    ``poly``: base (1 - n / T) ** power."""
    if kind == "fixed":
        return base
    if kind == "linear":
        return max(base * (1 - step / (total + 1)), min(base / 100, 1e-6))
    if kind == "poly":
        return base * max(0.0, 1 - step / max(1, total)) ** power
    raise ValueError(f"--lr-type must be fixed, linear or poly, got {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's lr = ``lr`` x its ``lr_mult``; a tensor lr (CUDA graphs, ``graphs.prepare_optimizer``) is
    written in place, so a captured optimizer step reads the new value."""
    for g in optimizer.param_groups:
        v = lr * g.get("lr_mult", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(v)
        else:
            g["lr"] = v
