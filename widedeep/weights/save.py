"""Writing weights atomically: ``.params`` (ademxapp names), ``.safetensors`` and ``.pth`` with our metadata."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
import torch.nn as nn

from widedeep.fileio import atomic_open, atomic_write_bytes

from .mapping import key_to_ademxapp, num_classes_of
from .mxnet_params import write_params
from .pool_style import POOL_STYLES
from .read import PTH_META, suffix

log = logging.getLogger("widedeep.weights")  # one logger for the package (its messages predate the split)


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
    ext = suffix(path)
    if ext == ".params":
        pooled = getattr(source, "variant", None) in ("a", "a2")
        if meta.get("pool_style", "mxnet") != "mxnet" and (pooled or not isinstance(source, nn.Module)):
            log.warning(
                "%s: .params files cannot record pool_style=%r; load it with pool_style=%r (on the command "
                "line: --pool-top-infer-style %s), or save as .safetensors",
                path,
                meta["pool_style"],
                meta["pool_style"],
                meta["pool_style"],
            )
        write_params(path, to_ademxapp(state), fmt=params_format)
    elif ext == ".safetensors":
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
    elif ext in (".pth", ".pt"):
        out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
        out._metadata = OrderedDict(getattr(state, "_metadata", None) or {})  # type: ignore[attr-defined]
        if meta:
            out._metadata[PTH_META] = meta  # type: ignore[attr-defined]
        with atomic_open(path) as f:
            torch.save(out, f)
    else:
        raise ValueError(f"{path}: unknown weights format {ext!r}: expected .params, .safetensors or .pth")
