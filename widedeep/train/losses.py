"""The training loss: cross-entropy for classification, the seed's OHEM ("bootstrapping") softmax loss with
label subsampling for segmentation, in one definition for the eager step and the CUDA-graph step."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .distributed import global_mean_count

IGNORE = 255


def labels_at_feature_resolution(label: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """The seed's ``label[4::8, 4::8]``: score cell i sits over pixel ``stride * i + stride // 2``. (N, H, W)."""
    return label[:, stride // 2 :: stride, stride // 2 :: stride]


def cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the pixel cross-entropies, number of valid pixels) of this process's batch: the caller divides by
    the count over all processes, so that N processes weight every pixel as one process does."""
    nll = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return nll.sum(), (target != ignore_index).sum()


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    thresh: float = 0.6,
    min_kept: int = 256,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
):
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
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(target.shape)} differ in size; "
            "subsample labels (labels_at_feature_resolution) or upsample logits first"
        )
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


def training_loss(
    task: str,
    out: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_resolution: str = "feature",
    ohem: bool = True,
    stride: int = 8,
    ohem_sum: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's loss and (correct, counted) for the running training accuracy (seg: the seed's ``fcn_valid``).

    cls: cross-entropy of (N, C) scores against (N,) labels; hits = (top-1 hits, N). seg: labels (N, H, W)
    subsampled to the (N, C, h, w) scores (``loss_resolution="feature"``, the seed's ``[4::8]``) or the scores
    upsampled to the labels ("full"); OHEM (or plain) cross-entropy ignoring 255, as a per-process sum over the
    mean count over processes: after DDP averages the ranks' gradients every valid pixel of the global batch has
    the weight it has in one process (OHEM still selects per process); hits = (correct valid pixels, valid pixels).
    hits is an int64 (2,) tensor on the scores' device. ``ohem_sum(logits, target, reduction="sum")``: the OHEM
    selection, :func:`ohem_cross_entropy` by default; the ``--cuda-graphs`` step passes its capture-safe twin
    (``graphs.ohem_cross_entropy_static``: no host read, fixed shapes).
    """
    if task == "cls":
        loss = F.cross_entropy(out.float(), y)
        return loss, torch.stack([(out.argmax(1) == y).sum(), torch.full((), y.numel(), device=y.device)])
    if loss_resolution == "feature":
        y = labels_at_feature_resolution(y, stride)
        if y.shape[-2:] != out.shape[-2:]:
            raise ValueError(
                f"labels {tuple(y.shape[-2:])} vs scores {tuple(out.shape[-2:])}: the crop must be a "
                "multiple of 8 (it is rounded up for you) and the model output stride 8"
            )
    else:
        out = F.interpolate(out.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
    if not ohem:
        total, count = cross_entropy_sum(out, y)
    else:
        total, count = (ohem_sum or ohem_cross_entropy)(out, y, reduction="sum")
    loss = total / global_mean_count(count).to(total.dtype)
    valid = y != IGNORE
    return loss, torch.stack([((out.argmax(1) == y) & valid).sum(), valid.sum()])
