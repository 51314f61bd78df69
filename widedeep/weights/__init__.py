"""Weights in every format users have: ademxapp ``.params``, psa ``.pth``, safetensors.

``read_state_dict`` turns any of them into our state_dict keys; ``load_weights`` checks names and shapes
against a model and copies; ``save_weights`` writes ``.params`` / ``.safetensors`` / ``.pth`` atomically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from .mapping import UnknownNameError, ademxapp_to_key, is_segmentation_file, key_to_ademxapp
from widedeep.fileio import atomic_open, atomic_write_bytes

from .mxnet_params import ParamsFormatError, read_params, write_params
from .released import RELEASED_MD5, ChecksumError, verify_released

__all__ = [
    "ChecksumError", "ParamsFormatError", "WeightsMismatchError", "LoadReport", "RELEASED_MD5",
    "read_params", "write_params", "read_state_dict", "load_weights", "save_weights", "to_ademxapp", "num_classes_of",
]

log = logging.getLogger(__name__)
CLASSIFIER_PREFIXES = ("fc.", "head.score.")


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model: the message lists missing, unexpected and mis-shaped entries."""


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    checksum_verified: bool = False


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for ext in (".pth.tar", ".params", ".safetensors", ".pth", ".pt", ".npz"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def read_state_dict(path: str | os.PathLike, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a weights file into our state_dict keys.

    ``.params``/``.npz``: ademxapp/MXNet arrays renamed (md5-checked when the name is a released one);
    ``.safetensors``: as saved by :func:`save_weights`; ``.pth``/``.pt``/``.pth.tar``: a state_dict, possibly
    under ``state_dict``/``model`` and with DataParallel's ``module.`` prefix (psa ``resnet38d`` keys are ours).
    """
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    ext = _suffix(path)
    if ext in (".params", ".npz"):
        if verify:
            verify_released(path)
        arrays = read_params(path)
        seg = is_segmentation_file(arrays)
        out, unknown = {}, []
        for name, tensor in arrays.items():
            try:
                out[ademxapp_to_key(name, segmentation=seg)] = tensor
            except UnknownNameError:
                unknown.append(name)
        if unknown:
            raise WeightsMismatchError(
                f"{path}: {len(unknown)} arrays are not ResNet-38 (ademxapp) parameters: {', '.join(unknown[:10])}"
                + (" ..." if len(unknown) > 10 else "")
            )
        return out
    if ext == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if ext in (".pth", ".pt", ".pth.tar"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise WeightsMismatchError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
        return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if torch.is_tensor(v)}
    raise ValueError(f"{path}: unknown weights format {ext!r}: expected .params, .safetensors, .pth, .pt or .pth.tar")


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    drop_classifier: bool = False,
    verify: bool = True,
    name: str | None = None,
) -> LoadReport:
    """Copy weights from ``source`` (a file, or a state_dict from :func:`read_state_dict`) into ``model``
    after checking every name and shape.

    ``drop_classifier``: ignore the file's last layer (``fc``/``head.score``), e.g. to fine-tune with another
    class count. ``strict=False`` allows missing and unexpected names (reported, not copied); shape
    mismatches always raise. ``name`` labels a state_dict source in messages. Raises :class:`WeightsMismatchError` listing what does not fit.
    """
    if isinstance(source, Mapping):
        path, state = name or "<state_dict>", dict(source)
        report = LoadReport(path=path)
    else:
        path = str(source)
        report = LoadReport(path=path, checksum_verified=verify and Path(path).name in RELEASED_MD5)
        state = read_state_dict(path, verify=verify)
    if drop_classifier:
        report.dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
        state = {k: v for k, v in state.items() if k not in report.dropped}
    target = model.state_dict()
    report.missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")
                      and not (drop_classifier and k.startswith(CLASSIFIER_PREFIXES))]
    report.unexpected = [k for k in state if k not in target]
    mis_shaped = [(k, tuple(state[k].shape), tuple(target[k].shape))
                  for k in state if k in target and state[k].shape != target[k].shape]
    problems = []
    if mis_shaped:
        cls = [m for m in mis_shaped if m[0].startswith(CLASSIFIER_PREFIXES)]
        if cls and len(cls) == len(mis_shaped):
            problems.append(
                f"the file's classifier has {cls[0][1][0]} classes but the model has {cls[0][2][0]}: build the model "
                f"with num_classes={cls[0][1][0]}, or pass drop_classifier=True (create_model: a different "
                "num_classes) to keep only the backbone"
            )
        else:
            problems.append("shape mismatches: " + "; ".join(f"{k} file {a} vs model {b}" for k, a, b in mis_shaped[:10]))
    if strict and report.missing:
        problems.append(f"missing from the file ({len(report.missing)}): {', '.join(report.missing[:12])}"
                        + (" ..." if len(report.missing) > 12 else ""))
    if strict and report.unexpected:
        problems.append(f"not in the model ({len(report.unexpected)}): {', '.join(report.unexpected[:12])}"
                        + (" ..." if len(report.unexpected) > 12 else ""))
    if problems:
        raise WeightsMismatchError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in state.items():
            if key in target:
                target[key].copy_(tensor)
                report.loaded.append(key)
    for key in report.missing + report.unexpected:
        log.warning("%s: %s %s", path, "missing" if key in report.missing else "unused", key)
    return report


def num_classes_of(state: Mapping[str, torch.Tensor]) -> int:
    """Classifier outputs of a state_dict (``fc`` or the segmentation ``head.score``); 0 when headless."""
    for key in ("fc.weight", "head.score.weight"):
        if key in state:
            return int(state[key].shape[0])
    return 0


def to_ademxapp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict -> ``{"arg:...": tensor, "aux:...": tensor}`` as ademxapp's checkpoints name them."""
    n = num_classes_of(state)
    out = {}
    for key, tensor in state.items():
        name = key_to_ademxapp(key, num_classes=n)
        if name is not None:
            out[name] = tensor.detach().cpu()
    return out


def save_weights(
    source: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    params_format: str = "v2",
) -> None:
    """Write weights atomically; the format follows the suffix (``.params``, ``.safetensors``, ``.pth``)."""
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    path = Path(path)
    ext = _suffix(path)
    if ext == ".params":
        write_params(path, to_ademxapp(state), fmt=params_format)
    elif ext == ".safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))
    elif ext in (".pth", ".pt"):
        with atomic_open(path) as f:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, f)
    else:
        raise ValueError(f"{path}: unknown weights format {ext!r}: expected .params, .safetensors or .pth")
