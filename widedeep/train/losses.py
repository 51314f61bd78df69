"""Segmentation losses: the seed's OHEM ("bootstrapping") softmax loss and label subsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def labels_at_feature_resolution(label: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """The seed's ``label[4::8, 4::8]``: score cell i sits over pixel ``stride * i + stride // 2``. (N, H, W)."""
    return label[:, stride // 2::stride, stride // 2::stride]


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, *,
                      ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the pixel cross-entropies, number of valid pixels) of this process's batch: the caller divides by
    the count over all processes, so that N processes weight every pixel as one process does."""
    nll = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return nll.sum(), (target != ignore_index).sum()


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.6, min_kept: int = 256,
                       ignore_index: int = IGNORE, reduction: str = "mean"):
    """Mean cross-entropy over the hard pixels of this (per-device) batch, as ademxapp's ``ohem_softmax``.

    Valid pixels (label != ignore) whose ground-truth probability is <= ``thresh`` are kept; the threshold is
    raised to the ``min_kept``-th smallest probability when fewer would be kept; with at most ``min_kept``
    valid pixels all are kept. logits (N, C, H, W) any float dtype (computed in fp32), target (N, H, W) int64.
    ``reduction="sum"`` returns (sum over the kept pixels, their count) instead of the mean (the trainer
    normalises by the count over all processes; the selection, ``min_kept`` included, stays per process).
    """
    total, kept = _ohem_sum(logits, target, thresh, min_kept, ignore_index)
    if reduction == "sum":
        return total, kept
    return total / kept.clamp(min=1)


def _ohem_sum(logits, target, thresh, min_kept, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(target.shape)} differ in size; "
                         "subsample labels (labels_at_feature_resolution) or upsample logits first")
    nll = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    n = int(valid.sum())
    if n == 0:  # a zero that still reaches every logit (backward and DDP's gradient hooks need a graph)
        return logits.sum() * 0.0, valid.sum()
    with torch.no_grad():
        keep = valid
        if n > min_kept:
            prob = torch.exp(-nll.detach())
            kth = prob[valid].kthvalue(min_kept).values
            keep = valid & (prob <= torch.clamp(kth, min=thresh))
    return nll[keep].sum(), keep.sum()
