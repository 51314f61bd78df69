"""The augmentation recipes (data_pipes/recipes.py) against the seed's rules, recomputed here independently.

The backends only execute the drawn parameters, so the parameters themselves must be the seed's. Each expected
value below is computed from the rule as the seed states it (issegm/data.py ``FileIter._read``; spec §9.2 and
§10.2), with the seed's own expressions, never by calling the code under test. The draws come
from the same per-sample stream (``np.random.default_rng([seed, epoch, index])``) in the order the recipes
document: seg = target size, x start, y start, flip; cls = per try (area, aspect, swap[, x, y]), then flip.

Seed rule for the segmentation window (per axis, ``M`` the longer image side, ``T`` the drawn target size,
``rate = T / M``): side = int(crop / rate); the image is pasted at d0 = max(1, int(8 / rate // 2)) of a
canvas; the window's canvas start is uniform in [0, int(max(1, 8 / rate, d0 + extent - side + 1))); in image
coordinates x0 = start - d0.
"""

from __future__ import annotations


import numpy as np
import pytest

from data_pipes.recipes import ClsTrain, SegTrain, sample_rng


def _stream(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def _seed_seg_window(rng, width, height, crop=504, origin=500, lo=0.7, hi=1.3, flip=True):
    """issegm/data.py FileIter._read for one crop, transcribed with the seed's own float expressions (its int()
    truncations included: T = 560, M = 500 gives 504 / 1.12 = 449.99.. -> a 449-pixel side, not 450)."""
    target_size_range = [int(lo * origin), int(hi * origin)]
    T = int(rng.integers(target_size_range[0], target_size_range[1] + 1))  # npr.randint(lo, hi + 1)
    rate = 1.0 * T / max(height, width)
    side = int(crop / rate)
    label_stride = 8 / rate
    d0 = max(1, int(label_stride // 2))

    def start(extent):  # npr.randint(0, max(1, label_stride, d0 + h - crop_size + 1)): the float bound truncated
        return int(rng.integers(0, int(max(1, label_stride, d0 + extent - side + 1)))) - d0

    x0 = start(width)
    y0 = start(height)
    do_flip = bool(flip and rng.random() < 0.5)
    return dict(T=T, side=side, d0=d0, x0=x0, y0=y0, flip=do_flip)


# (width, height, origin size): VOC-like landscape and portrait (the short side is always smaller than the window),
# Cityscapes (always larger), a small image (the window always overhangs both sides), a square one
SEG_CASES = [(500, 375, 500), (375, 500, 500), (2048, 1024, 2048), (180, 120, 500), (512, 512, 512)]


@pytest.mark.parametrize("width, height, origin", SEG_CASES, ids=lambda v: str(v))
def test_seg_train_window_is_the_seeds(width, height, origin):
    r = SegTrain(crop=500, origin_size=origin)
    assert r.crop == 504  # rounded up to the feature stride, as make_divisible(500, 8)
    for index in range(200):
        want = _seed_seg_window(_stream(7, 3, index), width, height, origin=origin)
        got = r.draw(sample_rng(7, 3, index), width, height)
        assert got["window"] == (want["x0"], want["y0"], want["side"], want["side"]), (index, want, got)
        assert got["flip"] == want["flip"], index


def test_seg_train_target_size_reaches_both_ends():
    """T is uniform over [floor(0.7 * 500), floor(1.3 * 500)], both ends included: the window side
    floor(504 * 500 / T) spans 720 (T = 350; 349 would give 722) down to 387."""
    r = SegTrain(crop=504, origin_size=500)
    sides = [r.draw(sample_rng(11, 0, i), 500, 375)["window"][2] for i in range(3000)]
    assert min(sides) == 387 and max(sides) == 720
    assert len(set(sides)) > 250


# (scale range, origin, image) -> (side, x0 range, y0 range), worked out by hand from the rule in the module doc
BY_HAND = [
    # Cityscapes at rate 1: side 504, d0 4, start in [0, 4 + 2048 - 504 + 1) and [0, 4 + 1024 - 504 + 1)
    ((1.0, 1.0), 2048, (2048, 1024), (504, (-4, 1544), (-4, 520))),
    # VOC at rate 1: side 504 is larger than both sides: start in [0, 8 / rate) = [0, 8), x0 = start - 4
    ((1.0, 1.0), 500, (500, 375), (504, (-4, 3), (-4, 3))),
    # rate 2 (T = 1000): side 252, d0 2, x start in [0, 2 + 500 - 252 + 1), y start in [0, 2 + 375 - 252 + 1)
    ((2.0, 2.0), 500, (500, 375), (252, (-2, 248), (-2, 123))),
    # rate 0.5 (T = 250): side 1008, d0 8, start in [0, 16)
    ((0.5, 0.5), 500, (500, 375), (1008, (-8, 7), (-8, 7))),
]


@pytest.mark.parametrize("rates, origin, image, want", BY_HAND, ids=lambda v: str(v))
def test_seg_train_window_by_hand(rates, origin, image, want):
    """Fixed target sizes: the side, and every start the seed allows is reached, and nothing else."""
    r = SegTrain(crop=504, origin_size=origin, scale_rate_range=rates)
    side, (xlo, xhi), (ylo, yhi) = want
    n = 600 if xhi - xlo < 20 else 20000
    xs, ys = set(), set()
    for i in range(n):
        x0, y0, s, s2 = r.draw(sample_rng(1, 0, i), *image)["window"]
        assert s == s2 == side
        xs.add(x0)
        ys.add(y0)
    assert min(xs) == xlo and max(xs) == xhi and min(ys) == ylo and max(ys) == yhi, (sorted(xs)[:3], sorted(xs)[-3:])
    if xhi - xlo < 20:
        assert xs == set(range(xlo, xhi + 1)) and ys == set(range(ylo, yhi + 1))


def _seed_cls_params(rng, width, height, crop_area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """fb.resnet.torch / torchvision RandomSizedCrop (seed §9.2): 10 tries, then the centred shorter side."""
    for _ in range(10):
        area = rng.uniform(*crop_area) * width * height
        aspect = rng.uniform(*ratio)
        w = int(np.round(np.sqrt(area * aspect)))  # round half to even is fine: a tie is measure zero
        h = int(np.round(np.sqrt(area / aspect)))
        if rng.random() < 0.5:
            w, h = h, w
        if 1 <= w <= width and 1 <= h <= height:
            x0 = int(rng.integers(0, width - w + 1))  # torch.random(0, W - w): inclusive
            y0 = int(rng.integers(0, height - h + 1))
            return (x0, y0, w, h), bool(flip and rng.random() < 0.5)
    return None, bool(flip and rng.random() < 0.5)


@pytest.mark.parametrize("width, height", [(300, 200), (64, 480), (500, 500)])
def test_cls_train_window_is_the_seeds(width, height):
    r = ClsTrain()
    for index in range(300):
        window, flip = _seed_cls_params(_stream(3, 1, index), width, height)
        got = r.draw(sample_rng(3, 1, index), width, height)
        if window is None:
            s = min(width, height)
            x0, y0, w, h = got["window"]
            assert (w, h) == (s, s)
            assert abs(x0 - (width - s - x0)) <= 1 and abs(y0 - (height - s - y0)) <= 1  # centred
        else:
            assert got["window"] == window, (index, window, got["window"])
            x0, y0, w, h = window
            frac, aspect = w * h / (width * height), w / h
            assert 0.08 * 0.9 < frac <= 1.0 + 1e-9
            assert 0.7 < aspect < 1.45  # 3/4 .. 4/3 up to the rounding of w and h
        assert got["flip"] == flip, index


def test_cls_train_fallback_when_no_try_fits():
    """A 1000x10 strip: every try needs >= sqrt(0.08 * 10000 * 3/4) ~ 24 px of height, so all 10 fail and the
    window is the centred 10x10 square (drawing 10 tries first, then the flip, as the seed)."""
    r = ClsTrain()
    for index in range(20):
        rng = _stream(0, 0, index)
        for _ in range(10):
            rng.uniform(), rng.uniform(), rng.random()
        p = r.draw(sample_rng(0, 0, index), 1000, 10)
        assert p["window"] in ((495, 0, 10, 10), (496, 0, 10, 10))
        assert p["flip"] == bool(rng.random() < 0.5)
    assert ClsTrain(flip=False).draw(sample_rng(0, 0, 1), 300, 200)["flip"] is False


def test_sample_streams_are_the_documented_ones():
    a, b = sample_rng(2**32 + 5, 1, 2), _stream(5, 1, 2)  # the seed is taken mod 2**32
    assert a.integers(0, 2**62) == b.integers(0, 2**62)
    assert sample_rng(5, 1, 2).integers(0, 2**62) != sample_rng(5, 2, 1).integers(0, 2**62)
