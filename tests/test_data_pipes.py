"""data_pipes: layouts, exact coverage, determinism, DALI (CPU) vs torch/Pillow, alignment, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipes import BadSampleError, DatasetError, build_loader, discover
from data_pipes.dali_backend import available as dali_available
from data_pipes.labels import CITYSCAPES_LABELS, LABEL_SPACES, voc_palette
from data_pipes.order import epoch_indices
from data_pipes.photometric import color_jitter, lighting
from data_pipes.recipes import MEAN, STD, ClsTrain, SegTrain, sample_rng

SEG = ["voc", "cityscapes", "ade20k"]
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]


def loader(ds, root, split="train", backend="torch", **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("train", split != "val")
    kw.setdefault("workers", 0 if backend == "torch" else 1)
    if kw["train"]:
        kw.setdefault("crop_size", 40)
    elif ds != "ilsvrc":
        kw.setdefault("scale", 64)
    else:
        kw.setdefault("crop_size", 48)
    return build_loader(ds, root, split, backend=backend, **kw)


# ----------------------------------------------------------------------------- layouts


def test_layouts_find_every_split(synthetic_root):
    for ds, splits in {
        "voc": ["train", "train+", "val"],
        "cityscapes": ["train", "val"],
        "ade20k": ["train", "val"],
        "ilsvrc": ["train", "val"],
    }.items():
        for split in splits:
            idx = discover(ds, synthetic_root(ds), split)
            assert len(idx) == (10 if split != "val" else 5), (ds, split)
    ilsvrc = discover("ilsvrc", synthetic_root("ilsvrc"), "val")
    assert ilsvrc.class_names == tuple(sorted(ilsvrc.class_names))  # sorted-WNID order
    assert [s.target for s in ilsvrc.samples] == [k % 4 for k in range(5)]  # from the seed-style val.lst


def test_layout_errors_name_the_problem(synthetic_root, tmp_path):
    with pytest.raises(DatasetError, match="unknown split"):
        discover("voc", synthetic_root("voc"), "test")
    with pytest.raises(DatasetError, match="missing VOC2012"):
        discover("voc", tmp_path, "train")
    sets = tmp_path / "VOC2012" / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n")
    with pytest.raises(DatasetError, match="no samples"):
        discover("voc", tmp_path, "train")
    (sets / "train.txt").write_text("img1\n")
    with pytest.raises(DatasetError, match=r"img1\.jpg: listed .* but missing"):
        discover("voc", tmp_path, "train")


def test_cityscapes_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    ours = {row[1]: row for row in CITYSCAPES_LABELS}
    for lab in labels.labels:
        if lab.id < 0:
            continue
        assert ours[lab.id] == (
            lab.name,
            lab.id,
            lab.trainId,
            lab.category,
            lab.categoryId,
            lab.hasInstances,
            lab.ignoreInEval,
            lab.color,
        )
    lut = LABEL_SPACES["cityscapes"].to_train
    assert all(lut[lab.id] == lab.trainId for lab in labels.labels if lab.id >= 0)


def test_label_spaces_map_and_reject():
    ade = LABEL_SPACES["ade20k"]
    raw = np.array([[0, 1, 150]], np.uint8)
    assert ade.encode(raw).tolist() == [[255, 0, 149]]
    assert ade.decode(ade.encode(raw)).tolist() == [[255, 1, 150]]
    with pytest.raises(ValueError, match=r"\[151\]"):
        ade.encode(np.array([[151]], np.uint8))
    with pytest.raises(ValueError, match=r"\[21\]"):
        LABEL_SPACES["voc"].encode(np.array([[21, 255]], np.uint8))
    assert tuple(voc_palette()[15]) == (192, 128, 128)  # person


# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize("n,shards", [(10, 1), (10, 3), (7, 3), (2, 3)])
def test_epoch_indices_cover_exactly(n, shards):
    for epoch in (0, 1):
        parts = [
            epoch_indices(n, epoch=epoch, seed=5, shuffle=True, shard_id=s, num_shards=shards)[0] for s in range(shards)
        ]
        allidx = np.concatenate(parts)
        assert sorted(allidx.tolist()) == list(range(n))  # complete and disjoint
        even = [
            epoch_indices(n, epoch=epoch, seed=5, shuffle=True, shard_id=s, num_shards=shards, even=True)
            for s in range(shards)
        ]
        assert len({len(i) for i, _ in even}) == 1  # same step count on every rank
        assert sorted(np.concatenate([i[r] for i, r in even]).tolist()) == list(range(n))
    a = epoch_indices(50, epoch=0, seed=1, shuffle=True)[0]
    assert not np.array_equal(a, epoch_indices(50, epoch=1, seed=1, shuffle=True)[0])
    assert np.array_equal(a, epoch_indices(50, epoch=0, seed=1, shuffle=True)[0])
    assert np.array_equal(epoch_indices(5, epoch=3, seed=1, shuffle=False)[0], np.arange(5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shards", [1, 3])
def test_loader_epoch_coverage_and_len(synthetic_root, backend, shards):
    root = synthetic_root("voc")
    for epoch in (0, 1):
        seen = []
        for s in range(shards):
            ld = loader("voc", root, backend=backend, shard_id=s, num_shards=shards, even=False)
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == len(ld)
            # plain NCHW: channels_last-strided batches crash oneDNN's conv backward on AVX-512 CPUs
            assert all(b["image"].is_contiguous() for b in batches)
            seen += [int(i) for b in batches for i in b["index"]]
        assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_is_deterministic_and_resumable(synthetic_root, backend):
    root = synthetic_root("ade20k")
    a = list(loader("ade20k", root, backend=backend, seed=3))
    b = list(loader("ade20k", root, backend=backend, seed=3))
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
    ld = loader("ade20k", root, backend=backend, seed=3)
    e0, e1 = list(ld), list(ld)  # iterating advances the epoch
    assert ld.epoch == 2 and not torch.equal(e0[0]["index"], e1[0]["index"])
    resumed = list(loader("ade20k", root, backend=backend, seed=3).iter_epoch(1, start_batch=2))
    for x, y in zip(resumed, e1[2:]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


# ----------------------------------------------------------------------------- content


def _nearest_class(image: torch.Tensor, colours: np.ndarray) -> torch.Tensor:
    """Per-pixel nearest class colour of a normalised (3, H, W) image."""
    rgb = (image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    c = torch.tensor(colours, dtype=torch.float32)
    return ((rgb.permute(1, 2, 0)[..., None, :] - c) ** 2).sum(-1).argmin(-1)


def _train_colours(ds):
    if ds == "voc":
        col = voc_palette()[:21].astype(np.float32)
        col[0] = 40
        return col
    if ds == "cityscapes":
        col = np.zeros((19, 3), np.float32)
        for _, _, t, *_, colour in CITYSCAPES_LABELS:
            if t != 255:
                col[t] = colour
        return col
    return LABEL_SPACES["ade20k"].palette[1:9].astype(np.float32)  # the synthetic set uses 8 classes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ds", SEG)
def test_seg_train_image_and_label_stay_aligned(synthetic_root, backend, ds):
    """Labels must match the colour painted at the same pixel through scale, crop, padding and flip."""
    colours = _train_colours(ds)
    ld = loader(ds, synthetic_root(ds), backend=backend, crop_size=48, scale_rate_range=(0.5, 1.5), origin_size=64)
    agree, total, pad_ignored, pad_total, control = 0, 0, 0, 0, 0
    for b in ld:
        assert b["image"].shape[1:] == (3, 48, 48) and b["image"].dtype == torch.float32
        assert b["label"].shape[1:] == (48, 48) and b["label"].dtype == torch.int64
        lab = b["label"]
        assert ((lab >= 0) & (lab < LABEL_SPACES[ds].num_classes) | (lab == 255)).all()
        for img, y in zip(b["image"], lab):
            pred = _nearest_class(img, colours)
            valid = y != 255
            # padding is exactly the mean colour (0 after normalisation) and labelled 255
            pad = img.abs().amax(0) < 0.02
            pad_ignored += (y[pad] == 255).sum().item()
            pad_total += pad.sum().item()
            agree += (pred[valid] == y[valid]).sum().item()
            total += valid.sum().item()
            control += (pred.flip(-1)[valid] == y[valid]).sum().item()  # a label off by a mirror flip
    # noise and resampling at edges cost a few percent; a misaligned label loses far more (control)
    assert total > 0 and agree / total > 0.9 and control / total < agree / total - 0.15, (
        agree / total,
        control / total,
    )
    assert pad_total > 100 and pad_ignored / pad_total > 0.95  # the jitter range makes windows overhang


@pytest.mark.parametrize("ds", SEG + ["ilsvrc"])
@pytest.mark.parametrize("train", [True, False])
def test_dali_matches_torch_backend(synthetic_root, ds, train):
    if not dali_available():
        pytest.skip("DALI not installed")
    root = synthetic_root(ds)
    split = "train" if train else "val"
    a, b = list(loader(ds, root, split, "torch")), list(loader(ds, root, split, "dali"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"])
        assert x["image"].shape == y["image"].shape
        # same geometry; only the resampling filters differ (DALI: cubic+antialias; Pillow: the seed's choice)
        assert (x["image"] - y["image"]).abs().mean() < 0.05
        assert (x["label"] == y["label"]).float().mean() > 0.99


def test_voc_palette_masks_are_read_as_indices(synthetic_root):
    """DALI's decoder would return palette colours; both backends must give the PNG's indices."""
    root = synthetic_root("voc")
    idx = discover("voc", root, "val")
    for backend in ["torch"] + (["dali"] if dali_available() else []):
        for b in loader("voc", root, "val", backend, batch_size=1, scale=None):
            s = idx.samples[int(b["index"][0])]
            with Image.open(s.target) as im:
                assert im.mode == "P"
                want = np.asarray(im)
            assert np.array_equal(b["label"][0].numpy(), want)
            assert set(np.unique(want)) - set(range(21)) <= {255}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cls_val_three_crops(synthetic_root, backend):
    root = synthetic_root("ilsvrc")
    b = next(iter(loader("ilsvrc", root, "val", backend, crop_size=32, crops=3)))
    assert b["image"].shape == (3, 3, 3, 32, 32)
    one = next(iter(loader("ilsvrc", root, "val", backend, crop_size=32)))
    assert torch.allclose(one["image"], b["image"][:, 1], atol=1e-6)  # the centre crop is crop 1 of 3
    assert not torch.allclose(b["image"][:, 0], b["image"][:, 2])


def test_cls_train_recipe_parameters():
    r = ClsTrain()
    for i in range(50):
        p = r.draw(sample_rng(0, 0, i), 300, 200)
        x0, y0, w, h = p["window"]
        assert 0 <= x0 and x0 + w <= 300 and 0 <= y0 and y0 + h <= 200
        assert 0.08 * 0.99 <= w * h / 60000 <= 1.0 + 1e-9 or (w == h == 200)
    s = SegTrain(crop=500)
    assert s.crop == 504  # rounded up to the feature stride, as the seed does


def test_photometric_matches_per_sample_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 6, generator=g)
    params = torch.tensor(
        np.stack(
            [
                __import__("data_pipes.recipes", fromlist=["x"]).photometric_params(np.random.default_rng(k), 0.4, 0.1)
                for k in range(4)
            ]
        )
    )
    out = color_jitter(x, params)
    for n in range(4):
        y = x[n].clone()
        for op in params[n, 3:6].long().tolist():
            f = params[n, op].item()
            gray = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
            target = [torch.zeros_like(gray), gray.mean().expand_as(gray), gray][op]
            y = y * f + target * (1 - f)
        assert torch.allclose(out[n], y, atol=1e-6)
    ident = torch.tensor([[1.0, 1, 1, 0, 1, 2, 0, 0, 0]]).repeat(4, 1)
    assert torch.allclose(color_jitter(x, ident), x)
    assert torch.allclose(lighting(x, ident, 0.1), x / 1.1)  # the seed's quirk


# ----------------------------------------------------------------------------- bad input


def _copy_voc(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_naming_the_file_or_are_skipped(synthetic_root, tmp_path, backend):
    root = _copy_voc(synthetic_root("voc"), tmp_path / "voc")
    idx = discover("voc", root, "train")
    bad = idx.samples[4].image
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])  # truncated JPEG
    with pytest.raises(BadSampleError, match=bad.split("/")[-1]):
        list(loader("voc", root, backend=backend))
    ld = loader("voc", root, backend=backend, skip_bad=True)
    got = [int(i) for b in ld for i in b["index"]]
    assert sorted(got) == [i for i in range(10) if i != 4] and ld.skipped == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_masks_raise_naming_the_file(synthetic_root, tmp_path, backend):
    root = _copy_voc(synthetic_root("voc"), tmp_path / "voc")
    idx = discover("voc", root, "train")
    mask = idx.samples[1].target
    m = np.asarray(Image.open(mask)).copy()
    m[0, 0] = 60  # not a VOC class
    Image.fromarray(m, "L").save(mask)
    with pytest.raises(BadSampleError, match=r"2007_train00001\.png: mask values \[60\]"):
        list(loader("voc", root, backend=backend))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask)
    with pytest.raises(BadSampleError, match="mask is 5x5 but image"):
        list(loader("voc", root, backend=backend))
