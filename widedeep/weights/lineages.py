"""Checkpoint containers and the Mapillary InPlace-ABN / NVIDIA key layouts -> our state_dict keys.

The third ResNet-38 lineage (after ademxapp's MXNet files and psa/SEAM's ``resnet38d``): Mapillary's
``WiderResNet`` (= our Model A with pad-1 pools) and ``WiderResNetA2`` (= our A2), and NVIDIA's copy of them.
Layouts are recognised from the keys, never from the file name:

============================  =====================================================================================
``"mapillary"``               InPlace-ABN >= 1.0: ``mod2.block1.bn1.weight`` (ABN holds weight, bias, running_mean,
                              running_var itself); the ImageNet file is ``{"state_dict": {"module.<key>": ...},
                              "optimizer": ...}``
``"mapillary-v0"``            InPlace-ABN v0.0.1: ABN was ``Sequential(bn=BatchNorm2d, act)``: ``bn1.bn.weight``
``"mapillary-vistas"``        the Vistas segmentation files: ``{"state_dict": {"body": ..., "head": ..., "cls": ...}}``,
                              body keys without prefix (head and cls have no counterpart here and are reported)
``"nvidia"``                  NVIDIA/semantic-segmentation's ``wider_resnet38.pth.tar``: ``module.`` keys and BN as
                              ``Sequential(BatchNorm2d, ReLU)``: ``bn1.0.weight``, ``bn_out.0.weight``
============================  =====================================================================================

Names (unit ``mod{L}.block{k}`` = our ``b{L}`` for k = 1, ``b{L}_{k-1}`` after): ``mod1.conv1`` -> ``conv1a``;
``bn1`` -> ``bn_branch2a``; ``convs.conv1/bn2/conv2/bn3/conv3`` -> ``conv_branch2a/bn_branch2b1/conv_branch2b1/
bn_branch2b2/conv_branch2b2``; ``proj_conv`` -> ``conv_branch1``; ``bn_out`` -> ``bn7``; ``classifier.fc`` -> ``fc``.

BN convention: InPlaceABN normalises with ``|gamma| + eps`` (eps 1e-5) in place of gamma, so a file saved from
InPlaceABN modules needs ``gamma -> |gamma| + eps`` to run in a plain BatchNorm (``weights_convention=
"inplace_abn"``); a file of plain BatchNorms (NVIDIA's re-keyed file, ABN v0) must not be converted. Files do not
record which they are.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from widedeep.arch import LEVELS, unit_module_name

from .errors import WeightsFormatError, WeightsMismatchError
from .mapping import UnknownNameError

log = logging.getLogger("widedeep.weights")

INPLACE_ABN_EPS = 1e-5  # InPlaceABN's default eps, used in |gamma| + eps and in sqrt(var + eps)
CONVENTIONS = ("plain", "inplace_abn")
MAPILLARY_LAYOUTS = ("mapillary", "mapillary-v0", "mapillary-vistas", "nvidia")
# layouts whose gammas are plain BatchNorm gammas whatever the option says
PLAIN_LAYOUTS = ("ademxapp", "widedeep")

_UNIT_LAYERS = {
    "bn1": "bn_branch2a",
    "convs.conv1": "conv_branch2a",
    "convs.bn2": "bn_branch2b1",
    "convs.conv2": "conv_branch2b1",
    "convs.bn3": "bn_branch2b2",
    "convs.conv3": "conv_branch2b2",
    "proj_conv": "conv_branch1",
}
_BN_PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = re.compile(r"^mod(\d+)\.block(\d+)\.(.+)$")
_UNIT_NORM = re.compile(r"^(bn1|convs\.bn[23])(?:\.(bn|0))?\." + _BN_PARAM + "$")
_UNIT_CONV = re.compile(r"^(convs\.conv[123]|proj_conv)\.weight$")
_BN_OUT = re.compile(r"^bn_out(?:\.(bn|0))?\." + _BN_PARAM + "$")
_FC = re.compile(r"^classifier\.fc\.(weight|bias)$")
# keys of the WiderResNet trunk: one of these that does not map is an unknown layout, never skipped
_TRUNK = re.compile(r"^(mod\d+|bn_out|classifier)\.")
_OUR_BN_WEIGHT = re.compile(r"^(?:b\d(?:_\d+)?\.bn_branch\w+|bn7)\.weight$")
_OPTIMISER_KEYS = ("optimizer", "optimiser", "optim", "optimizer_state", "optimizer_state_dict")


def mapillary_to_key(key: str) -> tuple[str, str | None]:
    """``mod4.block3.convs.bn2.0.weight`` -> (``b4_2.bn_branch2b1.weight``, ``"0"``): our key and the BN infix
    (``"0"`` NVIDIA, ``"bn"`` ABN v0, None). Raises :class:`UnknownNameError` for other keys."""
    if key == "mod1.conv1.weight":
        return "conv1a.weight", None
    if m := _FC.match(key):
        return f"fc.{m[1]}", None
    if m := _BN_OUT.match(key):
        return f"bn7.{m[2]}", m[1]
    m = _BLOCK.match(key)
    if not m or not 2 <= int(m[1]) <= 7 or int(m[2]) < 1:
        raise UnknownNameError(key)
    unit = unit_module_name(int(m[1]), int(m[2]) - 1)
    rest = m[3]
    if n := _UNIT_NORM.match(rest):
        return f"{unit}.{_UNIT_LAYERS[n[1]]}.{n[3]}", n[2]
    if n := _UNIT_CONV.match(rest):
        return f"{unit}.{_UNIT_LAYERS[n[1]]}.weight", None
    raise UnknownNameError(key)


def is_mapillary(keys) -> bool:
    return any(k == "mod1.conv1.weight" or _BLOCK.match(k) or _BN_OUT.match(k) for k in keys)


def _describe(key: str, value: Any) -> str:
    """What a checkpoint entry without counterpart is, for the report."""
    if key.rsplit(".", 1)[-1] in _OPTIMISER_KEYS:
        return "optimiser state (not weights)"
    if isinstance(value, Mapping):
        n = sum(1 for v in value.values() if torch.is_tensor(v))
        return f"{n} tensors with no counterpart in ResNet38" if n else f"a {type(value).__name__} (not weights)"
    if torch.is_tensor(value):
        return f"tensor {tuple(value.shape)} with no counterpart in ResNet38"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''} (not weights)"


def unwrap_checkpoint(obj: Any, path: str) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """A torch checkpoint -> (flat state_dict, skipped entries {name: what}, container).

    Descends ``state_dict`` / ``model`` (training checkpoints: the rest, e.g. ``optimizer`` or ``epoch``, is
    reported as skipped) and a Vistas ``{"body", "head", "cls"}`` dict (container ``"vistas"``; head and cls
    reported). Raises :class:`WeightsFormatError` when no dict of tensors is found.
    """
    skipped: dict[str, str] = {}
    trail: list[str] = []
    container = None
    while isinstance(obj, Mapping):
        inner = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        for k, v in obj.items():
            if k != inner:
                skipped[".".join(trail + [str(k)])] = _describe(str(k), v)
        trail.append(inner)
        obj = obj[inner]
    if (
        isinstance(obj, Mapping)
        and isinstance(obj.get("body"), Mapping)
        and not any(torch.is_tensor(v) for v in obj.values())
    ):
        container = "vistas"
        for k, v in obj.items():
            if k == "body":
                continue
            what = {"head": "Vistas segmentation head (DeepLabV3)", "cls": "Vistas classifier conv"}.get(str(k))
            n = sum(1 for t in v.values() if torch.is_tensor(t)) if isinstance(v, Mapping) else 0
            skipped[".".join(trail + [str(k)])] = (
                f"{what}: {n} tensors with no counterpart in ResNet38" if what else _describe(str(k), v)
            )
        trail.append("body")
        obj = obj["body"]
    if not isinstance(obj, Mapping):
        where = f" under {'/'.join(trail)}" if trail else ""
        raise WeightsFormatError(
            f"{path}: expected a state_dict (a dict of tensors){where}, found {type(obj).__name__}"
        )
    state: dict[str, Any] = {}
    for k, v in obj.items():
        if torch.is_tensor(v):
            state[str(k)] = v
        else:
            skipped[".".join(trail + [str(k)])] = _describe(str(k), v)
    return state, skipped, container


def from_mapillary(
    state: Mapping[str, torch.Tensor], path: str, container: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Mapillary/NVIDIA keys (``module.`` already stripped) -> (our state, skipped {pattern: what}, layout).

    Keys outside the trunk (a DeepLab/ASPP head of a segmentation checkpoint) are skipped and reported; a trunk
    key that does not map, two keys mapping to one, or a structure other than ResNet-38's ``[3, 3, 6, 3, 1, 1]``
    raise :class:`WeightsMismatchError`.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    infixes: set[str] = set()
    unknown: list[str] = []
    heads: dict[str, int] = {}
    blocks: dict[int, int] = {}
    for key, tensor in state.items():
        try:
            ours, infix = mapillary_to_key(key)
        except UnknownNameError:
            if _TRUNK.match(key):
                unknown.append(key)
            else:
                group = key.split(".", 1)[0] + (".*" if "." in key else "")
                heads[group] = heads.get(group, 0) + 1
            continue
        if ours in out:
            raise WeightsMismatchError(
                f"{path}: {source[ours]!r} and {key!r} both hold {ours}: a mixed layout", path=path, unexpected=[key]
            )
        if m := _BLOCK.match(key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]))
        out[ours], source[ours] = tensor, key
        if infix:
            infixes.add(infix)
    if unknown:
        raise WeightsMismatchError(
            f"{path}: {len(unknown)} keys of a Mapillary/NVIDIA WiderResNet trunk are of no known layout "
            f"(expected mod<L>.block<k>.bn1/convs.conv1.../proj_conv, optionally with .bn. or .0. before the BN "
            f"parameter): {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""),
            path=path,
            unexpected=unknown,
        )
    structure = [blocks.get(level, 0) for level in LEVELS]
    expected = [count for count, _ in LEVELS.values()]
    if structure != expected:
        raise WeightsMismatchError(
            f"{path}: a WiderResNet with structure {structure} (blocks in mod2..mod7); only ResNet-38's {expected} "
            "(wider_resnet38 / wider_resnet38_a2) is built here",
            path=path,
        )
    if "0" in infixes:
        layout = "nvidia"
    elif container == "vistas":
        layout = "mapillary-vistas"
    elif "bn" in infixes:
        layout = "mapillary-v0"
    else:
        layout = "mapillary"
    skipped = {g: f"{n} tensors of a segmentation head (no counterpart in ResNet38)" for g, n in heads.items()}
    return out, skipped, layout


def state_from_checkpoint(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Any torch checkpoint object -> (our state_dict keys, skipped entries, layout), skipped entries logged."""
    state, skipped, container = unwrap_checkpoint(obj, path)
    # DataParallel / DistributedDataParallel save their module under "module."
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    layout = "widedeep"
    if is_mapillary(state):
        state, heads, layout = from_mapillary(state, path, container)
        skipped.update(heads)
    report_skipped(path, skipped)
    return state, skipped, layout


def report_skipped(path: str, skipped: Mapping[str, str]) -> None:
    """Log what a checkpoint holds besides loadable weights: tensors as warnings, the rest as information."""
    for name, what in skipped.items():
        level = logging.WARNING if "tensor" in what and "not weights" not in what else logging.INFO
        log.log(level, "%s: skipped %s: %s", path, name, what)


def check_convention(convention: str | None) -> None:
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"weights_convention must be None, 'plain' or 'inplace_abn', got {convention!r}")


def inplace_abn_gammas(state: Mapping[str, torch.Tensor], eps: float = INPLACE_ABN_EPS) -> dict[str, torch.Tensor]:
    """Our state_dict with every BN weight replaced by ``|gamma| + eps``: InPlaceABN's effective scale, so a
    plain BatchNorm (eps ``eps`` too) computes what the InPlaceABN did. Same dtypes; a new dict."""
    return {k: (v.abs() + eps if _OUR_BN_WEIGHT.match(k) else v) for k, v in state.items()}
