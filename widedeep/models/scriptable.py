"""A TorchScript-compilable view of a :class:`~widedeep.models.ResNet38` (``torch.jit.script(model)``).

The model's own forward is Python-rich (per-unit recompute, checkpointing, the fused kernels, timm's keyword
options), which TorchScript cannot compile. ``torch.jit.script(model)`` calls ``model.__prepare_scriptable__()``,
which returns :func:`scriptable` (model): an ``nn.Sequential`` of the *same* submodules (conv1a, the units, the
pools, bn7, fc / head), so parameters are shared and state_dict keys are the model's own, computing ``forward``
with plain torch ops (BN -> ReLU / leaky ReLU -> conv; fused models compute the same values). Scripted models
support ``forward`` (and the scripted module's state_dict); for everything else script the plain model or use
``torch.jit.trace`` / ``torch.export``.

Shapes as :meth:`ResNet38.forward`: (N, 3, H, W) -> (N, classes) scores, (N, classes, H/8, W/8) for segmentation
nets, pooled features for a headless classifier and the unpooled map with ``global_pool=""``.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScriptActivation(nn.Module):
    """ReLU or leaky ReLU (slope ``activation_param``); no parameters."""

    def __init__(self, activation: str, activation_param: float):
        super().__init__()
        self.leaky = activation == "leaky_relu"
        self.slope = float(activation_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.leaky:
            return F.leaky_relu(x, self.slope)
        return F.relu(x)


class ScriptUnit(nn.Module):
    """A :class:`PreActUnit`'s forward over the unit's own BN/conv modules (absent ones as nn.Identity, which
    has no state: the keys stay the unit's)."""

    def __init__(self, unit: nn.Module):
        super().__init__()
        for name in ("bn_branch2a", "conv_branch2a", "bn_branch2b1", "conv_branch2b1", "bn_branch2b2",
                     "conv_branch2b2", "conv_branch1"):
            module = getattr(unit, name, None)
            self.add_module(name, nn.Identity() if module is None else module)
        self.act = ScriptActivation(unit.activation, unit.activation_param)
        self.three = len(unit.stages) == 3
        self.projection = bool(unit.spec.projection)
        self.dropout = float(unit.spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a) if self.projection else x
        t = self.conv_branch2a(a)
        a = self.act(self.bn_branch2b1(t))
        if self.three:
            t = self.conv_branch2b1(a)
            a = self.act(self.bn_branch2b2(t))
            if self.dropout > 0:
                a = F.dropout(a, self.dropout, self.training)
            t = self.conv_branch2b2(a)
        else:
            if self.dropout > 0:
                a = F.dropout(a, self.dropout, self.training)
            t = self.conv_branch2b1(a)
        return shortcut + t


class ScriptPool(nn.Module):
    """timm's global pools (see :func:`widedeep.models.resnet38.global_pool_2d`) and the pre-FC dropout."""

    def __init__(self, pool_type: str, drop_rate: float):
        super().__init__()
        self.pool_type, self.drop_rate = pool_type, float(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            x = x.mean(dim=(2, 3))
        elif self.pool_type == "max":
            x = x.amax(dim=(2, 3))
        elif self.pool_type == "avgmax":
            x = 0.5 * (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
        elif self.pool_type == "catavgmax":
            x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x


def scriptable(model: nn.Module, unit_type: type[nn.Module]) -> nn.Sequential:
    """The scriptable ``nn.Sequential`` view of ``model`` (shared modules, the model's keys and mode).

    ``unit_type``: the model's residual unit class (:class:`~widedeep.models.resnet38.PreActUnit`), given by
    ``ResNet38.__prepare_scriptable__`` so that this module imports nothing back from resnet38."""
    if getattr(model, "bn7", None) is None:
        raise RuntimeError("torch.jit.script: a pruned ResNet38 (prune_intermediate_layers) serves "
                           "forward_intermediates only, which TorchScript cannot compile")
    parts: "OrderedDict[str, nn.Module]" = OrderedDict(conv1a=model.conv1a)
    for name, module in model._body():
        parts[name] = ScriptUnit(module) if isinstance(module, unit_type) else module
    parts["bn7"] = model.bn7
    parts["act7"] = ScriptActivation(model.activation, model.activation_param)
    if model.segmentation:
        if model.head is not None:
            parts["head"] = model.head
    else:
        if model.global_pool or model.drop_rate:
            parts["pool"] = ScriptPool(model.global_pool, model.drop_rate)
        if model.fc is not None:
            parts["fc"] = model.fc
    seq = nn.Sequential(parts)
    # the model's mode on the new wrappers only: seq.train() would reset the shared BNs (frozen statistics)
    for m in [seq] + [m for m in seq.modules() if isinstance(m, (ScriptUnit, ScriptActivation, ScriptPool))]:
        m.training = model.training
    return seq
