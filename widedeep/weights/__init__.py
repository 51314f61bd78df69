"""Weights in every format users have: ademxapp ``.params``, psa ``.pth``, safetensors, and the Mapillary
InPlace-ABN / NVIDIA ``.pth.tar`` checkpoints (:mod:`.lineages`).

``read_state_dict`` turns any of them into our state_dict keys (``read_weights`` also returns the file's
metadata, key layout, what was skipped and md5 status); ``load_weights`` checks names and shapes against a model
and copies;
``save_weights`` writes ``.params`` / ``.safetensors`` / ``.pth`` atomically; ``pool_style_of`` decides a
Model A's max-pool style from a file's content (metadata, or the released file's md5), never its name.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .lineages import (
    CONVENTIONS, INPLACE_ABN_EPS, MAPILLARY_LAYOUTS, PLAIN_LAYOUTS, check_convention, inplace_abn_gammas,
    state_from_checkpoint,
)
from .mapping import UnknownNameError, ademxapp_to_key, is_segmentation_file, key_to_ademxapp
from widedeep.fileio import atomic_open, atomic_write_bytes

from .mxnet_params import ParamsFormatError, WeightsFormatError, read_params, write_params
from .released import (
    RELEASED_MD5, RELEASED_MODEL_A, ChecksumError, check_released, is_released_model_a, verify_released,
)

__all__ = [
    "ChecksumError", "ParamsFormatError", "WeightsFormatError", "WeightsMismatchError", "LoadReport", "WeightsFile",
    "RELEASED_MD5", "read_params", "write_params", "read_weights", "read_state_dict", "load_weights", "save_weights",
    "to_ademxapp", "num_classes_of", "pool_style_of", "verify_released", "with_convention", "CONVENTIONS",
    "INPLACE_ABN_EPS",
]

log = logging.getLogger(__name__)
CLASSIFIER_PREFIXES = ("fc.", "head.score.")
HEAD_PREFIXES = ("fc.", "head.")
POOL_STYLES = ("mxnet", "caffe", "ceil")
_PTH_META = "widedeep"  # key of our entry in a saved state_dict's ``_metadata`` (torch's own per-module dict)


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model: the message lists missing, unexpected and mis-shaped entries.

    Attributes (for callers that phrase their own hints, e.g. the trainer's CLI): ``path``; ``missing`` and
    ``unexpected`` (state_dict keys); ``mis_shaped`` (``(key, file_shape, model_shape)``); ``file_classes`` and
    ``model_classes`` (classifier outputs, 0 = headless, None = unknown); ``file_width`` / ``model_width`` and
    ``width_ratio`` (file / model) when the shapes are those of the same net at another ``width``, else None.
    """

    def __init__(self, message: str, *, path: str | None = None, missing=(), unexpected=(), mis_shaped=(),
                 file_classes: int | None = None, model_classes: int | None = None,
                 file_width: float | None = None, model_width: float | None = None):
        super().__init__(message)
        self.path = path
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        self.file_classes, self.model_classes = file_classes, model_classes
        self.file_width, self.model_width = file_width, model_width
        self.width_ratio = file_width / model_width if file_width and model_width else None


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # the file's entries with no counterpart, never loaded: {name or "prefix.*": what}, e.g. optimiser state, a
    # Vistas/NVIDIA segmentation head (also logged when the file is read)
    skipped: dict[str, str] = field(default_factory=dict)
    layout: str = "widedeep"  # the file's key layout (see WeightsFile)
    convention: str | None = None  # BN-gamma convention applied (see WeightsFile)
    checksum_verified: bool = False  # True only when the file has a released name and the released md5
    checksum: str = "unchecked"  # "verified", "mismatch" (released name, other md5: loaded as the user's) or "unchecked"


@dataclass
class WeightsFile:
    """A weights file read into our keys: ``state``, our writers' ``metadata`` (e.g. ``pool_style``), the md5 status,
    and where it came from.

    ``layout``: ``"ademxapp"`` (``.params``), ``"widedeep"`` (ours = psa's ``resnet38d`` keys), or a Mapillary/NVIDIA
    one (``"mapillary"``, ``"mapillary-v0"``, ``"mapillary-vistas"``, ``"nvidia"``; see :mod:`.lineages`).
    ``skipped``: entries with no counterpart (optimiser state, segmentation heads): ``{name: what}``.
    ``convention``: ``"inplace_abn"`` once the BN gammas were converted to ``|gamma| + 1e-5``, ``"plain"`` when
    that was declined, None when nobody said (plain values as in the file).
    """

    path: str
    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    checksum: str = "unchecked"
    layout: str = "widedeep"
    skipped: dict[str, str] = field(default_factory=dict)
    convention: str | None = None


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for ext in (".pth.tar", ".params", ".safetensors", ".pth", ".pt", ".npz"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def _looks_like(path: str) -> str:
    """A short description of what a file's first bytes say it is, for error messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = os.path.getsize(path)
    except OSError:
        return "unreadable"
    if size == 0:
        return "an empty file"
    if head[:8] == (0x112).to_bytes(8, "little"):
        return "an MXNet .params file"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a torch.save checkpoint or a numpy .npz)"
    if head[:1] == b"\x80":
        return "a Python pickle (an old-style torch.save checkpoint)"
    if len(head) >= 9 and head[8:9] == b"{":
        return "a safetensors file"
    if head.lstrip()[:1] in (b"<", b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"a text file ({size} bytes; an HTML error page or a Git LFS pointer instead of the download?)"
    return f"{size} bytes of something else"


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(raw tensors as stored, metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:  # safetensors' SafetensorError ("header too small" ...) names no file
        raise WeightsFormatError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); expected an 8-byte header length, "
            f"a JSON header and tensor data as written by safetensors or save_weights; the file is {_looks_like(path)}"
        ) from None


def _read_pth(path: str) -> tuple[Any, dict[str, str]]:
    """(the checkpoint object as saved, our metadata); :func:`lineages.state_from_checkpoint` unwraps it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        kind = _looks_like(path)
        # torch's wordings: "Unsupported global: GLOBAL x.y ..." (an unknown class) and "unsupported GLOBAL
        # posix.system whose module posix is blocked" (torch >= 2.13 for os/subprocess/builtins ...)
        if kind.startswith(("a zip", "a Python pickle")) and re.search(r"unsupported global", msg, re.IGNORECASE):
            raise WeightsFormatError(
                f"{path}: the checkpoint holds Python objects besides tensors, which torch.load(weights_only=True) "
                "refuses to unpickle; if you trust the file, load it with torch.load(..., weights_only=False) and "
                "torch.save its state_dict alone"
            ) from None
        raise WeightsFormatError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}); "
            f"expected a state_dict written by torch.save; the file is {kind}"
        ) from None
    if not isinstance(obj, dict):
        raise WeightsFormatError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    metadata = {}
    inner = obj
    for key in ("state_dict", "model"):
        if isinstance(inner, dict) and isinstance(inner.get(key), dict):
            inner = inner[key]
    ours = (getattr(inner, "_metadata", None) or {}).get(_PTH_META)
    if isinstance(ours, dict):
        metadata = {str(k): str(v) for k, v in ours.items()}
    return obj, metadata


def read_weights(path: str | os.PathLike, *, verify: bool | str = True,
                 weights_convention: str | None = None) -> WeightsFile:
    """Read a weights file into our state_dict keys, with its metadata, layout, skipped entries and md5 status (see
    :func:`read_state_dict`; ``weights_convention`` as there)."""
    check_convention(weights_convention)
    return with_convention(_read_weights(str(path), verify), weights_convention, warn=True)


def checked_dtypes(state: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The state with its dtypes checked: every ResNet-38 entry is floating point except BN's
    ``num_batches_tracked``. An integer or bool tensor there (which ``copy_`` would cast silently into nonsense) is
    a :class:`WeightsFormatError` naming it; float64 is cast to float32 with a note; float16/bfloat16 are kept."""
    out, doubles = {}, []
    for key, t in state.items():
        if isinstance(t, torch.Tensor) and not key.endswith("num_batches_tracked"):
            if not t.is_floating_point():
                raise WeightsFormatError(
                    f"{path}: tensor {key} is {str(t.dtype).replace('torch.', '')}, expected floating point "
                    "(float32, float16 or bfloat16) for this parameter; the file does not hold ResNet-38 weights as "
                    "they were trained (a wrong export or conversion?)")
            if t.dtype == torch.float64:
                doubles.append(key)
                t = t.float()
        out[key] = t
    if doubles:
        log.warning("%s: %d float64 tensors cast to float32 (%s)", path, len(doubles), _trim(doubles))
    return out


def _read_weights(path: str, verify: bool | str) -> WeightsFile:
    wf = _read_weights_unchecked(path, verify)
    return replace(wf, state=checked_dtypes(wf.state, path))


def _read_weights_unchecked(path: str, verify: bool | str) -> WeightsFile:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    if Path(path).is_dir():
        raise WeightsFormatError(f"{path}: a folder, expected a weights file (.params, .safetensors, .pth, .pt or "
                                 ".pth.tar)")
    ext = _suffix(path)
    if ext in (".params", ".npz"):
        checksum = check_released(path, verify)
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
                + (" ..." if len(unknown) > 10 else ""), path=path, unexpected=unknown,
            )
        return WeightsFile(path, out, {}, checksum, layout="ademxapp")
    if ext in (".safetensors", ".pth", ".pt", ".pth.tar"):
        obj, metadata = _read_safetensors(path) if ext == ".safetensors" else _read_pth(path)
        state, skipped, layout = state_from_checkpoint(obj, path)
        return WeightsFile(path, state, metadata, layout=layout, skipped=skipped)
    raise WeightsFormatError(
        f"{path}: unknown weights format {ext!r}: expected .params, .safetensors, .pth, .pt or .pth.tar"
    )


def read_state_dict(path: str | os.PathLike, *, verify: bool | str = True,
                    weights_convention: str | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file into our state_dict keys.

    ``.params``/``.npz``: ademxapp/MXNet arrays renamed; ``.safetensors``: as saved by :func:`save_weights`;
    ``.pth``/``.pt``/``.pth.tar``: a state_dict, possibly under ``state_dict``/``model`` and with DataParallel's
    ``module.`` prefix (psa ``resnet38d`` keys are ours), or a Mapillary InPlace-ABN / NVIDIA checkpoint, told
    from its keys (``mod2.block1.bn1.weight``, with ``.bn.`` (v0.0.1) or ``.0.`` (NVIDIA) before BN parameters,
    or a Vistas ``{"body", "head", "cls"}``; see :mod:`.lineages`). Entries with no counterpart (optimiser
    state, DeepLab heads) are logged and listed in :attr:`WeightsFile.skipped` (:func:`read_weights`).

    ``weights_convention``: ``"inplace_abn"`` converts every BN gamma to ``|gamma| + 1e-5``, which a file saved
    from InPlaceABN modules needs (InPlace-ABN normalises with that; Mapillary's ImageNet and Vistas files);
    ``"plain"`` keeps the values (NVIDIA's re-keyed file, plain BatchNorm); None keeps them and warns for the
    Mapillary layouts, since files do not record which they are. ademxapp/psa/our keys are always plain:
    ``"inplace_abn"`` there raises :class:`WeightsFormatError`.

    ``verify``: a file named like a released ademxapp file is md5-checked. ``True`` (default): a mismatch logs
    a warning and the file loads as the user's own (the trainer's exports reuse those names); ``"strict"``:
    a mismatch raises :class:`ChecksumError`; ``False``: no check. Unreadable files raise
    :class:`WeightsFormatError` (``ParamsFormatError`` for ``.params``) naming the file.
    """
    return read_weights(path, verify=verify, weights_convention=weights_convention).state


def with_convention(wf: WeightsFile, convention: str | None, *, warn: bool = False) -> WeightsFile:
    """``wf`` with its BN gammas read under ``convention`` (see :func:`read_state_dict`): a new WeightsFile when
    they change, ``wf`` itself otherwise. ``warn``: log the "which convention?" warning for an undecided
    Mapillary file (done once, when the file is read)."""
    check_convention(convention)
    name = Path(wf.path).name
    if convention is None:
        if warn and wf.convention is None and wf.layout in MAPILLARY_LAYOUTS and wf.layout != "nvidia":
            log.warning("%s: a Mapillary InPlace-ABN checkpoint (%s layout); its BN gammas are used as plain "
                        "BatchNorm gammas. A file saved from InPlaceABN modules (Mapillary's ImageNet and Vistas "
                        "files) normalises with |gamma| + eps: pass weights_convention='inplace_abn' for it, "
                        "weights_convention='plain' to keep the values and silence this", wf.path, wf.layout)
        return wf
    if convention == wf.convention:
        return wf
    if wf.convention == "inplace_abn":  # |gamma| cannot be undone
        raise ValueError(f"{wf.path}: its gammas were already converted (weights_convention='inplace_abn'); read the "
                         f"file again for weights_convention={convention!r}")
    if convention == "plain":
        return replace(wf, convention="plain")
    if wf.layout in PLAIN_LAYOUTS:
        raise WeightsFormatError(
            f"{wf.path}: weights_convention='inplace_abn' converts the BN gammas of Mapillary InPlace-ABN checkpoints "
            f"(mod<L>.block<k> keys), but {name} has {wf.layout} keys, whose BatchNorms are plain: drop the option "
            "(or pass weights_convention='plain')"
        )
    if wf.layout == "nvidia":
        log.warning("%s: NVIDIA's re-keyed checkpoints (BN as Sequential(BatchNorm2d, ReLU)) hold plain BatchNorm "
                    "gammas, for which weights_convention='plain' is right; converting to |gamma| + eps as asked",
                    wf.path)
    log.info("%s: BN gammas -> |gamma| + %g (InPlace-ABN convention)", wf.path, INPLACE_ABN_EPS)
    return replace(wf, state=inplace_abn_gammas(wf.state), convention="inplace_abn")


def pool_style_of(source: WeightsFile | str | os.PathLike | Mapping, variant: str | None = None) -> tuple[str, str]:
    """The max-pool style a weights file needs, decided from its content: ``(style, reason)``.

    A ``pool_style`` recorded by our writers (safetensors / ``.pth`` metadata) wins; a ``.params`` file with
    the released Model A's md5 needs ``"caffe"`` (md5 computed only for ``variant`` ``"a"`` or None);
    anything else is ``"mxnet"`` (this project's training default). The file name is never used.
    """
    if isinstance(source, Mapping):
        return "mxnet", "default (weights given as a state_dict)"
    wf = source if isinstance(source, WeightsFile) else None
    path = wf.path if wf else str(source)
    metadata = wf.metadata if wf else _metadata_of(path)
    style = metadata.get("pool_style")
    if style in POOL_STYLES:
        return style, f"recorded in {Path(path).name}'s metadata"
    if variant in (None, "a") and _suffix(path) == ".params" and is_released_model_a(path):
        return "caffe", (f"{Path(path).name} has the md5 of the released {RELEASED_MODEL_A}, whose accuracy "
                         "needs caffe-style (pad 0) pools")
    return "mxnet", (f"default: {Path(path).name} records no pool style and is not the released Model A "
                     "(by md5)" if variant in (None, "a") and _suffix(path) == ".params"
                     else f"default: {Path(path).name} records no pool style")


def _metadata_of(path: str) -> dict[str, str]:
    ext = _suffix(path)
    if ext == ".safetensors":
        return _read_safetensors(path)[1]
    if ext in (".pth", ".pt", ".pth.tar"):
        return _read_pth(path)[1]
    return {}


def _fits_width(model: nn.Module, state: Mapping[str, torch.Tensor]) -> float | None:
    """The ``width`` at which ``model``'s architecture has the file's trunk shapes, or None."""
    from widedeep.models.resnet38 import NUM_FEATURES, ResNet38

    if not isinstance(model, ResNet38) or "bn7.weight" not in state:
        return None
    raw = state["bn7.weight"].shape[0] / NUM_FEATURES
    candidates = dict.fromkeys([float(Fraction(raw).limit_denominator(64)), raw])
    for w in candidates:
        if w <= 0 or w == model.width:
            continue
        try:
            with torch.device("meta"):
                ref = ResNet38(model.variant, model.num_classes, model.output_stride, segmentation=model.segmentation,
                               width=w, in_chans=model.conv1a.in_channels)
        except Exception:
            continue
        shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        trunk = [k for k in state if k in shapes and not k.startswith(CLASSIFIER_PREFIXES)]
        if trunk and all(tuple(state[k].shape) == shapes[k] for k in trunk):
            return w
    return None


def _trim(names: list[str], k: int = 12) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor] | WeightsFile,
    *,
    strict: bool = True,
    drop_classifier: bool = False,
    verify: bool | str = True,
    name: str | None = None,
    weights_convention: str | None = None,
) -> LoadReport:
    """Copy weights from ``source`` (a file, a :class:`WeightsFile`, a state_dict from :func:`read_state_dict`, or a
    checkpoint dict as ``torch.load`` returns it, in any layout :func:`read_state_dict` knows) into ``model`` after
    checking every name and shape.

    ``drop_classifier``: ignore the file's last layer (``fc``/``head.score``), e.g. to fine-tune with another
    class count. A trunk-only model (``num_classes=0``, e.g. ``resnet38d``) drops a file's heads by itself
    (logged). ``strict=False`` allows missing and unexpected names (reported, not copied); shape mismatches
    always raise. ``verify``: md5 check of released names, see :func:`read_state_dict`. ``name`` labels a
    state_dict source in messages. ``weights_convention``: BN gammas of Mapillary InPlace-ABN files, see
    :func:`read_state_dict`. The file's entries with no counterpart are listed in ``report.skipped``.
    Raises :class:`WeightsMismatchError` listing what does not fit.
    """
    if isinstance(source, Mapping) and not isinstance(source, WeightsFile):
        label = name or "<state_dict>"
        state, skipped, layout = state_from_checkpoint(source, label)
        state = checked_dtypes(state, label)
        source = WeightsFile(label, state, layout=layout, skipped=skipped)
        wf = with_convention(source, weights_convention, warn=True)
    elif isinstance(source, WeightsFile):
        wf = with_convention(source, weights_convention)
    else:
        wf = read_weights(source, verify=verify, weights_convention=weights_convention)
    path, state = wf.path, dict(wf.state)
    report = LoadReport(path=path, checksum=wf.checksum, skipped=dict(wf.skipped), layout=wf.layout,
                        convention=wf.convention)
    report.checksum_verified = report.checksum == "verified"
    target = model.state_dict()
    if drop_classifier:
        report.dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    trunk_only = not any(k.startswith(HEAD_PREFIXES) for k in target)
    if trunk_only:
        heads = [k for k in state if k.startswith(HEAD_PREFIXES) and k not in report.dropped]
        if heads:
            log.info("%s: the model is a trunk without a classifier: dropped the file's %s (%d tensors)",
                     path, "classifier" if all(k.startswith("fc.") for k in heads) else "head", len(heads))
            report.dropped += heads
    state = {k: v for k, v in state.items() if k not in report.dropped}
    report.missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")
                      and not (drop_classifier and k.startswith(CLASSIFIER_PREFIXES))]
    report.unexpected = [k for k in state if k not in target]
    mis_shaped = [(k, tuple(state[k].shape), tuple(target[k].shape))
                  for k in state if k in target and state[k].shape != target[k].shape]
    file_classes, model_classes = num_classes_of(state), num_classes_of(target)
    model_width = getattr(model, "width", None)
    file_width = None
    problems = []
    if mis_shaped:
        cls = [m for m in mis_shaped if m[0].startswith(CLASSIFIER_PREFIXES)]
        other = [m for m in mis_shaped if m not in cls]
        classes_differ = bool(cls) and file_classes > 0 and model_classes > 0 and file_classes != model_classes
        file_width = _fits_width(model, state) if other or (cls and not classes_differ) else None
        unexplained = [] if file_width is not None else list(other)
        if file_width is not None:
            k, a, b = (other or cls)[0]
            problems.append(
                f"the file is the same net at width {file_width:g} (the model has width {model_width:g}: every "
                f"channel count x{file_width / model_width:g}, e.g. {k} file {a} vs model {b}): build the model with "
                f"width={file_width:g} (on the command line: --width {file_width:g})"
            )
        if classes_differ:
            problems.append(
                f"the file's classifier has {file_classes} classes but the model has {model_classes}: build the model "
                f"with num_classes={file_classes} (on the command line: --model <label>_cls{file_classes}), or pass "
                "drop_classifier=True (create_model: a different num_classes) to keep only the backbone"
            )
        elif file_width is None:
            unexplained += cls
        if unexplained:
            problems.append("shape mismatches: " + "; ".join(f"{k} file {a} vs model {b}" for k, a, b in unexplained[:10]))
    if strict and report.missing:
        problems.append(f"missing from the file ({len(report.missing)}): {_trim(report.missing)}"
                        + _missing_hint(report.missing, file_classes, wf.layout))
    if strict and report.unexpected:
        problems.append(f"not in the model ({len(report.unexpected)}): {_trim(report.unexpected)}")
    if problems:
        raise WeightsMismatchError(
            f"{path} does not fit {type(model).__name__}: " + "; ".join(problems), path=path,
            missing=report.missing, unexpected=report.unexpected, mis_shaped=mis_shaped, file_classes=file_classes,
            model_classes=model_classes, file_width=file_width, model_width=model_width,
        )
    with torch.no_grad():
        for key, tensor in state.items():
            if key in target:
                target[key].copy_(tensor)
                report.loaded.append(key)
    for key in report.missing + report.unexpected:
        log.warning("%s: %s %s", path, "missing" if key in report.missing else "unused", key)
    return report


def _missing_hint(missing: list[str], file_classes: int, layout: str) -> str:
    """What to do about keys a file lacks, when the reason is a known one."""
    head = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    bn7 = [k for k in missing if k.startswith("bn7.")]
    hints = []
    if head and file_classes == 0:
        hints.append("the file has no classifier (a trunk, e.g. a Vistas body): build the model with num_classes=0")
    if bn7 and layout == "nvidia":
        hints.append("NVIDIA's DeepWV3Plus keeps no bn_out (bn7): load with strict=False (create_model: "
                     "weights_strict=False) and use forward_features(x, bn7=False), the raw trunk output it uses")
    return " (" + "; ".join(hints) + ")" if hints and len(head) + len(bn7) == len(missing) else ""


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
    """Write weights atomically; the format follows the suffix (``.params``, ``.safetensors``, ``.pth``).

    ``.safetensors`` and ``.pth`` record ``metadata`` (for ``.pth`` in the state_dict's ``_metadata``, so it
    stays a plain loadable state_dict); a model's ``pool_style`` is recorded unless ``metadata`` sets it, so
    :func:`pool_style_of` / ``create_model`` bring the same pools back. ``.params`` cannot hold metadata.
    """
    meta = {}
    if isinstance(source, nn.Module):
        state = source.state_dict()
        if getattr(source, "pool_style", None) in POOL_STYLES:
            meta["pool_style"] = source.pool_style
    else:
        state = dict(source)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    ext = _suffix(path)
    if ext == ".params":
        pooled = getattr(source, "variant", None) in ("a", "a2")
        if meta.get("pool_style", "mxnet") != "mxnet" and (pooled or not isinstance(source, nn.Module)):
            log.warning("%s: .params files cannot record pool_style=%r; load it with pool_style=%r (on the command "
                        "line: --pool-top-infer-style %s), or save as .safetensors", path, meta["pool_style"],
                        meta["pool_style"], meta["pool_style"])
        write_params(path, to_ademxapp(state), fmt=params_format)
    elif ext == ".safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write_bytes(path, save(tensors, metadata=meta))
    elif ext in (".pth", ".pt"):
        out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
        out._metadata = OrderedDict(getattr(state, "_metadata", None) or {})  # type: ignore[attr-defined]
        if meta:
            out._metadata[_PTH_META] = meta  # type: ignore[attr-defined]
        with atomic_open(path) as f:
            torch.save(out, f)
    else:
        raise ValueError(f"{path}: unknown weights format {ext!r}: expected .params, .safetensors or .pth")
