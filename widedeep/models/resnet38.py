"""ResNet-38 Models A, A1, A2 (Wu, Shen, van den Hengel, "Wider or Deeper"), as in itijyou/ademxapp.

One table of levels (:data:`LEVELS`) defines the units; the variant decides where the five 2x
downsamplings sit (max-pool after a level, ``'p'``, or stride 2 in the next level's first unit, ``'c'``),
and the output stride turns the last one or two of them into dilation exactly as ademxapp's
``rna_feat`` does: a converted stride keeps the old dilation on the unit's ``branch2a`` and doubles it from
``branch2b1`` on; a converted pool becomes a 3x3 stride-1 pool and doubles the dilation of all later convs.

Module names follow the psa ``resnet38d.Net`` port (``conv1a``, ``b2``, ``b2_1``, ..., ``b7``, ``bn7``;
``bn_branch2a``, ``conv_branch2a``, ``conv_branch1`` ...) so its checkpoints load unchanged; the ademxapp
``.params`` names map one-to-one (see :mod:`widedeep.weights.mapping`).

The same class also builds the Mapillary InPlace-ABN / NVIDIA lineage (``WiderResNet`` = Model A,
``WiderResNetA2`` = Model A2) exactly: ``activation="leaky_relu"`` (slope ``activation_param``, 0.01 there),
``bn_eps=1e-5`` and, for their dilated A2, ``dilate_first_conv=True`` (see :mod:`widedeep.weights.lineages`).

Tensors: input (N, 3, H, W) float, RGB normalised with ImageNet mean/std, NCHW or channels_last.
"""

# no `from __future__ import annotations`: torch.fx copies forward()'s annotations into generated code, and a
# string "torch.Tensor" there becomes an unknown type `_torch_Tensor_` when that code is scripted (timm's fx test)

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels  # the fused path calls kernels.bn_relu / kernels.bn_relu_conv (attribute lookups: patchable)
from widedeep.arch import LEVELS, NUM_FEATURES, unit_module_name  # noqa: F401 (re-exported: the model's table)

from .recompute import normalise_plan, recompute_unit
from .scriptable import scriptable

BN_EPS = 1.001e-5  # ademxapp's value since 2017-01 ("for compatibility with cudnn v5"); the weights expect it
BN_MOMENTUM = 0.1  # MXNet momentum 0.9 in PyTorch's convention

MODEL_ACTIVATIONS = ("relu", "leaky_relu")  # the model's (kernels.ACTIVATIONS: every kernel activation); leaky_relu: InPlace-ABN's default (slope 0.01), Mapillary's checkpoints
STEM_CHANNELS = 64

# timm's global_pool names -> feature multiplier of the pooled vector ("" = no pooling, headless only)
GLOBAL_POOLS: dict[str, int] = {"avg": 1, "max": 1, "avgmax": 1, "catavgmax": 2, "": 1}


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None -> all, int n -> the last n, a sequence -> those (negative from
    the end). Returns (absolute indices, largest index)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = [num_features + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < num_features]
        if bad or not take:
            raise ValueError(f"feature indices {list(indices)} out of range (0 to {num_features - 1})")
    return take, max(take)


def global_pool_2d(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) or (N, 2C) for timm's pool types; ``""`` returns x unchanged."""
    if pool_type == "avg":
        return x.mean(dim=(2, 3))
    if pool_type == "max":
        return x.amax(dim=(2, 3))
    if pool_type == "avgmax":
        return 0.5 * (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
    if pool_type == "catavgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    if pool_type == "":
        return x
    raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {pool_type!r}")

# Downsampling after levels 1..5: 'p' = 3x3/2 max-pool, 'c' = stride 2 in the next level's first unit.
DOWNSAMPLING: dict[str, str] = {"a": "ppppp", "a1": "ccccc", "a2": "ppccc"}

PoolStyle = Literal["mxnet", "caffe", "ceil"]


@dataclass(frozen=True)
class UnitSpec:
    """Shape of one pre-activation residual unit.

    ``dilations[i]`` is the dilation of branch-2 conv ``i`` (only meaningful for 3x3 convs).
    """

    name: str  # ademxapp unit name: '2a', '4b3', '6a'
    module: str  # our module name: 'b2', 'b4_3', 'b6'
    in_channels: int
    widths: tuple[int, ...]
    stride: int
    dilations: tuple[int, ...]
    projection: bool
    dropout: float  # before the last conv of branch 2 (segmentation trunks only)

    @property
    def kernels(self) -> tuple[int, ...]:
        return (3, 3) if len(self.widths) == 2 else (1, 3, 1)


@dataclass(frozen=True)
class PoolSpec:
    after_level: int
    stride: int


def unit_ademxapp_name(level: int, index: int) -> str:
    return f"{level}a" if index == 0 else f"{level}b{index}"


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8); width 1 is the published net."""
    return channels if width == 1 else max(8, int(round(channels * width / 8)) * 8)


def build_plan(
    variant: str, output_stride: int, dropout: Sequence[float] | None = None, width: float = 1.0,
    dilate_first_conv: bool = False,
) -> list[UnitSpec | PoolSpec]:
    """The ordered list of units and pools of a trunk (conv1a excluded).

    ``width`` scales every channel count (tiny nets for demos and tests; the released weights need 1).
    ``dilate_first_conv``: a stride turned into dilation also dilates the first conv of that level's first unit
    (Mapillary's/NVIDIA's ``WiderResNetA2(dilation=True)``: every 3x3 of mod5 at dilation 2); ademxapp keeps it
    at the old dilation. Only a 3x3 first conv is affected (level 5's); level 6's is a 1x1.
    """
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if variant not in DOWNSAMPLING:
        raise ValueError(f"unknown ResNet-38 variant {variant!r}: expected one of {sorted(DOWNSAMPLING)}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    converted = {32: 0, 16: 1, 8: 2}[output_stride]
    drop = {6: dropout[0], 7: dropout[1]} if dropout else {}
    plan: list[UnitSpec | PoolSpec] = []
    dilation, channels = 1, scaled(STEM_CHANNELS, width)
    for level, (count, widths) in LEVELS.items():
        widths = tuple(scaled(c, width) for c in widths)
        stride, first_dilation = 1, dilation
        t = level - 2  # index of the transition that enters this level (after level 1..5)
        if t < 5:
            dilate = t >= 5 - converted
            if DOWNSAMPLING[variant][t] == "p":
                plan.append(PoolSpec(after_level=level - 1, stride=1 if dilate else 2))
                if dilate:
                    dilation *= 2
                    first_dilation = dilation
            elif dilate:
                dilation *= 2  # ademxapp: branch2a keeps first_dilation, the rest doubles
                if dilate_first_conv and len(widths) == 2:  # a b131 unit's first conv is a 1x1: nothing to dilate
                    first_dilation = dilation
            else:
                stride = 2
        for i in range(count):
            d_first = first_dilation if i == 0 else dilation
            dil = (d_first,) + (dilation,) * (len(widths) - 1)
            plan.append(
                UnitSpec(
                    name=unit_ademxapp_name(level, i),
                    module=unit_module_name(level, i),
                    in_channels=channels,
                    widths=widths,
                    stride=stride if i == 0 else 1,
                    dilations=dil,
                    projection=i == 0,
                    dropout=drop.get(level, 0.0),
                )
            )
            channels = widths[-1]
    return plan


def _bn(channels: int, eps: float = BN_EPS) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=BN_MOMENTUM)


def check_activation(activation: str, activation_param: float) -> None:
    if activation not in MODEL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MODEL_ACTIVATIONS}, got {activation!r}")
    if not isinstance(activation_param, (int, float)) or not math.isfinite(activation_param):
        raise ValueError(f"activation_param (the leaky ReLU slope) must be a finite number, got {activation_param!r}")


class _Activation:
    """The BN activation of a module: ``activation`` ("relu" | "leaky_relu") and ``activation_param`` (slope)."""

    activation: str = "relu"
    activation_param: float = 0.01

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        return F.leaky_relu(x, self.activation_param)

    def _act_kwargs(self) -> dict[str, Any]:
        # passed to the kernels only when needed, so ReLU models run on kernels without the keywords too
        if self.activation == "relu":
            return {}
        return dict(activation=self.activation, activation_param=float(self.activation_param))


class PreActUnit(_Activation, nn.Module):
    """Pre-activation residual unit: ``out = shortcut + branch2(x)``.

    branch 2 is ``[BN -> ReLU -> (Dropout) -> conv]`` repeated; the stride sits on the first conv. The
    projection shortcut (first unit of a level) is a 1x1 conv on the *BN-ReLU output of branch2a's BN*,
    shared with branch2a; identity units add the raw input. ReLU is leaky ReLU (slope ``activation_param``)
    when ``activation="leaky_relu"``.
    """

    def __init__(self, spec: UnitSpec, *, bn_eps: float = BN_EPS, activation: str = "relu",
                 activation_param: float = 0.01):
        super().__init__()
        check_activation(activation, activation_param)
        self.spec = spec
        self.activation, self.activation_param = activation, activation_param
        cin = spec.in_channels
        stages = ["branch2a", "branch2b1", "branch2b2"][: len(spec.widths)]
        for i, (stage, width, k, d) in enumerate(zip(stages, spec.widths, spec.kernels, spec.dilations)):
            d = d if k == 3 else 1
            setattr(self, f"bn_{stage}", _bn(cin, bn_eps))
            conv = nn.Conv2d(cin, width, k, stride=spec.stride if i == 0 else 1,
                             padding=d * (k // 2), dilation=d, bias=False)
            setattr(self, f"conv_{stage}", conv)
            cin = width
        self.stages = stages
        if spec.projection:
            self.conv_branch1 = nn.Conv2d(spec.in_channels, spec.widths[-1], 1, stride=spec.stride, bias=False)
        self.backend: str | None = None  # None: plain torch ops; else a kernels backend name
        self.recompute = False  # training: keep only the unit's input and re-run the unit in backward
        self.sync_bn = False  # fused path only: batch statistics all-gathered over torch.distributed
        self.conv_impl = "torch"  # fused path only: kernels.bn_relu_conv's conv= ("torch", "triton", "auto")

    def _stage_convs(self, i: int) -> list[nn.Conv2d]:
        convs = [getattr(self, f"conv_{self.stages[i]}")]
        if i == 0 and self.spec.projection:
            convs.append(self.conv_branch1)
        return convs

    def forward(self, x: torch.Tensor, get_x_bn_relu: bool = False):
        """(N, C, H, W) -> the unit's output; with ``get_x_bn_relu`` (psa's flag) also act(bn_branch2a(x)).

        That activation is then materialised once (BN run once, its statistics updated once) and the
        first convolutions read it, also on the fused path, which otherwise never stores it.
        """
        shortcut = x
        t = x
        last = len(self.stages) - 1
        first_act = None
        for i, stage in enumerate(self.stages):
            bn = getattr(self, f"bn_{stage}")
            p = self.spec.dropout if (i == last and self.training) else 0.0
            if self.backend is not None and not (i == 0 and get_x_bn_relu):
                outs = kernels.bn_relu_conv(t, bn, self._stage_convs(i), dropout=p, backend=self.backend,
                                            sync=self.sync_bn,
                                            conv="torch" if (p or self.sync_bn) else self.conv_impl,  # no igemm here
                                            **self._act_kwargs())
            else:
                if self.backend is not None:
                    a = kernels.bn_relu(t, bn, backend=self.backend, sync=self.sync_bn, **self._act_kwargs())
                else:
                    a = self._act(bn(t))
                if i == 0:
                    first_act = a
                if p:
                    a = F.dropout(a, p, training=True)
                outs = [conv(a) for conv in self._stage_convs(i)]
            t = outs[0]
            if i == 0 and self.spec.projection:
                shortcut = outs[1]
        return (shortcut + t, first_act) if get_x_bn_relu else shortcut + t


class TwoConvHead(nn.Module):
    """ademxapp's "2 conv." segmentation head: 3x3 d12 conv (+bias) -> ReLU -> 3x3 d12 conv (+bias).

    (N, 4096, h, w) -> (N, num_classes, h, w) raw scores; no upsampling.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 512, dilation: int = 12):
        super().__init__()
        self.conv6a = nn.Conv2d(in_channels, hidden, 3, padding=dilation, dilation=dilation, bias=True)
        self.score = nn.Conv2d(hidden, num_classes, 3, padding=dilation, dilation=dilation, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(F.relu(self.conv6a(x)))

    def forward_from_bn(self, x: torch.Tensor, bn: nn.BatchNorm2d, backend: str, sync: bool = False,
                        act_kwargs: dict[str, Any] | None = None, conv_impl: str = "torch") -> torch.Tensor:
        """``forward(act(bn(x)))`` with act(bn(x)) fused into conv6a: only x (bn7's input) is kept for
        backward, not the 4096-channel activation (the largest single tensor of the stride-8 nets).
        ``act_kwargs``: the trunk's activation keywords for the kernels (none: ReLU); the ReLU between the
        head's two convs is ademxapp's and stays a ReLU."""
        return self.score(F.relu(kernels.bn_relu_conv(x, bn, [self.conv6a], backend=backend, sync=sync,
                                                      conv="torch" if sync else conv_impl, **(act_kwargs or {}))[0]))


class ResNet38(_Activation, nn.Module):
    """ResNet-38 trunk with a classification or "2 conv." segmentation head.

    Args:
        variant: ``"a"`` (max-pools), ``"a1"`` (strided convs) or ``"a2"`` (pools at levels 1-2, strides after).
        num_classes: classifier outputs; 0 gives a headless trunk (``forward`` returns features).
        output_stride: 32, 16 or 8 (dilation replaces the last strides).
        segmentation: ``True`` for the dilated FCN with the "2 conv." head; ``forward`` then returns
            (N, C, H', W') scores at 1/output_stride resolution.
        pool_style: Model A/A2 max-pools: ``"mxnet"`` 3x3/2 pad 1 (new training), ``"caffe"`` pad 0 floor
            (the seed's ``--pool-top-infer-style caffe``, needed by the released Model A weights) or
            ``"ceil"`` pad 0 ceil-mode (the sizes of the original training graph).
        dropout: rates before the last 1x1 of units 6a / 7a (ademxapp: (0.3, 0.5) for segmentation only).
        fused: ``False``, ``True``/``"auto"`` or a :mod:`kernels` backend name: run every BN-ReLU-conv
            through the recompute-in-backward kernels. Parameters and state_dict keys do not change.
        conv_impl: the fused path's convolutions (:meth:`set_conv_impl`): ``"torch"`` (cuDNN), ``"triton"``
            (implicit GEMMs with the BN-ReLU prologue) or ``"auto"`` (per layer from :mod:`kernels.conv_choice`).
        width: channel multiplier (1 = the published nets; e.g. 1/16 for CPU demos and tests).
        drop_rate: dropout before the classifier FC (timm's ``drop_rate``; classification only).
        global_pool: timm's pool type before the FC: ``"avg"`` (ademxapp), ``"max"``, ``"avgmax"``,
            ``"catavgmax"`` (FC input 2 x 4096) or ``""`` (no pooling; only without a classifier).
        activation: the trunk's BN activation (every unit's and bn7's), ``"relu"`` (ademxapp, psa) or
            ``"leaky_relu"`` (Mapillary's InPlace-ABN checkpoints; slope ``activation_param``, 0.01 there), on the
            plain and the fused path. The segmentation head's inner ReLU stays a ReLU.
        activation_param: the leaky ReLU's negative slope (ignored for ``"relu"``).
        bn_eps: every BatchNorm's eps: 1.001e-5 (ademxapp) or 1e-5 (PyTorch's, InPlace-ABN's, psa's default).
        dilate_first_conv: at output stride 8/16, also dilate the first 3x3 of the first dilated level (unit 5a's
            ``conv_branch2a``), as Mapillary's/NVIDIA's ``WiderResNetA2(dilation=True)``; ademxapp keeps it at 1.
    """

    recompute_plan: dict[str, str] | None = None  # set by set_recompute

    def __init__(
        self,
        variant: str = "a1",
        num_classes: int = 1000,
        output_stride: int = 32,
        *,
        segmentation: bool = False,
        pool_style: PoolStyle = "mxnet",
        dropout: Sequence[float] | None = None,
        in_chans: int = 3,
        fused: bool | str = False,
        conv_impl: str = "torch",
        width: float = 1.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        activation: str = "relu",
        activation_param: float = 0.01,
        bn_eps: float = BN_EPS,
        dilate_first_conv: bool = False,
    ):
        super().__init__()
        check_activation(activation, activation_param)
        if not bn_eps > 0:
            raise ValueError(f"bn_eps must be positive, got {bn_eps!r}")
        self.activation, self.activation_param = activation, activation_param
        self.bn_eps, self.dilate_first_conv = bn_eps, dilate_first_conv
        if pool_style not in ("mxnet", "caffe", "ceil"):
            raise ValueError(f"pool_style must be 'mxnet', 'caffe' or 'ceil', got {pool_style!r}")
        self.variant, self.output_stride, self.segmentation = variant, output_stride, segmentation
        self.pool_style = pool_style
        self.num_classes = num_classes
        self.width = width
        self.in_chans = in_chans
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}")
        if global_pool == "" and num_classes and not segmentation:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier is a Linear layer")
        self.drop_rate, self.global_pool = drop_rate, global_pool
        self.num_features = features = scaled(NUM_FEATURES, width)
        self.plan = build_plan(variant, output_stride, dropout, width, dilate_first_conv)
        stem = scaled(STEM_CHANNELS, width)
        self.conv1a = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False)
        reduction, self.feature_info = 1, [dict(num_chs=stem, reduction=1, module="conv1a")]
        for item in self.plan:
            if isinstance(item, PoolSpec):
                pad, ceil = (0, pool_style == "ceil") if pool_style != "mxnet" else (1, False)
                if item.stride == 1:
                    pad, ceil = 1, False
                self.add_module(f"pool{item.after_level}", nn.MaxPool2d(3, item.stride, pad, ceil_mode=ceil))
                reduction *= item.stride
            else:
                self.add_module(item.module, PreActUnit(item, bn_eps=bn_eps, activation=activation,
                                                        activation_param=activation_param))
                reduction *= item.stride
                self._record_feature(item, reduction)
        self.bn7 = _bn(features, bn_eps)
        self.feature_info[-1] = dict(num_chs=features, reduction=reduction, module="bn7")
        self._fused_backend: str | None = None
        self.grad_checkpointing = False
        self.sync_bn = False
        self.frozen_bn_stats = False
        self.fc: nn.Linear | None = None
        self.head: TwoConvHead | None = None
        if num_classes:
            if segmentation:
                self.head = TwoConvHead(features, num_classes, hidden=scaled(512, width))
            else:
                self.fc = nn.Linear(features * GLOBAL_POOLS[global_pool], num_classes)
        self.reset_parameters()
        self.set_fused(fused)
        self.set_conv_impl(conv_impl)

    def _record_feature(self, spec: UnitSpec, reduction: int) -> None:
        """feature_info: the output of each level's last unit (levels 2-5) and relu(bn7) at level 7."""
        level = int(spec.name[0])
        if spec.module == unit_module_name(level, LEVELS[level][0] - 1) and level in (2, 3, 4, 5, 7):
            self.feature_info.append(dict(num_chs=spec.widths[-1], reduction=reduction, module=spec.module))

    # ------------------------------------------------------------------ construction helpers
    def reset_parameters(self) -> None:
        """ademxapp init: He-normal convs (fan-in), BN 1/0, Torch-style uniform FC, zero head biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        if self.fc is not None:
            bound = 1.0 / self.fc.in_features**0.5
            nn.init.uniform_(self.fc.weight, -bound, bound)
            nn.init.uniform_(self.fc.bias, -bound, bound)

    def units(self) -> list[PreActUnit]:
        return [m for m in self.children() if isinstance(m, PreActUnit)]

    def set_fused(self, fused: bool | str) -> "ResNet38":
        """Switch every BN-ReLU-conv between plain torch ops and the fused recompute kernels."""
        backend = None if fused is False or fused is None else ("auto" if fused is True else str(fused))
        self._fused_backend = backend
        for unit in self.units():
            unit.backend = backend
        return self

    def set_conv_impl(self, conv_impl: str) -> "ResNet38":
        """The fused path's convolutions, per BN-ReLU-conv call (``kernels.bn_relu_conv(conv=...)``): ``"torch"``,
        ``"triton"`` (needs the triton backend) or ``"auto"`` (each layer as :mod:`kernels.conv_choice`'s table
        says for its shape and device; cuDNN off CUDA). Stages with dropout or synchronised BN keep cuDNN."""
        if conv_impl not in ("torch", "triton", "auto"):
            raise ValueError(f"conv_impl must be 'torch', 'triton' or 'auto', got {conv_impl!r}")
        self.conv_impl = conv_impl
        for unit in self.units():
            unit.conv_impl = conv_impl
        return self

    def set_recompute(self, plan: str | Sequence[str] | dict | None) -> "ResNet38":
        """Activation-memory mode per unit in training: ``"stored"``, ``"fused"`` or ``"unit"`` (see
        :mod:`widedeep.models.recompute`), given for all units, as a list in forward order, or as
        {unit name: mode} (others "stored"). ``None`` undoes it (back to :meth:`set_fused`'s choice).
        Parameters and state_dict keys never change."""
        units = self.units()
        names = [n for n, m in self.named_children() if isinstance(m, PreActUnit)]
        if plan is None:
            self.set_fused(self._fused_backend or False)
            for u in units:
                u.recompute = False
            self.recompute_plan = None
            return self
        modes = normalise_plan(units, plan, names)
        backend = self._fused_backend or "auto"
        for u, mode in zip(units, modes):
            u.backend = None if mode == "stored" else backend
            u.recompute = mode == "unit"
        self.recompute_plan = dict(zip(names, modes))
        return self

    def set_activation(self, activation: str, activation_param: float | None = None) -> "ResNet38":
        """Change the trunk's BN activation in place (e.g. a Mapillary leaky-ReLU checkpoint fine-tuned with ReLU,
        as NVIDIA does). Parameters and state_dict keys do not change."""
        param = self.activation_param if activation_param is None else activation_param
        check_activation(activation, param)
        self.activation, self.activation_param = activation, param
        for unit in self.units():
            unit.activation, unit.activation_param = activation, param
        return self

    def set_sync_bn(self, enable: bool = True) -> "ResNet38":
        """Synchronise BN batch statistics across ranks (fused kernels; any torch.distributed backend, gloo too).
        For the unfused model on GPUs use ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` instead."""
        if enable and self._fused_backend is None:
            raise ValueError("set_sync_bn needs the fused kernels (set_fused(True)); for plain BN use "
                             "torch.nn.SyncBatchNorm.convert_sync_batchnorm (GPU only)")
        self.sync_bn = enable
        for unit in self.units():
            unit.sync_bn = enable
        return self

    def freeze_bn_stats(self, enable: bool = True) -> "ResNet38":
        """Normalise with the running statistics even in training (ademxapp's ``use_global_stats`` for
        segmentation fine-tuning, psa's frozen BN); gamma/beta stay trainable. Survives ``model.train()``."""
        self.frozen_bn_stats = enable
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ResNet38":
        super().train(mode)
        if self.frozen_bn_stats:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each unit in backward with torch.utils.checkpoint (timm's switch; a baseline for fusion)."""
        self.grad_checkpointing = enable

    @property
    def head_hidden_size(self) -> int:
        """timm's pre-logits width: what ``forward`` returns without a classifier (``forward_head(x,
        pre_logits=True)``): num_features, twice that with ``global_pool="catavgmax"``."""
        return self.num_features * (1 if self.segmentation else GLOBAL_POOLS[self.global_pool])

    def state_shapes(self, width: float | None = None) -> dict[str, tuple[int, ...]]:
        """``{state_dict key: shape}`` of this architecture at ``width`` (default: the model's own), built on the
        meta device (no memory). :func:`widedeep.weights.load_weights` asks it whether a file that does not fit
        is the same net saved at another width (so the weights package never imports the model)."""
        if width is None or width == self.width:
            ref = self
        else:
            with torch.device("meta"):
                ref = ResNet38(self.variant, self.num_classes, self.output_stride, segmentation=self.segmentation,
                               width=width, in_chans=self.conv1a.in_channels)
        return {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(model)``: the scriptable view of :mod:`widedeep.models.scriptable` (same modules and
        keys, plain torch ops)."""
        return scriptable(self, PreActUnit)

    def get_classifier(self) -> nn.Module | None:
        return self.head.score if self.head is not None else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last layer (FC or the head's score conv) with a freshly initialised one (timm's
        signature; ``global_pool`` changes the classification pooling, ignored by segmentation nets)."""
        if global_pool is not None and not self.segmentation:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}")
            if global_pool == "" and num_classes:
                raise ValueError("global_pool='' (no pooling) needs num_classes=0")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if self.segmentation:
            if self.head is None or num_classes == 0:
                self.head = (
                    TwoConvHead(self.num_features, num_classes, hidden=scaled(512, self.width)) if num_classes else None
                )
            else:
                self.head.score = nn.Conv2d(self.head.score.in_channels, num_classes, 3, padding=12, dilation=12)
            modules = [self.head] if self.head is not None else []
        else:
            features = self.num_features * GLOBAL_POOLS[self.global_pool]
            self.fc = nn.Linear(features, num_classes) if num_classes else None
            modules = [self.fc] if self.fc is not None else []
        for m in (m for mod in modules for m in mod.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.uniform_(m.bias, -bound, bound)

    # ------------------------------------------------------------------ forward
    def _bn_relu7(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_backend is not None:
            return kernels.bn_relu(x, self.bn7, backend=self._fused_backend, sync=self.sync_bn, **self._act_kwargs())
        return self._act(self.bn7(x))

    def _body(self):
        """(name, module) of the pools and units between conv1a and bn7, in forward order."""
        return ((n, m) for n, m in self.named_children() if n not in ("conv1a", "bn7", "fc", "head"))

    def forward_trunk(self, x: torch.Tensor, *, collect: bool = False, bn7: bool = True,
                      stop_after: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features, intermediates): act(bn7(trunk(x))), or with ``bn7=False`` the raw output of the last unit
        (b7: Mapillary's/NVIDIA's mod7 before ``bn_out``; then ``intermediates`` lacks that last map);
        ``stop_after``: return right after that module (a ``feature_info`` module name)."""
        feats: list[torch.Tensor] = []
        names = {info["module"] for info in self.feature_info}
        x = self.conv1a(x)
        if collect:
            feats.append(x)
        if stop_after == "conv1a":
            return x, feats
        for name, module in self._body():
            if self.training and isinstance(module, PreActUnit) and module.recompute:
                x = recompute_unit(module, x)
            elif self.grad_checkpointing and self.training and isinstance(module, PreActUnit):
                x = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
            if collect and name in names:
                feats.append(x)
            if name == stop_after:
                return x, feats
        if not bn7:
            return x, feats
        x = self._bn_relu7(x)
        if collect:
            feats.append(x)
        return x, feats

    def forward_features(self, x: torch.Tensor, *, bn7: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> act(bn7(trunk)) of shape (N, 4096, H/os, W/os), x's dtype.

        ``bn7=False``: the raw output of the last unit (b7) before bn7 and its activation, same shape: what
        NVIDIA's DeepWV3Plus feeds its ASPP (their trunk drops ``bn_out``)."""
        return self.forward_trunk(x, bn7=bn7)[0]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        *,
        bn7: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the :attr:`feature_info` maps picked by ``indices`` (None: all six,
        strides 1, 2, 4, 8, 16, 32 at output stride 32; int n: the last n; a sequence, negative from the end).

        Returns ``(final, intermediates)``, where ``final`` is ``forward_features(x)`` (or, with ``stop_early``,
        the map at the last index taken), or only the list with ``intermediates_only`` (which stops early).
        ``norm`` has no effect: the last feature already is act(bn7(x)), the trunk's only final norm.
        ``bn7=False`` (ours, not timm's): the last feature (and ``final``) is the raw last-unit output before
        bn7, (N, 4096, H/os, W/os), as NVIDIA's trunk returns it.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = take_indices(len(self.feature_info), indices)
        last = len(self.feature_info) - 1
        has_bn7 = getattr(self, "bn7", None) is not None
        stop = None
        if (stop_early or intermediates_only or not has_bn7) and max_index < last:
            stop = self.feature_info[max_index]["module"]
        elif not has_bn7:
            raise ValueError("this model was pruned (prune_intermediate_layers): bn7 is gone, take indices < "
                             f"{last}")
        x, feats = self.forward_trunk(x, collect=True, stop_after=stop, bn7=bn7)
        if not bn7 and stop is None:
            feats.append(x)  # the raw b7 output stands in for act(bn7)
        intermediates = [feats[i] for i in take]
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's ``prune_intermediate_layers``: drop the units (and bn7) after the last feature that ``indices``
        takes, and the classifier (``prune_head``). Returns the absolute indices kept. ``prune_norm`` has no
        effect (bn7-ReLU is part of the last feature). A pruned model serves ``forward_intermediates`` only."""
        take, max_index = take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0, "" if not self.segmentation else None)
        if max_index < len(self.feature_info) - 1:
            keep_until = self.feature_info[max_index]["module"]
            names = [n for n, _ in self._body()]
            cut = names.index(keep_until) + 1 if keep_until in names else 0
            for name in names[cut:]:
                delattr(self, name)
            self.bn7 = None
            self.num_features = self.feature_info[max_index]["num_chs"]
            if self.num_classes:
                self.reset_classifier(0, "" if not self.segmentation else None)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.segmentation:
            return x if (pre_logits or self.head is None) else self.head(x)
        x = global_pool_2d(x, self.global_pool)
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, training=self.training)
        return x if (pre_logits or self.fc is None) else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classification: (N, num_classes) scores. Segmentation: (N, num_classes, H', W') scores."""
        if self.segmentation and self.head is not None and self._fused_backend is not None:
            # bn7-ReLU fused into the head's first conv: relu(bn7(x)) is never kept for backward
            x = self.forward_trunk(x, bn7=False)[0]
            return self.head.forward_from_bn(x, self.bn7, self._fused_backend, self.sync_bn, self._act_kwargs(),
                                             self.conv_impl)
        return self.forward_head(self.forward_features(x))

    def forward_as_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """psa/SEAM ``resnet38d.Net.forward_as_dict``: the BN-ReLU'd inputs of b4 ('conv3', SEAM), b5 ('conv4')
        and b6 ('conv5'), and relu(bn7) ('conv6') (leaky with ``activation="leaky_relu"``). Each BN runs once, on
        the fused path too."""
        out: dict[str, Any] = {}
        keys = {"b4": "conv3", "b5": "conv4", "b6": "conv5"}
        x = self.conv1a(x)
        for name, module in self._body():
            if name in keys:
                x, out[keys[name]] = module(x, get_x_bn_relu=True)
            else:
                x = module(x)
        out["conv6"] = self._bn_relu7(x)
        return out
