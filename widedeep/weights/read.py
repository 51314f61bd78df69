"""Reading weights files into our state_dict keys: format sniffing, the readers, dtype checks, BN conventions.

``.params``/``.npz`` (ademxapp, :mod:`.mxnet_params` + :mod:`.mapping`), ``.safetensors``, and torch checkpoints
(``.pth``/``.pt``/``.pth.tar``; containers and Mapillary/NVIDIA layouts in :mod:`.lineages`). Every reader
returns a :class:`WeightsFile`; errors name the file and what was expected.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from .errors import WeightsFormatError, WeightsMismatchError, trim_names
from .lineages import (
    INPLACE_ABN_EPS,
    MAPILLARY_LAYOUTS,
    PLAIN_LAYOUTS,
    check_convention,
    inplace_abn_gammas,
    state_from_checkpoint,
)
from .mapping import UnknownNameError, ademxapp_to_key, is_segmentation_file
from .mxnet_params import read_params
from .released import check_released

log = logging.getLogger("widedeep.weights")  # one logger for the package (its messages predate the split)
PTH_META = "widedeep"  # key of our entry in a saved state_dict's ``_metadata`` (torch's own per-module dict)


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


def suffix(path: str | os.PathLike) -> str:
    """The format suffix of a weights file name, lower-case (``.pth.tar`` as one suffix)."""
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
    ours = (getattr(inner, "_metadata", None) or {}).get(PTH_META)
    if isinstance(ours, dict):
        metadata = {str(k): str(v) for k, v in ours.items()}
    return obj, metadata


def read_weights(
    path: str | os.PathLike, *, verify: bool | str = True, weights_convention: str | None = None
) -> WeightsFile:
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
                    "they were trained (a wrong export or conversion?)"
                )
            if t.dtype == torch.float64:
                doubles.append(key)
                t = t.float()
        out[key] = t
    if doubles:
        log.warning("%s: %d float64 tensors cast to float32 (%s)", path, len(doubles), trim_names(doubles))
    return out


def _read_weights(path: str, verify: bool | str) -> WeightsFile:
    wf = _read_weights_unchecked(path, verify)
    return replace(wf, state=checked_dtypes(wf.state, path))


def _read_weights_unchecked(path: str, verify: bool | str) -> WeightsFile:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    if Path(path).is_dir():
        raise WeightsFormatError(
            f"{path}: a folder, expected a weights file (.params, .safetensors, .pth, .pt or .pth.tar)"
        )
    ext = suffix(path)
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
                + (" ..." if len(unknown) > 10 else ""),
                path=path,
                unexpected=unknown,
            )
        return WeightsFile(path, out, {}, checksum, layout="ademxapp")
    if ext in (".safetensors", ".pth", ".pt", ".pth.tar"):
        obj, metadata = _read_safetensors(path) if ext == ".safetensors" else _read_pth(path)
        state, skipped, layout = state_from_checkpoint(obj, path)
        return WeightsFile(path, state, metadata, layout=layout, skipped=skipped)
    raise WeightsFormatError(
        f"{path}: unknown weights format {ext!r}: expected .params, .safetensors, .pth, .pt or .pth.tar"
    )


def read_state_dict(
    path: str | os.PathLike, *, verify: bool | str = True, weights_convention: str | None = None
) -> dict[str, torch.Tensor]:
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
            log.warning(
                "%s: a Mapillary InPlace-ABN checkpoint (%s layout); its BN gammas are used as plain "
                "BatchNorm gammas. A file saved from InPlaceABN modules (Mapillary's ImageNet and Vistas "
                "files) normalises with |gamma| + eps: pass weights_convention='inplace_abn' for it, "
                "weights_convention='plain' to keep the values and silence this",
                wf.path,
                wf.layout,
            )
        return wf
    if convention == wf.convention:
        return wf
    if wf.convention == "inplace_abn":  # |gamma| cannot be undone
        raise ValueError(
            f"{wf.path}: its gammas were already converted (weights_convention='inplace_abn'); read the "
            f"file again for weights_convention={convention!r}"
        )
    if convention == "plain":
        return replace(wf, convention="plain")
    if wf.layout in PLAIN_LAYOUTS:
        raise WeightsFormatError(
            f"{wf.path}: weights_convention='inplace_abn' converts the BN gammas of Mapillary InPlace-ABN checkpoints "
            f"(mod<L>.block<k> keys), but {name} has {wf.layout} keys, whose BatchNorms are plain: drop the option "
            "(or pass weights_convention='plain')"
        )
    if wf.layout == "nvidia":
        log.warning(
            "%s: NVIDIA's re-keyed checkpoints (BN as Sequential(BatchNorm2d, ReLU)) hold plain BatchNorm "
            "gammas, for which weights_convention='plain' is right; converting to |gamma| + eps as asked",
            wf.path,
        )
    log.info("%s: BN gammas -> |gamma| + %g (InPlace-ABN convention)", wf.path, INPLACE_ABN_EPS)
    return replace(wf, state=inplace_abn_gammas(wf.state), convention="inplace_abn")


def metadata_of(path: str) -> dict[str, str]:
    """Our writers' metadata of a ``.safetensors`` / ``.pth`` file (``{}`` for other formats)."""
    ext = suffix(path)
    if ext == ".safetensors":
        return _read_safetensors(path)[1]
    if ext in (".pth", ".pt", ".pth.tar"):
        return _read_pth(path)[1]
    return {}
