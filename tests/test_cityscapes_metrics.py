"""Our Cityscapes scores equal the official cityscapesscripts evaluator on the same generated files."""

import math

import numpy as np
import pytest
from PIL import Image

from widedeep.train.cityscapes_metrics import CityscapesScores

cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 calls np.in1d, removed in numpy 2.4
    np.in1d = lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert)


def test_scores_equal_cityscapesscripts(synthetic_root, tmp_path):
    root = synthetic_root("cityscapes")
    gts = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    rng = np.random.default_rng(0)
    ours = CityscapesScores()
    preds = []
    valid_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    for _k, gt_path in enumerate(gts):
        gt = np.asarray(Image.open(gt_path))
        inst = np.asarray(Image.open(str(gt_path).replace("labelIds", "instanceIds")))
        pred = gt.copy()
        h, w = gt.shape
        for _ in range(4):  # wrong blocks, sometimes a void / ignored label
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            pred[y : y + rng.integers(4, h // 2), x : x + rng.integers(4, w // 2)] = rng.choice(valid_ids + [0, 9, 29])
        path = tmp_path / f"{gt_path.name.replace('_gtFine_labelIds', '_pred')}"
        Image.fromarray(pred).save(path)
        preds.append(str(path))
        ours.update(pred, gt, inst)
    args = cs.args
    args.quiet, args.JSONOutput, args.evalPixelAccuracy = True, False, False
    args.evalInstLevelScore = True
    ref = cs.evaluateImgLists(preds, [str(g) for g in gts], args)
    got = ours.scores()
    for key in (
        "averageScoreClasses",
        "averageScoreInstClasses",
        "averageScoreCategories",
        "averageScoreInstCategories",
    ):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    for group in ("classScores", "classInstScores", "categoryScores", "categoryInstScores"):
        for name, v in ref[group].items():
            assert (math.isnan(v) and math.isnan(got[group][name])) or got[group][name] == pytest.approx(v), (
                group,
                name,
            )
    assert not math.isnan(got["averageScoreInstClasses"])  # the synthetic GT has instances
