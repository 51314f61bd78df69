"""Device-independent activation-memory accounting: bytes of tensors saved for backward."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_tensor_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Run ``forward()`` and count the bytes of every tensor autograd saves for backward.

    Each storage is counted once (a tensor saved by two ops, or views of one buffer, cost one storage).
    Storages of ``exclude`` (pass the model's parameters: they exist anyway) are not counted.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
