"""``create_model``: a ResNet-38 by plain name or seed label, with weights loaded and the pool style decided.

Above both the names (:mod:`.registry`), the net (:mod:`.resnet38`) and :mod:`widedeep.weights`, which imports
nothing from the models.
"""

from __future__ import annotations

import logging
from typing import Any

from widedeep.weights import (
    MAPILLARY_LAYOUTS, WeightsFile, load_weights, num_classes_of, pool_style_of, read_weights, with_convention,
)

from .registry import model_args
from .resnet38 import ResNet38

log = logging.getLogger("widedeep.models.registry")  # the name its messages had before the split


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    output_stride: int | None = None,
    weights: str | WeightsFile | None = None,
    pool_style: str | None = None,
    fused: bool | str = False,
    weights_strict: bool = True,
    weights_verify: bool | str = True,
    recompute: str | list | dict | None = None,
    weights_convention: str | None = None,
    **kwargs: Any,
) -> ResNet38:
    """Build a ResNet-38 by plain name (``resnet38_a1``, ``resnet38d`` ...) or seed label, optionally with weights.

    ``num_classes`` different from the weights file's drops the file's classifier (fine-tuning); a trunk-only
    model (``resnet38d``, ``num_classes=0``) drops it by itself.
    ``pool_style`` (Model A/A2 max-pools), when not given, is decided from the weights' content, never their
    name: a ``pool_style`` recorded in the file (``save_weights`` writes it into ``.safetensors``/``.pth``),
    ``"caffe"`` for the released Model A file (by md5: its reference accuracy needs pad-0 pools, the seed's
    ``--pool-top-infer-style caffe``), else ``"mxnet"``. The choice and its reason are logged.
    ``weights``: a path, or a :class:`~widedeep.weights.WeightsFile` already read (``read_weights``).
    ``weights_verify``: md5 check of files named like the released ones (``True``: warn on a mismatch and load
    as the user's own file; ``"strict"``: raise :class:`ChecksumError`; ``False``: skip).
    ``fused`` selects the recompute-in-backward BN-ReLU-conv kernels (same parameters either way).
    ``recompute``: per-unit activation-memory modes, e.g. ``"unit"`` (keep only each unit's input; see
    :meth:`ResNet38.set_recompute` and :mod:`widedeep.models.recompute`).
    ``weights_convention``: how the file's BN gammas are meant, for Mapillary/NVIDIA checkpoints (see
    :func:`widedeep.weights.read_weights`): ``"inplace_abn"`` (saved from InPlaceABN: normalises with
    |gamma| + 1e-5, converted on loading) or ``"plain"``; None: plain, with a warning for Mapillary layouts.
    Other ResNet38 keywords (``activation``, ``activation_param``, ``bn_eps``, ``dilate_first_conv``, ``width``,
    ``dropout`` ...) pass through. A Mapillary/NVIDIA checkpoint loaded into a model that cannot reproduce it
    (ReLU where they trained with leaky ReLU, Model A2 for their Model A file, a Vistas body without
    ``dilate_first_conv``) loads, with a warning saying what to change (``activation="relu"`` given explicitly
    silences the activation warning: NVIDIA-style fine-tuning).
    """
    args = model_args(name, num_classes=num_classes, output_stride=output_stride)
    args.update(kwargs)
    pooled = args.get("variant") in ("a", "a2")
    wf = None
    if weights is not None:
        if isinstance(weights, WeightsFile):
            wf = with_convention(weights, weights_convention)
        else:
            wf = read_weights(weights, verify=weights_verify, weights_convention=weights_convention)
        if pooled:
            found, why = pool_style_of(wf, args.get("variant"))
            if pool_style is None:
                pool_style = found
                log.info("%s: %s-style max-pools: %s", name, pool_style, why)
            elif found != pool_style and wf.metadata.get("pool_style") == found:  # the file says otherwise
                log.warning("%s: pool_style=%r as given, although the weights file asks for %r (%s)",
                            name, pool_style, found, why)
            else:
                log.info("%s: %s-style max-pools (pool_style given)", name, pool_style)
    if pool_style is None:
        pool_style = "mxnet"
    model = ResNet38(pool_style=pool_style, fused=fused, **args)
    if recompute is not None:
        model.set_recompute(recompute)
    if wf is not None:
        _check_lineage(name, model, wf, explicit=set(kwargs))
        file_classes = num_classes_of(wf.state)
        drop = num_classes is not None and file_classes > 0 and file_classes != num_classes and num_classes > 0
        report = load_weights(model, wf, strict=weights_strict, drop_classifier=drop)
        if drop and report.dropped:
            log.info("%s: classifier dropped (num_classes=%d): %s", wf.path, num_classes, report.dropped)
        log.info("weights %s: %d tensors loaded; not in the file: %d; ignored: %d", wf.path, len(report.loaded),
                 len(report.missing), len(report.unexpected) + len(report.dropped))
    model.model_name = name
    return model


def _check_lineage(name: str, model: ResNet38, wf: WeightsFile, explicit: set[str]) -> None:
    """Warn when a Mapillary/NVIDIA checkpoint goes into a model that cannot reproduce the net it was trained as
    (it still loads: NVIDIA, for one, fine-tunes it that way). ``explicit``: the keywords the caller gave."""
    layout = wf.layout
    if layout not in MAPILLARY_LAYOUTS:
        return
    what = f"{wf.path} ({layout} layout)"
    if model.activation != "leaky_relu" and "activation" not in explicit:
        log.warning("%s: Mapillary trained these weights with leaky ReLU 0.01 (InPlace-ABN) but %s uses %s, so "
                    "outputs differ (about 3%%): pass activation='leaky_relu' (or use wider_resnet38 / "
                    "wider_resnet38_a2) to reproduce them, or activation='relu' to fine-tune as NVIDIA does",
                    what, name, model.activation)
    if model.bn_eps != 1e-5:
        log.info("%s: InPlace-ABN/torch BN eps is 1e-5, the model's %g (pass bn_eps=1e-5 for exact outputs)",
                 what, model.bn_eps)
    if layout == "mapillary-vistas":
        if model.variant != "a2" or model.output_stride != 8 or not model.dilate_first_conv:
            log.warning("%s: a Vistas body is Mapillary's WiderResNetA2 with dilation (variant a2, output_stride=8, "
                        "dilate_first_conv=True: create_model('wider_resnet38_a2', output_stride=8, num_classes=0)); "
                        "%s has variant %s, output_stride %d, dilate_first_conv=%s: outputs differ",
                        what, name, model.variant, model.output_stride, model.dilate_first_conv)
    elif model.variant != "a" and "fc.weight" in wf.state:
        # leaky ReLU signals "reproduce the trained net"; with ReLU it is NVIDIA-style initialisation anyway
        log.log(logging.WARNING if model.activation == "leaky_relu" else logging.INFO,
                "%s: Mapillary's ImageNet checkpoint is their WiderResNet = Model A; in variant %s (as NVIDIA puts "
                "it into A2) it is an initialisation, not the trained net (exact: wider_resnet38)",
                what, model.variant)
