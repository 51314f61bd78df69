"""Model names: the seed's labels (``cityscapes_rna-a1_cls19_s8_x1-140``), the plain names and their constructor
arguments.

A leaf (imports nothing from widedeep): :mod:`.factory` (``create_model``), :mod:`.timm_compat` and the trainer
read the names from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def list_models() -> list[str]:
    return sorted(PLAIN_NAMES) + sorted(ALIASES)
