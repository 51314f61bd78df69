"""Atomic training checkpoints (``last``, ``best``, recovery) and the seed's ``<label>_ep-NNNN.params`` exports."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from widedeep.fileio import atomic_open


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save, atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_after(), atomic_open(path) as f:
        torch.save(payload, f)


@contextlib.contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    A KeyboardInterrupt inside torch.save leaves its zip writer half-written, and closing it raises a
    RuntimeError that replaces the interrupt: a traceback instead of the trainer's resume hint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"--resume {path}: not a readable checkpoint ({e})") from None
    missing = {"model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng"} - set(ckpt)
    if missing:
        raise ValueError(f"--resume {path}: not a widedeep training checkpoint (missing {sorted(missing)})")
    return ckpt


def epoch_params_path(output: str | os.PathLike, label: str, epoch: int) -> Path:
    """The seed's per-epoch weights name, usable as ``--weights`` by the next stage."""
    return Path(output) / f"{label}_ep-{epoch:04d}.params"
