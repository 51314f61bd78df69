"""Atomic training checkpoints (``last``, ``best``, recovery) and the seed's ``<label>_ep-NNNN.params`` exports.

Checkpoints hold tensors and plain Python values only (dicts, lists, tuples, str, int, float, bool, None), so
:func:`load` reads them with ``torch.load(weights_only=True)``: a crafted ``last.pt`` (a pickle whose
``__reduce__`` calls ``os.system``) is refused without running anything. The numpy RNG state, which
``np.random.get_state()`` returns as a tuple holding an ndarray, is stored as a dict with an int64 tensor.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from widedeep.fileio import atomic_open


def rng_state() -> dict:
    """The RNG states of this process as tensors and plain values (loadable with ``weights_only=True``)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    """``np.random.get_state(legacy=False)`` with the MT19937 key (uint32[624]) as an int64 tensor."""
    st = np.random.get_state(legacy=False)
    inner = st["state"]
    return {
        "bit_generator": st["bit_generator"],
        "key": torch.from_numpy(inner["key"].astype(np.int64)),
        "pos": int(inner["pos"]),
        "has_gauss": int(st["has_gauss"]),
        "gauss": float(st["gauss"]),
    }


def _set_numpy_state(state) -> None:
    if isinstance(state, dict):  # ours
        np.random.set_state(
            {
                "bit_generator": state["bit_generator"],
                "state": {"key": state["key"].numpy().astype(np.uint32), "pos": state["pos"]},
                "has_gauss": state["has_gauss"],
                "gauss": state["gauss"],
            }
        )
    else:  # a checkpoint written before the dict form: np.random.get_state()'s legacy tuple
        np.random.set_state(tuple(state))


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save, atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_after(), atomic_open(path) as f:
        torch.save(payload, f)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before SIGKILL), handled like Ctrl-C; the command exits with status 143."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (as SIGINT raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) or SIGTERM until the block is done, then raise KeyboardInterrupt (or
    :class:`Terminated`).

    A KeyboardInterrupt inside torch.save leaves its zip writer half-written, and closing it raises a
    RuntimeError that replaces the interrupt: a traceback instead of the trainer's resume hint. A SIGTERM is
    held only when something handles it (:func:`sigterm_as_interrupt`); by default it ends the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = [signal.SIGINT] + (
        [signal.SIGTERM] if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None) else []
    )
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if signal.SIGTERM in caught:
        raise Terminated
    if caught:
        raise KeyboardInterrupt


# Checkpoints written before the RNG state became tensors hold np.random.get_state()'s tuple, whose uint32[624]
# key pickles as numpy._core.multiarray._reconstruct(numpy.ndarray, ...), numpy.dtype("u4") and two __setstate__
# calls. Those names are allow-listed for our own stand-ins below, never numpy's callables: the stand-ins accept
# exactly that array (little-endian uint32, 1-D, its bytes) and nothing else, so no other object can be built.
class _LegacyDtype:
    def __init__(self, spec, align=False, copy=True):
        if spec != "u4":
            raise pickle.UnpicklingError(f"numpy dtype {spec!r}: only uint32 (an RNG state) is accepted")

    def __setstate__(self, state):
        if tuple(state)[:2] != (3, "<") or any(v is not None for v in tuple(state)[2:5]):
            raise pickle.UnpicklingError("numpy dtype: only plain little-endian uint32 is accepted")


class _LegacyArray:
    array: np.ndarray | None = None

    def __setstate__(self, state):
        version, shape, dtype, fortran, raw = state
        if not (
            isinstance(dtype, _LegacyDtype)
            and isinstance(raw, bytes)
            and len(shape) == 1
            and len(raw) == 4 * shape[0]
            and not fortran
        ):
            raise pickle.UnpicklingError("numpy array: only a 1-D uint32 array (an RNG state) is accepted")
        self.array = np.frombuffer(raw, dtype="<u4").copy()


def _legacy_reconstruct(subtype, shape, dtype):
    if subtype is not _LegacyArray:
        raise pickle.UnpicklingError("numpy _reconstruct: only an ndarray is accepted")
    return _LegacyArray()


_LEGACY_NUMPY_GLOBALS = [
    (_legacy_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_legacy_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy < 2 wrote this name
    (_LegacyDtype, "numpy.dtype"),
    (_LegacyArray, "numpy.ndarray"),
]


def _unwrap_legacy(obj):
    """The checkpoint with each :class:`_LegacyArray` replaced by its numpy array."""
    if isinstance(obj, _LegacyArray):
        if obj.array is None:
            raise pickle.UnpicklingError("numpy array without data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _unwrap_legacy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap_legacy(v) for v in obj)
    return obj


def _refused(path: Path, e: Exception) -> str:
    """Why torch.load(weights_only=True) refused ``path``, in one line."""
    msg = " ".join(str(e).split())
    m = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", msg)
    if m:
        return (
            f"--resume {path}: refused: the file holds Python objects ({m.group(1)}) that a widedeep training "
            "checkpoint never holds; nothing from it was run or loaded (a foreign or tampered file?)"
        )
    first = msg.split(" Check the documentation")[0].replace("Weights only load failed. ", "")
    return f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {first[:300]})"


def load(path: str | os.PathLike) -> dict:
    """A training checkpoint read with ``weights_only=True`` (see the module docstring); a refused, unreadable or
    foreign file raises ValueError with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ckpt, dict) and "rng" in ckpt:
            ckpt["rng"] = _unwrap_legacy(ckpt["rng"])
    except Exception as e:
        raise ValueError(_refused(path, e)) from None
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"--resume {path}: not a widedeep training checkpoint (a {type(ckpt).__name__}, "
            "expected the dict that last.pt holds)"
        )
    missing = {"model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng"} - set(ckpt)
    if missing:
        raise ValueError(f"--resume {path}: not a widedeep training checkpoint (missing {sorted(missing)})")
    return ckpt


def load_model(model: torch.nn.Module, ck: dict, path: str | os.PathLike, *, label: str, width: float) -> None:
    """``ck["model"]`` into ``model`` after checking that it fits: a checkpoint of another ``--width`` or
    ``--model`` is one line saying which flag to change (not torch's list of hundreds of keys)."""
    state = ck["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--resume {path}: not a widedeep training checkpoint (its 'model' is not a state_dict)")
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [k for k in state if k in target and state[k].shape != target[k].shape]
    if not (missing or unexpected or mis_shaped):
        model.load_state_dict(state)
        return
    args = ck.get("args") if isinstance(ck.get("args"), dict) else {}
    their_width, their_label = args.get("width"), ck.get("label")
    if isinstance(their_label, str) and their_label != label:
        hint = f"it is a {their_label} checkpoint, this run --model {label}: use --model {their_label}"
    elif isinstance(their_width, (int, float)) and their_width != width:
        hint = f"it is a width-{their_width:g} net, this run --width {width:g}: add --width {their_width:g}"
    else:
        first = (mis_shaped + missing + unexpected)[0]
        hint = (
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mis_shaped)} mis-shaped entries "
            f"(first: {first})"
        )
    raise ValueError(f"--resume {path}: the checkpoint's model does not fit this run: {hint}")


def epoch_params_path(output: str | os.PathLike, label: str, epoch: int) -> Path:
    """The seed's per-epoch weights name, usable as ``--weights`` by the next stage."""
    return Path(output) / f"{label}_ep-{epoch:04d}.params"
