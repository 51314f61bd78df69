"""widedeep/train/losses.py against the seed's rules, with distinct values so that off-by-ones show.

- ``label[4::8, 4::8]``: checked by value (each pixel of the label map is unique), not only by shape.
- OHEM (ademxapp's ``ohem_softmax``, spec §5.3): valid pixels whose ground-truth probability p <= 0.6 are kept;
  when fewer than ``min_kept`` (256) would be, the threshold rises to the 256th-smallest p (so exactly 256 are kept
  when all p differ); with at most 256 valid pixels all are kept; the loss is the mean NLL over the kept pixels
  and the gradient (p - onehot) / #kept on them, 0 elsewhere. Every p below is distinct and chosen, and the expected
  set of kept pixels is computed in float64 numpy by sorting, not with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widedeep.train.losses import labels_at_feature_resolution, ohem_cross_entropy

C = 3


def test_labels_subsampled_at_4_mod_8_by_value():
    for H, W in [(504, 504), (20, 27), (8, 8), (13, 4)]:
        label = torch.arange(2 * H * W, dtype=torch.int64).view(2, H, W)  # every pixel unique
        got = labels_at_feature_resolution(label)
        rows, cols = list(range(4, H, 8)), list(range(4, W, 8))  # score cell i sits over pixel 8 i + 4
        want = torch.tensor(
            [[[n * H * W + r * W + c for c in cols] for r in rows] for n in range(2)], dtype=torch.int64
        ).view(2, len(rows), len(cols))
        assert torch.equal(got, want), (H, W)
    assert labels_at_feature_resolution(torch.zeros(1, 504, 504)).shape == (1, 63, 63)


def _problem(p: np.ndarray, target: np.ndarray):
    """Logits (N, C, H, W) whose softmax gives the ground-truth class probability p exactly enough: z on the true
    class and 0 on the other C - 1, so p = e^z / (e^z + C - 1). Ignored pixels (255) get arbitrary logits."""
    z = np.log(p * (C - 1) / (1 - p))
    logits = np.zeros(target.shape[:1] + (C,) + target.shape[1:], np.float64)
    t = np.where(target == 255, 0, target)
    np.put_along_axis(logits, t[:, None], z[:, None], axis=1)
    for n in range(target.shape[0]):
        logits[n][:, target[n] == 255] = np.array([3.0, -2.0, 0.5])[:, None]  # ignored: anything
    return torch.tensor(logits, dtype=torch.float32, requires_grad=True), torch.tensor(target, dtype=torch.int64)


def _expected(logits: torch.Tensor, target: torch.Tensor, kept: np.ndarray):
    """float64: mean NLL over ``kept`` (boolean, target's shape), and d loss / d logits = (softmax - onehot)/#kept."""
    lg = logits.detach().double().numpy()
    sm = np.exp(lg - lg.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    t = np.where(target.numpy() == 255, 0, target.numpy())
    p_true = np.take_along_axis(sm, t[:, None], axis=1)[:, 0]
    loss = -np.log(p_true[kept]).mean()
    onehot = np.zeros_like(sm)
    np.put_along_axis(onehot, t[:, None], 1.0, axis=1)
    grad = (sm - onehot) * kept[:, None] / kept.sum()
    return loss, grad


def _run(p, target, **kw):
    logits, tgt = _problem(p, target)
    loss = ohem_cross_entropy(logits, tgt, **kw)
    loss.backward()
    return logits, tgt, loss


def _layout(n_valid: int, n_ignored: int, shape=(2, 20, 20), seed=0):
    """Targets with ``n_valid`` labelled pixels (classes 0..2) and ``n_ignored`` 255s, in (N, H, W); the rest
    also 255. Returns target and the flat indices of the valid pixels."""
    rng = np.random.default_rng(seed)
    total = int(np.prod(shape))
    assert n_valid + n_ignored <= total
    target = np.full(total, 255, np.int64)
    where = rng.permutation(total)[:n_valid]
    target[where] = rng.integers(0, C, n_valid)
    return target.reshape(shape), where


def _distinct(n: int, lo: float, hi: float, seed=1) -> np.ndarray:
    """n distinct probabilities in (lo, hi), shuffled, at least (hi - lo) / (2 n) apart."""
    return np.random.default_rng(seed).permutation(np.linspace(lo, hi, n + 2)[1:-1])


def _probs(target, where, values):
    p = np.full(target.shape, 0.5)
    p.reshape(-1)[where] = values
    return p


def _check(logits, tgt, loss, kept):
    want_loss, want_grad = _expected(logits, tgt, kept)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(logits.grad.double().numpy(), want_grad, rtol=1e-5, atol=1e-7 / kept.sum())


@pytest.mark.parametrize("n_hard", [255, 256, 257])
def test_ohem_threshold_rises_to_the_256th_smallest_probability(n_hard):
    """300 valid pixels, ``n_hard`` of them with p < 0.6 and the rest above: 255 hard -> the 256 smallest are kept
    (one easy pixel joins); 256 -> exactly the hard ones; 257 -> the 0.6 threshold keeps all 257."""
    target, where = _layout(300, 0)
    values = np.concatenate([_distinct(n_hard, 0.05, 0.59), _distinct(300 - n_hard, 0.61, 0.97, seed=2)])
    logits, tgt, loss = _run(_probs(target, where, values), target)
    order = np.argsort(values, kind="stable")
    keep_n = max(256, n_hard)
    kept = np.zeros(target.size, bool)
    kept[where[order[:keep_n]]] = True
    _check(logits, tgt, loss, kept.reshape(target.shape))


def test_ohem_all_easy_keeps_exactly_min_kept_smallest():
    """Every p > 0.6 and distinct: the 256 smallest are kept, the kth one itself included (p <= kth)."""
    target, where = _layout(700, 0)
    values = _distinct(700, 0.62, 0.999)
    logits, tgt, loss = _run(_probs(target, where, values), target)
    kept = np.zeros(target.size, bool)
    kept[where[np.argsort(values)[:256]]] = True
    _check(logits, tgt, loss, kept.reshape(target.shape))


def test_ohem_threshold_0_6_is_inclusive_from_below_and_exclusive_above():
    """Many hard pixels: exactly those with p <= 0.6 are kept, including ones just below it (0.6 - 1e-4) and
    excluding ones just above (0.6 + 1e-4)."""
    target, where = _layout(600, 0)
    values = np.concatenate(
        [
            _distinct(300, 0.05, 0.5),
            [0.6 - 1e-4, 0.6 - 3e-4],
            [0.6 + 1e-4, 0.6 + 3e-4],
            _distinct(296, 0.7, 0.99, seed=3),
        ]
    )
    logits, tgt, loss = _run(_probs(target, where, values), target)
    kept = np.zeros(target.size, bool)
    kept[where[values <= 0.6]] = True
    assert kept.sum() == 302
    _check(logits, tgt, loss, kept.reshape(target.shape))
    _, _, loss2 = _run(_probs(target, where, values), target, thresh=0.6 + 2e-4)  # the threshold is a parameter
    kept2 = np.zeros(target.size, bool)
    kept2[where[values <= 0.6 + 2e-4]] = True
    assert loss2.item() == pytest.approx(_expected(logits, tgt, kept2.reshape(target.shape))[0], rel=1e-6)


@pytest.mark.parametrize("n_valid", [255, 256, 257])
def test_ohem_at_most_min_kept_valid_pixels_keeps_all(n_valid):
    """With <= 256 valid pixels every one is kept, easy ones too; ignored pixels (many, here 500) never count
    towards the 256. At 257 the easiest one is dropped."""
    target, where = _layout(n_valid, 500, shape=(2, 30, 30))
    values = _distinct(n_valid, 0.62, 0.99)  # all easy
    logits, tgt, loss = _run(_probs(target, where, values), target)
    kept = np.zeros(target.size, bool)
    kept[where[np.argsort(values)[:256]]] = True
    assert kept.sum() == min(n_valid, 256)
    _check(logits, tgt, loss, kept.reshape(target.shape))


def test_ohem_min_kept_is_a_parameter_and_all_ignored_gives_zero():
    target, where = _layout(40, 0, shape=(1, 8, 8))
    values = _distinct(40, 0.62, 0.99)
    logits, tgt, loss = _run(_probs(target, where, values), target, min_kept=10)
    kept = np.zeros(target.size, bool)
    kept[where[np.argsort(values)[:10]]] = True
    _check(logits, tgt, loss, kept.reshape(target.shape))
    logits = torch.randn(1, C, 4, 4, requires_grad=True)
    loss = ohem_cross_entropy(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="differ in size"):
        ohem_cross_entropy(torch.zeros(1, C, 4, 4), torch.zeros(1, 8, 8, dtype=torch.int64))
