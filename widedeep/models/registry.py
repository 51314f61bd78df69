"""Model names: the seed's labels (``cityscapes_rna-a1_cls19_s8_x1-140``), plain names, and timm registration."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .resnet38 import ResNet38

if TYPE_CHECKING:  # read_weights' result; widedeep.weights is imported lazily
    from widedeep.weights import WeightsFile

log = logging.getLogger(__name__)

# dataset -> (task, default classes)
DATASETS: dict[str, tuple[str, int]] = {
    "ilsvrc-cls": ("classification", 1000),
    "places": ("classification", 365),
    "voc": ("segmentation", 21),
    "cityscapes": ("segmentation", 19),
    "ade20k": ("segmentation", 150),
    "coco": ("segmentation", 81),
    "pascal-context": ("segmentation", 60),
}
SEGMENTATION_DROPOUT = (0.3, 0.5)
MAPILLARY_OPTIONS: dict[str, Any] = dict(activation="leaky_relu", activation_param=0.01, bn_eps=1e-5)

_LABEL = re.compile(
    r"^(?P<dataset>[a-z0-9\-]+)_(?P<net>[a-z]+)-(?P<variant>[a-z0-9]+)_cls(?P<classes>\d+)"
    r"(?:_s(?P<stride>\d+)(?=_|$))?(?:_(?P<extra>.+))?$"
)
_EPOCH = re.compile(r"_ep-(\d+)$")

# plain name -> constructor arguments
PLAIN_NAMES: dict[str, dict[str, Any]] = {
    "resnet38_a": dict(variant="a", num_classes=1000, output_stride=32),
    "resnet38_a1": dict(variant="a1", num_classes=1000, output_stride=32),
    "resnet38_a2": dict(variant="a2", num_classes=1000, output_stride=32),
    # The stride-8 A1 trunk of the weakly-supervised segmentation repos (psa network/resnet38d.py).
    # forward() returns relu(bn7) features (N, 4096, H/8, W/8), like psa's Net.
    "resnet38d": dict(variant="a1", num_classes=0, output_stride=8, dropout=SEGMENTATION_DROPOUT, segmentation=True),
    # Mapillary InPlace-ABN's classes under their own names (the NVIDIA/semantic-segmentation lineage): leaky ReLU
    # 0.01 and BN eps 1e-5 as their checkpoints were trained. wider_resnet38 = their WiderResNet = our Model A
    # (pad-1 pools); wider_resnet38_a2 = their WiderResNetA2 = our A2 topology, whose dilated form
    # (output_stride=8) also dilates unit 5a's first 3x3. Not ademxapp weights: see the README's lineage table.
    "wider_resnet38": dict(variant="a", num_classes=1000, output_stride=32, **MAPILLARY_OPTIONS),
    "wider_resnet38_a2": dict(variant="a2", num_classes=1000, output_stride=32, dilate_first_conv=True,
                              **MAPILLARY_OPTIONS),
}
ALIASES = {"wider_resnet38_a1": "resnet38_a1", "resnet38_a1_s8": "resnet38d"}


@dataclass(frozen=True)
class ModelLabel:
    """A parsed ademxapp model label ``<dataset>_rna-<a|a1|a2>_cls<N>[_s<8|16|32>][_<anything>]``."""

    dataset: str
    variant: str
    num_classes: int
    output_stride: int | None
    extra: str | None

    @property
    def task(self) -> str:
        return DATASETS[self.dataset][0]

    @property
    def label(self) -> str:
        s = f"{self.dataset}_rna-{self.variant}_cls{self.num_classes}"
        s += f"_s{self.output_stride}" if self.output_stride else ""
        return s + (f"_{self.extra}" if self.extra else "")


def parse_label(label: str) -> ModelLabel:
    """Parse a seed label, or a weights file name ``<label>_ep-NNNN.params``, like ademxapp does."""
    name = Path(label).name
    for ext in (".params", ".safetensors", ".pth", ".pt"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    name = _EPOCH.sub("", name)
    m = _LABEL.match(name)
    if not m:
        raise ValueError(
            f"model label {label!r} is not of the form <dataset>_rna-<a|a1|a2>_cls<N>[_s<8|16|32>][_<anything>] "
            f"(e.g. voc_rna-a1_cls21_s8) nor a plain name ({', '.join(sorted(PLAIN_NAMES))})"
        )
    if m["net"] != "rna":
        raise ValueError(f"model label {label!r}: only the 'rna' (ResNet-38) family exists here, not {m['net']!r}")
    if m["variant"] not in ("a", "a1", "a2"):
        raise ValueError(f"model label {label!r}: variant must be a, a1 or a2, not {m['variant']!r}")
    if m["dataset"] not in DATASETS:
        raise ValueError(f"model label {label!r}: unknown dataset {m['dataset']!r}; known: {', '.join(DATASETS)}")
    stride = int(m["stride"]) if m["stride"] else None
    if stride not in (None, 8, 16, 32):
        raise ValueError(f"model label {label!r}: output stride _s{stride} must be _s8, _s16 or _s32")
    return ModelLabel(m["dataset"], m["variant"], int(m["classes"]), stride, m["extra"])


def model_args(name: str, *, num_classes: int | None = None, output_stride: int | None = None) -> dict[str, Any]:
    """Constructor arguments of :class:`ResNet38` for a plain name or a seed label."""
    key = ALIASES.get(name, name)
    if key in PLAIN_NAMES:
        args = {"segmentation": False, **PLAIN_NAMES[key]}
    else:
        lab = parse_label(name)
        seg = lab.task == "segmentation"
        stride = output_stride or lab.output_stride
        if stride is None:
            if seg:
                raise ValueError(
                    f"model label {name!r} names a segmentation dataset but has no output stride: ademxapp silently "
                    "built a stride-32 net here (ademxapp issue #16, 56% mIoU). Add _s8 to the label (on the command "
                    f"line: --model {lab.dataset}_rna-{lab.variant}_cls{lab.num_classes}_s8) or pass output_stride=8."
                )
            stride = 32
        args = dict(variant=lab.variant, num_classes=lab.num_classes, output_stride=stride, segmentation=seg)
        if seg:
            args["dropout"] = SEGMENTATION_DROPOUT
    if num_classes is not None:
        args["num_classes"] = num_classes
    if output_stride is not None:
        args["output_stride"] = output_stride
    return args


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
        from widedeep.weights import pool_style_of, read_weights

        from widedeep.weights import WeightsFile, with_convention

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
        from widedeep.weights import load_weights, num_classes_of

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
    from widedeep.weights.lineages import MAPILLARY_LAYOUTS

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


def list_models() -> list[str]:
    return sorted(PLAIN_NAMES) + sorted(ALIASES)
