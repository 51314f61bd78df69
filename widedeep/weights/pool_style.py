"""The max-pool style a Model A/A2 weights file needs, decided from its content (never its name)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .read import WeightsFile, metadata_of, suffix
from .released import RELEASED_MODEL_A, is_released_model_a

POOL_STYLES = ("mxnet", "caffe", "ceil")


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
    metadata = wf.metadata if wf else metadata_of(path)
    style = metadata.get("pool_style")
    if style in POOL_STYLES:
        return style, f"recorded in {Path(path).name}'s metadata"
    if variant in (None, "a") and suffix(path) == ".params" and is_released_model_a(path):
        return "caffe", (
            f"{Path(path).name} has the md5 of the released {RELEASED_MODEL_A}, whose accuracy "
            "needs caffe-style (pad 0) pools"
        )
    return "mxnet", (
        f"default: {Path(path).name} records no pool style and is not the released Model A (by md5)"
        if variant in (None, "a") and suffix(path) == ".params"
        else f"default: {Path(path).name} records no pool style"
    )
