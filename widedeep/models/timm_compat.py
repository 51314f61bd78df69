"""timm entrypoints for the plain names (``timm.create_model("resnet38_a1", ...)``).

Importing this module imports timm; ``import widedeep`` does not: it registers these entrypoints as soon as
timm is imported (see :mod:`widedeep._timm_hook`), or at once when timm already is.

Every entrypoint builds through timm's ``build_model_with_cfg``, so timm's keywords behave as for timm's own
models: ``features_only``/``out_indices``/``feature_cls`` (default: timm's ``FeatureGetterNet`` over
:meth:`ResNet38.forward_intermediates`, all six ``feature_info`` maps, strides 1, 2, 4, 8, 16, 32, VGG-style),
``num_classes``, ``in_chans``, ``drop_rate``, ``global_pool``, ``output_stride``, ``pretrained_cfg``,
``pretrained_cfg_overlay``, ``cache_dir``, ``device``/``dtype``; and ours: ``width``, ``fused``, ``pool_style``,
``dropout``, ``activation``/``activation_param``, ``bn_eps``, ``dilate_first_conv``, ``weights_convention``.

``pretrained=True`` loads ``pretrained_cfg["file"]`` through :func:`widedeep.weights.load_weights` (ademxapp
``.params``, ``.pth``, ``.safetensors``): the released file name (ademxapp weights are not downloadable;
looked up as given, in ``cache_dir`` and in ``./models/``) or a user's file via
``pretrained_cfg_overlay=dict(file=PATH)``. A different ``num_classes`` drops the file's classifier.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, is_model, model_entrypoint, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs

from .factory import create_model
from .registry import ALIASES, PLAIN_NAMES

MEAN = (0.485, 0.456, 0.406)  # ImageNet mean/std on RGB in [0, 1], as data_pipes.recipes
STD = (0.229, 0.224, 0.225)
FEATURE_INDICES = (0, 1, 2, 3, 4, 5)  # conv1a, b2_2, b3_2, b4_5, b5_2, relu(bn7)


def _cfg(file: str = "", **kw: Any) -> dict[str, Any]:
    # The released ILSVRC numbers: shorter side to 320 (bicubic), one 320x320 centre crop (crop_pct 1);
    # training crops were 224. No url: the ademxapp files are not downloadable (academic-use only).
    return {
        "file": file, "num_classes": 1000, "input_size": (3, 320, 320), "pool_size": (10, 10), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": MEAN, "std": STD, "first_conv": "conv1a", "classifier": "fc",
        "license": "ademxapp weights: academic use only", "origin_url": "https://github.com/itijyou/ademxapp",
        "paper_ids": "arXiv:1611.10080", **kw,
    }


_A1_FILE = "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
_A_FILE = "ilsvrc-cls_rna-a_cls1000_ep-0001.params"
_D_CFG = dict(num_classes=0, input_size=(3, 448, 448), pool_size=(56, 56), crop_pct=1.0)  # classifier "fc" when asked for

# Mapillary's WiderResNet / WiderResNetA2 (InPlace-ABN, leaky ReLU): their ImageNet protocol is 256 -> 224 centre
# crop; the file (wider_resnet38.pth.tar) is the user's: pretrained_cfg_overlay=dict(file=PATH), and
# weights_convention="inplace_abn" for a file saved from InPlaceABN modules (see widedeep.weights.lineages)
_MAPILLARY_CFG = dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bilinear",
                      license="see mapillary/inplace_abn", origin_url="https://github.com/mapillary/inplace_abn",
                      paper_ids="arXiv:1712.02616")

default_cfgs = generate_default_cfgs({
    "resnet38_a1.ilsvrc": _cfg(_A1_FILE),
    "resnet38_a.ilsvrc": _cfg(_A_FILE),
    "resnet38_a2": _cfg(),
    # psa/SEAM's stride-8 trunk, started from the ILSVRC A1 file (its classifier is dropped)
    "resnet38d.ilsvrc": _cfg(_A1_FILE, **_D_CFG),
    "wider_resnet38_a1.ilsvrc": _cfg(_A1_FILE),
    "resnet38_a1_s8.ilsvrc": _cfg(_A1_FILE, **_D_CFG),
    "wider_resnet38": _cfg(**_MAPILLARY_CFG),
    "wider_resnet38_a2": _cfg(**_MAPILLARY_CFG),
})

_BUILD_PARAMS = set(inspect.signature(build_model_with_cfg).parameters)


def _find_file(name: str, cache_dir: str | os.PathLike | None) -> Path:
    path = Path(os.path.expanduser(name))
    candidates = [path]
    if not path.is_absolute():
        candidates += ([Path(cache_dir) / path] if cache_dir else []) + [Path("models") / path]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"pretrained weights {name!r} not found (looked in: {', '.join(str(c) for c in candidates)}). ademxapp "
        "weights are not downloadable: bring the file and pass pretrained_cfg_overlay=dict(file=PATH) "
        "(.params, .pth or .safetensors), or put the released file in ./models/"
    )


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    name = ALIASES.get(variant, variant)
    cache_dir = kwargs.pop("cache_dir", None)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                 pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None))
    weights = None
    if pretrained and cfg.file:
        weights = _find_file(cfg.file, cache_dir)
    # a url / hf_hub source in an overlay (a plain state_dict of our keys) is left to timm's loader
    timm_loads = bool(pretrained and not cfg.file and cfg.has_weights)
    if pretrained and not cfg.has_weights:
        raise RuntimeError(f"{variant}: no released weights; pass pretrained_cfg_overlay=dict(file=PATH)")

    def build(*, device: Any = None, dtype: Any = None, **kw: Any) -> torch.nn.Module:
        kw.setdefault("num_classes", PLAIN_NAMES[name].get("num_classes", 1000))
        if PLAIN_NAMES[name].get("segmentation"):
            # timm's contract: forward gives (N, num_classes) logits (pooled features without a classifier), as
            # every timm classifier; the stride-8 map is forward_features(x). psa/SEAM's resnet38d (forward =
            # relu(bn7) map, "2 conv." head) stays widedeep.models.create_model("resnet38d").
            kw.setdefault("segmentation", False)
        model = create_model(name, weights=None if weights is None else str(weights), **kw)
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    extra = {"cache_dir": cache_dir} if timm_loads and "cache_dir" in _BUILD_PARAMS else {}
    kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=FEATURE_INDICES))
    return build_model_with_cfg(build, variant, timm_loads, pretrained_cfg=cfg.to_dict(), **extra, **kwargs)


def _entry(variant: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return _create(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__module__ = __name__
    entry.__doc__ = f"ResNet-38 {variant!r} (widedeep); see widedeep.models.timm_compat."
    return entry


def register() -> list[str]:
    """Register every plain name and alias with timm (overwrites nothing timm already has). Idempotent."""
    done = []
    for variant in list(PLAIN_NAMES) + list(ALIASES):
        fn = model_entrypoint(variant) if is_model(variant) else None
        if fn is not None and getattr(fn, "__module__", None) != __name__:
            continue  # a timm model of that name exists: leave it
        if fn is None:
            fn = _entry(variant)
            globals()[variant] = fn
            register_model(fn)
        done.append(variant)
    return done
