"""Loading weights into a model: every name and shape checked first, with the reason a file does not fit."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping

import torch
import torch.nn as nn

from widedeep.arch import NUM_FEATURES

from .errors import WeightsMismatchError, trim_names
from .lineages import state_from_checkpoint
from .mapping import num_classes_of
from .read import WeightsFile, checked_dtypes, read_weights, with_convention

log = logging.getLogger("widedeep.weights")  # one logger for the package (its messages predate the split)
CLASSIFIER_PREFIXES = ("fc.", "head.score.")
HEAD_PREFIXES = ("fc.", "head.")


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
    checksum: str = (
        "unchecked"  # "verified", "mismatch" (released name, other md5: loaded as the user's) or "unchecked"
    )


def _fits_width(model: nn.Module, state: Mapping[str, torch.Tensor]) -> float | None:
    """The ``width`` at which ``model``'s architecture has the file's trunk shapes, or None.

    Asks the model (:meth:`ResNet38.state_shapes <widedeep.models.ResNet38.state_shapes>`: its keys and shapes
    at another width) rather than building a ResNet38 here: the weights package never imports the model."""
    shapes_at = getattr(model, "state_shapes", None)
    if not callable(shapes_at) or "bn7.weight" not in state:
        return None
    raw = state["bn7.weight"].shape[0] / NUM_FEATURES
    candidates = dict.fromkeys([float(Fraction(raw).limit_denominator(64)), raw])
    for w in candidates:
        if w <= 0 or w == model.width:
            continue
        try:
            shapes = shapes_at(w)
        except Exception:  # no such net at that width (e.g. a channel count that rounds to nothing)
            continue
        trunk = [k for k in state if k in shapes and not k.startswith(CLASSIFIER_PREFIXES)]
        if trunk and all(tuple(state[k].shape) == shapes[k] for k in trunk):
            return w
    return None


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
    report = LoadReport(
        path=path, checksum=wf.checksum, skipped=dict(wf.skipped), layout=wf.layout, convention=wf.convention
    )
    report.checksum_verified = report.checksum == "verified"
    target = model.state_dict()
    if drop_classifier:
        report.dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    trunk_only = not any(k.startswith(HEAD_PREFIXES) for k in target)
    if trunk_only:
        heads = [k for k in state if k.startswith(HEAD_PREFIXES) and k not in report.dropped]
        if heads:
            log.info(
                "%s: the model is a trunk without a classifier: dropped the file's %s (%d tensors)",
                path,
                "classifier" if all(k.startswith("fc.") for k in heads) else "head",
                len(heads),
            )
            report.dropped += heads
    state = {k: v for k, v in state.items() if k not in report.dropped}
    report.missing = [
        k
        for k in target
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not (drop_classifier and k.startswith(CLASSIFIER_PREFIXES))
    ]
    report.unexpected = [k for k in state if k not in target]
    mis_shaped = [
        (k, tuple(state[k].shape), tuple(target[k].shape))
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
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
            problems.append(
                "shape mismatches: " + "; ".join(f"{k} file {a} vs model {b}" for k, a, b in unexplained[:10])
            )
    if strict and report.missing:
        problems.append(
            f"missing from the file ({len(report.missing)}): {trim_names(report.missing)}"
            + _missing_hint(report.missing, file_classes, wf.layout)
        )
    if strict and report.unexpected:
        problems.append(f"not in the model ({len(report.unexpected)}): {trim_names(report.unexpected)}")
    if problems:
        raise WeightsMismatchError(
            f"{path} does not fit {type(model).__name__}: " + "; ".join(problems),
            path=path,
            missing=report.missing,
            unexpected=report.unexpected,
            mis_shaped=mis_shaped,
            file_classes=file_classes,
            model_classes=model_classes,
            file_width=file_width,
            model_width=model_width,
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
        hints.append(
            "NVIDIA's DeepWV3Plus keeps no bn_out (bn7): load with strict=False (create_model: "
            "weights_strict=False) and use forward_features(x, bn7=False), the raw trunk output it uses"
        )
    return " (" + "; ".join(hints) + ")" if hints and len(head) + len(bn7) == len(missing) else ""
