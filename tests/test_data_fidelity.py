"""Both data backends see the same pixels of the same file (issue 21, items 2-6): EXIF orientation, 16-bit PNGs,
JPEGs without an end-of-image marker, segmentation eval batches of mixed sizes, DALI's messages."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipes import BadSampleError, build_loader
from data_pipes.dali_backend import available as dali_available
from data_pipes.recipes import MEAN, STD

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]
COLOURS = {1: (220, 20, 20), 2: (20, 220, 20), 3: (20, 20, 220)}  # class -> RGB painted on the image


def _loader(ds, root, split, backend, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("workers", 0 if backend == "torch" else 1)
    return build_loader(ds, root, split, backend=backend, device="cpu", **kw)


def _scene(h: int, w: int) -> np.ndarray:
    """An asymmetric label map: a mirror, a 180-degree turn or a 90-degree turn all move its classes."""
    m = np.full((h, w), 3, np.uint8)
    m[:, : w * 5 // 16] = 1
    m[: h // 3, w * 5 // 16 :] = 2
    return m


def _jpeg(rgb: np.ndarray, orientation: int | None = None, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _voc(root: Path, items: list[tuple[str, bytes, str, np.ndarray]]) -> Path:
    """A VOC layout with DeepLab-style lists (any image suffix): items = (name, image bytes, suffix, mask)."""
    voc = root / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data, suffix, mask in items:
        (voc / "JPEGImages" / f"{name}{suffix}").write_bytes(data)
        Image.fromarray(mask, "L").save(voc / "SegmentationClass" / f"{name}.png")
        lines.append(f"/JPEGImages/{name}{suffix} /SegmentationClass/{name}.png")
    for split in ("train", "val"):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _ilsvrc(root: Path, items: list[tuple[str, bytes]]) -> Path:
    """Two classes (n0: the items, n1: one plain image), the same files in train and val."""
    plain = _jpeg(np.full((40, 40, 3), 128, np.uint8))
    for split in ("ILSVRC2012_train", "ILSVRC2012_val"):
        for w in ("n0", "n1"):
            (root / split / w).mkdir(parents=True, exist_ok=True)
        for name, data in items:
            (root / split / "n0" / name).write_bytes(data)
        (root / split / "n1" / "plain.jpg").write_bytes(plain)
    return root


def _classes_of(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised image -> (H, W) the class whose painted colour is nearest; 0 for padding."""
    rgb = img * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    cols = torch.tensor([[m * 1.0 for m in MEAN]] + [[c / 255 for c in COLOURS[k]] for k in (1, 2, 3)])
    d = ((rgb[None] - cols[:, :, None, None]) ** 2).sum(1)
    return d.argmin(0)


# ------------------------------------------------------------------ 2. EXIF orientation


@pytest.fixture(scope="module")
def exif_voc(tmp_path_factory):
    rng = np.random.default_rng(0)
    items = []
    for k, orient in enumerate([1, 2, 3, 6]):
        mask = _scene(48, 64)
        rgb = np.zeros((48, 64, 3), np.uint8)
        for c, col in COLOURS.items():
            rgb[mask == c] = col
        rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
        items.append((f"img{k}_o{orient}", _jpeg(rgb, orient), ".jpg", mask))
    return _voc(tmp_path_factory.mktemp("exif") / "voc", items)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_exif_orientation_is_ignored_segmentation_labels_align(exif_voc, backend, train):
    """Orientation 1, 2, 3 and 6: labels align with the pixels (the stored grid) in both backends, train and eval."""
    kw = (
        dict(train=True, crop_size=48, scale_rate_range=(0.8, 1.2), origin_size=64)
        if train
        else dict(train=False, scale=None, batch_size=1)
    )
    ld = _loader("voc", exif_voc, "train" if train else "val", backend, **kw)
    per_file = {}
    for epoch in range(3 if train else 1):
        for b in ld.iter_epoch(epoch):
            for k in range(len(b["index"])):
                h, w = b["label_size"][k].tolist() if "label_size" in b else b["label"].shape[-2:]
                y = b["label"][k, :h, :w]
                pred = _classes_of(b["image"][k])[:h, :w]
                valid = (y != 255) & (y != 0)
                hits = per_file.setdefault(int(b["index"][k]), [0, 0])
                hits[0] += (pred[valid] == y[valid]).sum().item()
                hits[1] += valid.sum().item()
    assert len(per_file) == 4
    for i, (agree, total) in per_file.items():
        assert total > 0 and agree / total > 0.95, (i, agree / total)


@pytest.fixture(scope="module")
def exif_ilsvrc(tmp_path_factory):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :20] = COLOURS[1]
    rgb[:16, 20:] = COLOURS[2]
    rgb[16:, 20:] = COLOURS[3]
    items = [(f"o{o}.jpg", _jpeg(rgb, o)) for o in (2, 3, 6)]
    return _ilsvrc(tmp_path_factory.mktemp("exif") / "ilsvrc", items)


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
@pytest.mark.parametrize("train", [True, False])
def test_exif_orientation_is_ignored_classification_backends_agree(exif_ilsvrc, train):
    """Classification: the same crops of the stored grid in both backends (DALI's default rotated the image, so
    the random-resized-crop window fell outside it, and eval squashed the rotated image)."""
    kw = dict(train=True, crop_size=32) if train else dict(train=False, crop_size=40)
    a = _loader("ilsvrc", exif_ilsvrc, "train" if train else "val", "torch", **kw)
    b = _loader("ilsvrc", exif_ilsvrc, "train" if train else "val", "dali", **kw)
    for epoch in range(4 if train else 1):
        for x, y in zip(a.iter_epoch(epoch), b.iter_epoch(epoch)):
            assert torch.equal(x["index"], y["index"])
            assert (x["image"] - y["image"]).abs().mean() < 0.05, epoch
    b.close()


# ------------------------------------------------------------------ 3. 16-bit grayscale PNG


def test_16_bit_grayscale_png_gives_the_same_pixels_in_both_backends(tmp_path):
    g16 = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    root = _ilsvrc(tmp_path / "ilsvrc", [("g16.png", buf.getvalue())])
    want8 = np.round(g16 / 257.0)  # 16 -> 8 bits as DALI scales it
    crop = want8[:, 8:56] / 255.0  # centre crop of the 48x64 image at scale 48 (no resize)
    want = torch.from_numpy((crop[None] - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).float()
    for backend in ["torch"] + (["dali"] if dali_available() else []):
        ld = _loader("ilsvrc", root, "val", backend, train=False, crop_size=48, batch_size=1)
        got = next(b for b in ld if b["label"][0] == 0)["image"][0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=backend)


# ------------------------------------------------------------------ 4. JPEG without its EOI marker


@pytest.fixture(scope="module")
def no_eoi(tmp_path_factory):
    rng = np.random.default_rng(1)
    rgb = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    data = _jpeg(rgb, quality=90)
    assert data[-2:] == b"\xff\xd9"
    return _ilsvrc(
        tmp_path_factory.mktemp("eoi") / "ilsvrc", [("a.jpg", _jpeg(rgb[::-1].copy())), ("no_eoi.jpg", data[:-2])]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_jpeg_missing_its_eoi_is_refused_by_both_backends_in_every_epoch(no_eoi, backend):
    """DALI's ROI decode accepted it when the crop missed the last rows (epoch-dependent); Pillow depends on its
    buffering. The rule now: refused, every epoch, both backends; skip_bad skips it once per epoch."""
    bad = no_eoi / "ILSVRC2012_train" / "n0" / "no_eoi.jpg"
    ld = _loader("ilsvrc", no_eoi, "train", backend, train=True, crop_size=32, batch_size=1, skip_bad=True)
    for epoch in range(6):
        got = sorted(int(i) for b in ld.iter_epoch(epoch) for i in b["index"])
        assert got == [0, 2], epoch  # a.jpg and plain.jpg; no_eoi.jpg (index 1) skipped
        assert ld.skipped == epoch + 1
    ld.close()
    for epoch in range(3):
        strict = _loader("ilsvrc", no_eoi, "train", backend, train=True, crop_size=32, batch_size=3)
        with pytest.raises(BadSampleError, match=r"no_eoi\.jpg: cannot decode image \(truncated JPEG"):
            list(strict.iter_epoch(epoch))
        strict.close()
    assert bad.is_file()


# ------------------------------------------------------------------ 5. segmentation eval, batch > 1, mixed sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmentation_eval_batches_of_mixed_original_sizes(tmp_path, backend):
    """48x64 and 60x80 both resize to 48x64 at scale 64 while their labels keep 48x64 and 60x80."""
    items = []
    for k, (h, w) in enumerate([(48, 64), (60, 80), (48, 64), (30, 40)]):
        mask = _scene(h, w)
        rgb = np.stack([mask * 60] * 3, -1).astype(np.uint8)
        items.append((f"m{k}", _jpeg(rgb), ".jpg", mask))
    root = _voc(tmp_path / "voc", items)
    ld = _loader("voc", root, "val", backend, train=False, scale=64, batch_size=2)
    seen = 0
    for b in ld:
        assert b["image"].shape[:2] == (2, 3) and b["label"].dtype == torch.int64
        for k in range(2):
            i = int(b["index"][k])
            h, w = items[i][3].shape
            assert b["label_size"][k].tolist() == [h, w]
            assert tuple(b["image_size"][k].tolist()) == (48, 64)  # every one resizes to 48x64 at scale 64
            assert np.array_equal(b["label"][k, :h, :w].numpy(), items[i][3])
            assert (b["label"][k, h:] == 255).all() and (b["label"][k, :, w:] == 255).all()
            seen += 1
    assert seen == 4


# ------------------------------------------------------------------ 6. DALI names the file


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_unreadable_image_message_names_the_path(tmp_path):
    root = _ilsvrc(tmp_path / "ilsvrc", [("junk.jpg", b"not an image at all")])
    with pytest.raises(BadSampleError) as e:
        list(_loader("ilsvrc", root, "val", "dali", train=False, crop_size=32))
    msg = str(e.value)
    assert str(root / "ILSVRC2012_val" / "n0" / "junk.jpg") in msg and "BytesIO" not in msg and "0x" not in msg, msg


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
@pytest.mark.parametrize("ds,split", [("ilsvrc", "train"), ("ilsvrc", "val"), ("voc", "train"), ("voc", "val")])
def test_every_dali_decoder_keeps_the_stored_grid_on_gpu_too(exif_voc, exif_ilsvrc, ds, split):
    """The `mixed` (GPU) graph, checked without a GPU: each decoder operator has adjust_orientation=False."""
    root = exif_voc if ds == "voc" else exif_ilsvrc
    kw = {"crop_size": 32} if ds == "ilsvrc" or split == "train" else {"scale": 64}
    ld = build_loader(
        ds, root, split, batch_size=2, train=split == "train", device="cuda", backend="dali", workers=1, **kw
    )
    pipe = ld.backend.pipeline(ld.planner)
    pipe.serialize()  # builds the graph without a device
    decoders = [op for op in pipe._ops if op._op.schema.Name().startswith("decoders__")]
    assert decoders and all(op._op.device == "mixed" for op in decoders)
    for op in decoders:
        assert "adjust_orientation: False" in str(op._op._spec), op._op._spec  # the OpSpec DALI's C++ receives
