"""Epoch order and sharding shared by both backends: exact coverage, disjoint shards, reproducible."""

from __future__ import annotations

import numpy as np


def epoch_indices(
    n: int, *, epoch: int, seed: int, shuffle: bool, shard_id: int = 0, num_shards: int = 1, even: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices this shard visits in ``epoch`` and a bool mask of which are real (not padding).

    Shards take every ``num_shards``-th element of one global permutation, so together they cover each sample
    exactly once. ``even=True`` pads short shards with the first samples of the permutation (marked not
    real) so that every rank runs the same number of steps, which DDP training needs.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
    perm = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5EED]).permutation(n) if shuffle else np.arange(n)
    mine = perm[shard_id::num_shards]
    real = np.ones(len(mine), bool)
    per_shard = -(-n // num_shards)
    if even and len(mine) < per_shard:
        pad = perm[: per_shard - len(mine)]
        mine, real = np.concatenate([mine, pad]), np.concatenate([real, np.zeros(len(pad), bool)])
    return mine, real
