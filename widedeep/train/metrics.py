"""Dataset-level metrics that all-reduce exactly across ranks: confusion matrices and top-k counts."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class ConfusionMatrix:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; targets outside [0, C) are ignored.

    Scores follow the seed's ``ScoreUpdater`` and the VOC/ADE/Cityscapes convention: pixel accuracy =
    trace / sum; mean accuracy = mean of per-class recall; IoU_c = TP / (TP + FP + FN); mIoU = mean over classes
    that occur in the ground truth or the prediction (a class absent from both is NaN and skipped).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        valid = (target >= 0) & (target < n)
        idx = target[valid].long() * n + pred[valid].long().to(target.device)
        self.mat += torch.bincount(idx, minlength=n * n).view(n, n).to(self.mat.device)

    def all_reduce(self) -> "ConfusionMatrix":
        _all_reduce(self.mat)
        return self

    def scores(self) -> dict:
        m = self.mat.double()
        tp, gt, pred = m.diag(), m.sum(1), m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        total = m.sum().item()
        return {
            "pixel_acc": tp.sum().item() / total if total else math.nan,
            "mean_acc": torch.nanmean(recall).item(),
            "miou": torch.nanmean(iou).item(),
            "iou": iou.tolist(),
        }


class TopK:
    """Top-1 / top-5 correct counts over a dataset; error = 1 - accuracy (the seed reports errors)."""

    def __init__(self, device: torch.device | str = "cpu", ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self.counts = torch.zeros(len(ks) + 1, dtype=torch.float64, device=device)  # [correct@k..., n]

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        k = min(max(self.ks), probs.shape[1])
        top = probs.topk(k, dim=1).indices
        hit = top == target.view(-1, 1).to(top.device)
        for j, kk in enumerate(self.ks):
            self.counts[j] += hit[:, :kk].any(1).sum().to(self.counts)
        self.counts[-1] += len(target)

    def all_reduce(self) -> "TopK":
        _all_reduce(self.counts)
        return self

    def scores(self) -> dict:
        n = self.counts[-1].item()
        out = {}
        for j, k in enumerate(self.ks):
            acc = self.counts[j].item() / n if n else math.nan
            out[f"acc{k}"], out[f"err{k}"] = acc, 1 - acc
        out["count"] = int(n)
        return out
