"""Names of ademxapp ``.params`` arrays <-> our state_dict keys.

Our keys are the psa ``resnet38d.Net`` keys for the trunk (``b4_3.bn_branch2a.running_var``); the heads are
``fc.*`` (classification, ademxapp ``linear1000``) and ``head.conv6a.*`` / ``head.score.*`` (segmentation,
ademxapp ``conv6a`` / ``linear{C}``). ``num_batches_tracked`` buffers have no MXNet counterpart.
"""

from __future__ import annotations

import re

_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_BN_SUFFIX_BACK = {v: k for k, v in _BN_SUFFIX.items()}
_UNIT = re.compile(r"^(bn|res)(\d)(a|b\d+)_(branch\w+?)_(gamma|beta|moving_mean|moving_var|weight)$")
_UNIT_KEY = re.compile(r"^b(\d)(?:_(\d+))?\.(bn|conv)_(branch\w+)\.(\w+)$")
_LINEAR = re.compile(r"^linear(\d+)_(weight|bias)$")


class UnknownNameError(KeyError):
    pass


def ademxapp_to_key(name: str, *, segmentation: bool) -> str:
    """``arg:res4b3_branch2a_weight`` -> ``b4_3.conv_branch2a.weight``."""
    bare = name.split(":", 1)[1] if ":" in name else name
    if bare == "conv1a_weight":
        return "conv1a.weight"
    if m := _UNIT.match(bare):
        kind, level, unit, branch, suffix = m.groups()
        module = f"b{level}" if unit == "a" else f"b{level}_{unit[1:]}"
        if kind == "bn":
            if suffix == "weight":
                raise UnknownNameError(name)
            return f"{module}.bn_{branch}.{_BN_SUFFIX[suffix]}"
        if suffix != "weight":
            raise UnknownNameError(name)
        return f"{module}.conv_{branch}.weight"
    if bare.startswith("bn7_") and bare[4:] in _BN_SUFFIX:
        return f"bn7.{_BN_SUFFIX[bare[4:]]}"
    if bare.startswith("conv6a_") and bare[7:] in ("weight", "bias"):
        return f"head.conv6a.{bare[7:]}"
    if m := _LINEAR.match(bare):
        return f"head.score.{m.group(2)}" if segmentation else f"fc.{m.group(2)}"
    raise UnknownNameError(name)


def key_to_ademxapp(key: str, *, num_classes: int) -> str | None:
    """``b4_3.bn_branch2a.running_var`` -> ``aux:bn4b3_branch2a_moving_var``; None for keys MXNet lacks."""
    if key.endswith("num_batches_tracked"):
        return None
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if m := _UNIT_KEY.match(key):
        level, index, kind, branch, suffix = m.groups()
        unit = f"{level}a" if index is None else f"{level}b{index}"
        if kind == "bn":
            mx_suffix = _BN_SUFFIX_BACK[suffix]
            prefix = "aux" if mx_suffix.startswith("moving") else "arg"
            return f"{prefix}:bn{unit}_{branch}_{mx_suffix}"
        return f"arg:res{unit}_{branch}_{suffix}"
    if key.startswith("bn7."):
        mx_suffix = _BN_SUFFIX_BACK[key[4:]]
        return f"{'aux' if mx_suffix.startswith('moving') else 'arg'}:bn7_{mx_suffix}"
    if key.startswith("head.conv6a."):
        return f"arg:conv6a_{key.rsplit('.', 1)[1]}"
    if key.startswith(("head.score.", "fc.")):
        return f"arg:linear{num_classes}_{key.rsplit('.', 1)[1]}"
    raise UnknownNameError(key)


def is_segmentation_file(names) -> bool:
    return any(n.split(":", 1)[-1].startswith("conv6a_") for n in names)


def num_classes_of(state) -> int:
    """Classifier outputs of a state_dict in our keys (``fc`` or the segmentation ``head.score``); 0 when
    headless."""
    for key in ("fc.weight", "head.score.weight"):
        if key in state:
            return int(state[key].shape[0])
    return 0
