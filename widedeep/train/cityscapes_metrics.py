"""The official Cityscapes pixel-level scores (class / category IoU and iIoU) on labelId maps, all-reducible.

Same algorithm as ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` (tested against it): a
confusion matrix over labelIds; FP counts only pixels whose ground truth is not ignoreInEval; iIoU weights each
ground-truth instance's TP/FN by ``avgClassSize / instance size``; averages skip NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data_pipes.labels import CITYSCAPES_LABELS

from .metrics import _all_reduce

AVG_CLASS_SIZE = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
_BY_ID = {row[1]: row for row in CITYSCAPES_LABELS}
N_IDS = max(_BY_ID) + 1  # 34
IGNORED = np.array([_BY_ID[i][6] for i in range(N_IDS)])
CATEGORIES = list(dict.fromkeys(row[3] for row in CITYSCAPES_LABELS))
# categories whose labels all have instances (human, vehicle); their labelIds include ignoreInEval ones
INST_CATEGORIES = {
    c: [r[1] for r in CITYSCAPES_LABELS if r[3] == c]
    for c in CATEGORIES
    if all(r[5] for r in CITYSCAPES_LABELS if r[3] == c)
}
INST_CLASSES = [r[1] for r in CITYSCAPES_LABELS if r[5] and not r[6]]


class CityscapesScores:
    def __init__(self):
        self.conf = np.zeros((N_IDS, N_IDS), np.int64)
        # per instance label / category: tp, fn, tp weighted, fn weighted
        self.inst = np.zeros((N_IDS, 4))
        self.cat = np.zeros((len(CATEGORIES), 4))

    def update(self, pred: np.ndarray, gt: np.ndarray, instances: np.ndarray | None = None) -> None:
        """pred, gt: (H, W) labelIds; instances: (H, W) instanceIds (labelId * 1000 + k) or None (no iIoU)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        if gt.max() >= N_IDS or pred.max() >= N_IDS:
            raise ValueError(f"labelIds must be < {N_IDS}")
        self.conf += np.bincount(gt.astype(np.int64).ravel() * N_IDS + pred.ravel(), minlength=N_IDS * N_IDS).reshape(
            N_IDS, N_IDS
        )
        if instances is None:
            return
        cat_masks = {c: np.isin(pred, ids) for c, ids in INST_CATEGORIES.items()}
        for inst in np.unique(instances[instances > 1000]):
            label_id = int(inst // 1000)
            name, _, _, category, _, _, ignored, _ = _BY_ID[label_id]
            if ignored:
                continue
            mask = instances == inst
            size = int(mask.sum())
            tp = int((pred[mask] == label_id).sum())
            w = AVG_CLASS_SIZE[name] / size
            self.inst[label_id] += (tp, size - tp, tp * w, (size - tp) * w)
            if category in cat_masks:
                ctp = int((mask & cat_masks[category]).sum())
                self.cat[CATEGORIES.index(category)] += (ctp, size - ctp, ctp * w, (size - ctp) * w)

    def all_reduce(self, device: str | torch.device = "cpu") -> "CityscapesScores":
        for name in ("conf", "inst", "cat"):
            t = torch.from_numpy(getattr(self, name)).to(device)
            setattr(self, name, _all_reduce(t).cpu().numpy())
        return self

    def _fp(self, columns: list[int], exclude_rows) -> float:
        rows = [i for i in range(N_IDS) if not IGNORED[i] and i not in exclude_rows]
        return float(self.conf[np.ix_(rows, columns)].sum())

    def scores(self) -> dict:
        c = self.conf
        cls, cls_inst, cat, cat_inst = {}, {}, {}, {}
        for i in range(N_IDS):
            name = _BY_ID[i][0]
            if IGNORED[i]:
                cls[name] = cls_inst[name] = math.nan
                continue
            tp, fn, fp = float(c[i, i]), float(c[i].sum() - c[i, i]), self._fp([i], {i})
            cls[name] = tp / (tp + fp + fn) if tp + fp + fn else math.nan
            if i in INST_CLASSES:
                wtp, wfn = self.inst[i, 2], self.inst[i, 3]
                cls_inst[name] = wtp / (wtp + fp + wfn) if wtp + fp + wfn else math.nan
            else:
                cls_inst[name] = math.nan
        for k, category in enumerate(CATEGORIES):
            ids = [r[1] for r in CITYSCAPES_LABELS if r[3] == category and not r[6]]
            if not ids:
                cat[category] = cat_inst[category] = math.nan
                continue
            tp = float(c[np.ix_(ids, ids)].sum())
            fn = float(c[ids].sum()) - tp
            in_cat = {r[1] for r in CITYSCAPES_LABELS if r[3] == category}
            fp = self._fp(ids, in_cat)
            cat[category] = tp / (tp + fp + fn) if tp + fp + fn else math.nan
            if category in INST_CATEGORIES:
                fp_i = self._fp(INST_CATEGORIES[category], in_cat)
                wtp, wfn = self.cat[k, 2], self.cat[k, 3]
                cat_inst[category] = wtp / (wtp + fp_i + wfn) if wtp + fp_i + wfn else math.nan
            else:
                cat_inst[category] = math.nan

        def avg(d):
            v = [x for x in d.values() if not math.isnan(x)]
            return sum(v) / len(v) if v else math.nan

        return {
            "classScores": cls,
            "classInstScores": cls_inst,
            "categoryScores": cat,
            "categoryInstScores": cat_inst,
            "averageScoreClasses": avg(cls),
            "averageScoreInstClasses": avg(cls_inst),
            "averageScoreCategories": avg(cat),
            "averageScoreInstCategories": avg(cat_inst),
        }
