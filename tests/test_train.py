"""widedeep.train: learning on synthetic data, resume, DDP (gloo), evaluation protocol, metrics, CLI."""

import csv
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from data_pipes.synthetic import write_synthetic
from widedeep.train import TrainingError, main, parser
from widedeep.train.evaluate import classify, dense_probs, segment, shift_offsets
from widedeep.train.losses import labels_at_feature_resolution, ohem_cross_entropy
from widedeep.train.metrics import ConfusionMatrix, TopK
from widedeep.train.optim import learning_rate, make_optimizer

TINY = ["--model", "voc_rna-a1_cls21_s8", "--width", "0.0625", "--crop-size", "48", "--origin-size", "64",
        "--bn-stats", "batch", "--backend", "torch", "--prefetch-threads", "0", "--test-scales", "64",
        "--log-interval", "1000", "--save-every", "0"]


@pytest.fixture(scope="module")
def voc5(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc5") / "voc"
    return write_synthetic("voc", root, num_train=32, num_val=8, size=(48, 80), num_classes=5)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_training_learns_and_beats_chance(voc5, tmp_path):
    out = tmp_path / "out"
    metrics = main(["--data-root", str(voc5), "--output", str(out), *TINY, "--batch-images", "8",
                    "--crop-size", "64", "--lr-type", "poly", "--base-lr", "0.05", "--to-epoch", "40", "--eval-every", "20",
                    "--test-flipping"])
    rows = _rows(out / "voc_rna-a1_cls21_s8")
    assert float(rows[-1]["train_loss"]) < 0.6 * float(rows[0]["train_loss"])
    # 5 classes on the synthetic set: always-background gives mIoU ~0.15; a uniform guess ~0.1
    assert metrics["miou"] > 0.5, metrics
    saved = json.loads((out / "voc_rna-a1_cls21_s8" / "metrics-val.json").read_text())
    assert saved["miou"] == pytest.approx(metrics["miou"])
    assert (out / "voc_rna-a1_cls21_s8" / "curves.png").is_file()
    assert (out / "voc_rna-a1_cls21_s8" / "best.pt").is_file()


def test_resume_equals_uninterrupted_run(voc5, tmp_path):
    common = ["--data-root", str(voc5), *TINY, "--batch-images", "4", "--to-epoch", "2", "--base-lr", "0.01",
              "--lr-type", "linear", "--no-eval", "--bn-stats", "auto"]  # seg default: frozen BN statistics
    main([*common, "--output", str(tmp_path / "a")])
    main([*common, "--output", str(tmp_path / "b"), "--stop-after-steps", "11"])  # killed mid-epoch 2
    main([*common, "--output", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 16
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_resume_rejects_a_non_checkpoint(voc5, tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match=r"--resume .*x\.pt: not a widedeep training checkpoint"):
        main(["--data-root", str(voc5), "--output", str(tmp_path), *TINY, "--resume", str(bad)])


def test_nan_loss_stops_with_a_clear_message(voc5, tmp_path):
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        main(["--data-root", str(voc5), "--output", str(tmp_path), *TINY, "--batch-images", "4", "--base-lr", "1e12",
              "--to-epoch", "3", "--no-eval"])


def _ddp_worker(rank, world, port, argv, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    m = main(argv)
    if rank == 0:
        Path(out_file).write_text(json.dumps(m))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_gives_the_same_metrics(voc5, tmp_path):
    """Train briefly with 2 DDP processes, then evaluate the result with 1 and with 2 processes."""
    out = tmp_path / "ddp"
    train = ["--data-root", str(voc5), "--output", str(out), *TINY, "--batch-images", "4", "--to-epoch", "1",
             "--no-eval", "--save-every", "1", "--device", "cpu"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), train, str(tmp_path / "t.json")), nprocs=2)
    weights = out / "voc_rna-a1_cls21_s8_ep-0001.params"
    assert weights.is_file()
    val = ["--data-root", str(voc5), "--output", str(out), *TINY, "--phase", "val", "--weights", str(weights),
           "--test-flipping", "--device", "cpu"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), val, str(tmp_path / "two.json")), nprocs=2)
    two = json.loads((tmp_path / "two.json").read_text())
    one = main(val)
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-12)
    assert two["pixel_acc"] == pytest.approx(one["pixel_acc"], abs=1e-12)


def test_val_phase_saves_dataset_id_pngs(voc5, tmp_path):
    from widedeep.models import create_model
    from widedeep.weights import save_weights

    model = create_model("voc_rna-a1_cls21_s8", width=0.0625)
    w = tmp_path / "voc_rna-a1_cls21_s8_ep-0001.params"  # a released name: md5-checked unless told not to
    save_weights(model, w)
    with pytest.raises(TrainingError, match="does not match the released .* --no-verify-weights"):
        main(["--data-root", str(voc5), "--output", str(tmp_path / "o"), "--weights", str(w), "--phase", "val"])
    w = w.rename(tmp_path / "voc_rna-a1_cls21_s8_mine.params")
    m = main(["--data-root", str(voc5), "--output", str(tmp_path / "o"), "--weights", str(w), "--phase", "val",
              "--width", "0.0625", "--backend", "torch", "--prefetch-threads", "0", "--test-scales", "64"])
    pred = tmp_path / "o" / "voc_rna-a1_cls21_s8_mine" / "val-predictions"  # run folder named after the label
    ids = sorted((pred / "ids").glob("*.png"))
    assert len(ids) == 8 and len(list((pred / "color").glob("*.png"))) == 8
    with Image.open(ids[0]) as im:
        assert im.mode == "L" and im.size == Image.open(voc5 / "VOC2012" / "JPEGImages" / f"{ids[0].stem}.jpg").size
    assert 0 <= m["miou"] <= 1


def test_classification_training_and_protocol(tmp_path):
    root = write_synthetic("ilsvrc", tmp_path / "ilsvrc", num_train=40, num_val=12, size=(40, 64), num_classes=4)
    out = tmp_path / "out"
    m = main(["--data-root", str(root), "--output", str(out), "--model", "ilsvrc-cls_rna-a1_cls4", "--width", "0.0625",
              "--batch-images", "8", "--crop-size", "32", "--to-epoch", "6", "--base-lr", "0.05", "--lr-type", "linear",
              "--backend", "torch", "--prefetch-threads", "0", "--test-scales", "32,40", "--test-flipping",
              "--test-3crops", "--log-interval", "1000", "--save-every", "0"])
    assert set(m["scales"]) == {"32", "40"} and m["count"] == 12
    assert m["err1"] == pytest.approx(1 - m["acc1"]) and m["acc5"] == 1.0  # 4 classes: top-5 always hits
    assert m["acc1"] > 0.5  # chance is 0.25


# ----------------------------------------------------------------------------- protocol pieces


class _Sampler(nn.Module):
    """A stride-8 'network' whose score cell j is the input pixel 8j + 4 (the seed's alignment)."""

    def forward(self, x):
        return x[:, :, 4::8, 4::8] * 50  # large logits: softmax ~ one-hot of the channel argmax


def test_shift_and_stitch_interleaves_sub_stride_shifts():
    assert shift_offsets(1) == [0] and shift_offsets(2) == [-2, 2] and shift_offsets(4) == [-3, -1, 1, 3]
    with pytest.raises(ValueError, match="--test-steps 3"):
        shift_offsets(3)
    x = torch.zeros(1, 2, 32, 32)
    x[0, 1] = (torch.rand(32, 32) > 0.5).float()  # channel 1 wins where the mask is set
    x[0, 0] = 1 - x[0, 1]
    p = dense_probs(_Sampler(), x, flip=False, steps=2)
    assert p.shape == (1, 2, 8, 8)
    # stride 4: cell m sits over pixel 4m + 2 (shift -2 for even m, +2 for odd m, both inside the image here)
    want = x[0, 1, 2::4, 2::4]
    assert torch.equal(p[0, 1].round(), want)
    one = dense_probs(_Sampler(), x, flip=False, steps=1)
    assert torch.equal(one[0, 1].round(), x[0, 1, 4::8, 4::8])


def test_flip_averages_the_unmirrored_probabilities():
    x = torch.randn(1, 3, 16, 24)
    model = _Sampler()
    p = dense_probs(model, x, flip=True, steps=1)
    a = torch.softmax(model(x), 1)
    b = torch.softmax(model(x.flip(-1)), 1).flip(-1)
    assert torch.allclose(p, (a + b) / 2)
    imgs = torch.randn(2, 3, 3, 8, 8)
    fc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    got = classify(fc, imgs, flip=True)
    flat = imgs.flatten(0, 1)
    want = ((torch.softmax(fc(flat), 1) + torch.softmax(fc(flat.flip(-1)), 1)) / 2).view(2, 3, 5).mean(1)
    assert torch.allclose(got, want, atol=1e-6)


def test_segment_returns_original_size_and_averages_scales():
    img = torch.zeros(3, 30, 44)
    img[1, :, 22:] = 1.0  # right half is class 1
    p = segment(_Sampler(), img, scales=[None, 64], canvas_min=48)
    assert p.shape == (3, 30, 44)
    pred = p.argmax(0)
    assert (pred[:, :16] != 1).all() and (pred[:, 30:] == 1).all()


def test_ohem_keeps_hard_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 40, 40, requires_grad=True)
    target = torch.randint(0, 3, (1, 40, 40))
    target[0, :5] = 255
    loss = ohem_cross_entropy(logits, target, thresh=0.6, min_kept=256)
    nll = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    p = torch.exp(-nll)
    valid = target != 255
    keep = valid & (p <= 0.6)
    assert keep.sum() > 256
    assert torch.allclose(loss, nll[keep].mean())
    # threshold raised to the 256th smallest probability when fewer than 256 are hard
    easy = torch.where(valid, target, 0)
    logits2 = torch.nn.functional.one_hot(easy, 3).permute(0, 3, 1, 2).float() * 10
    logits2[0, :, 10, :20] = 0  # 20 hard pixels (p = 1/3)
    loss2 = ohem_cross_entropy(logits2, target, min_kept=256)
    nll2 = torch.nn.functional.cross_entropy(logits2, target, ignore_index=255, reduction="none")
    kth = torch.exp(-nll2)[valid].kthvalue(256).values
    assert torch.allclose(loss2, nll2[valid & (torch.exp(-nll2) <= kth)].mean())
    small = torch.full((1, 4, 4), 255)
    small[0, 0, :3] = 1
    assert torch.allclose(ohem_cross_entropy(logits[:, :, :4, :4], small),
                          torch.nn.functional.cross_entropy(logits[:, :, :4, :4], small, ignore_index=255))
    assert labels_at_feature_resolution(torch.arange(64).view(1, 8, 8).repeat(1, 2, 2)).shape == (1, 2, 2)


def test_confusion_matrix_scores_by_hand():
    cm = ConfusionMatrix(3)
    gt = torch.tensor([0, 0, 1, 1, 2, 255])
    pr = torch.tensor([0, 1, 1, 1, 0, 2])
    cm.update(pr, gt)
    s = cm.scores()
    assert s["pixel_acc"] == pytest.approx(3 / 5)
    assert s["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["mean_acc"] == pytest.approx((0.5 + 1 + 0) / 3)
    t = TopK()
    t.update(torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1]]), torch.tensor([2, 0]))
    assert t.scores()["acc1"] == 0.5 and t.scores()["err1"] == 0.5


def test_schedules_and_parameter_groups():
    assert learning_rate("linear", 0.1, 0, 100) == 0.1
    assert learning_rate("linear", 0.1, 50, 100) == pytest.approx(0.1 * (1 - 50 / 101))
    assert learning_rate("linear", 0.1, 100, 100) == pytest.approx(0.1 / 101)
    assert learning_rate("linear", 1e-3, 10**9, 100) == 1e-6  # the floor
    assert learning_rate("poly", 0.1, 100, 100) == 0.0 and learning_rate("fixed", 0.3, 7, 9) == 0.3
    from widedeep.models import create_model

    m = create_model("voc_rna-a1_cls21_s8", width=0.0625)
    opt = make_optimizer(m, "seg", 0.01)
    decay, no_decay = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert id(m.bn7.weight) in ids(decay["params"]) and id(m.bn7.bias) in ids(no_decay["params"])
    assert id(m.head.score.bias) in ids(no_decay["params"]) and id(m.conv1a.weight) in ids(decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"], no_decay["lr_mult"]) == (5e-4, 0.0, 2.0)
    c = make_optimizer(create_model("resnet38_a1", width=0.0625, num_classes=3), "cls", 0.1)
    assert c.defaults["nesterov"] and c.param_groups[0]["weight_decay"] == 1e-4 and c.param_groups[1]["lr_mult"] == 1


# ----------------------------------------------------------------------------- CLI


SEED_COMMANDS = [
    "--data-root data/ilsvrc12 --output output --batch-images 10 --phase val --weights "
    "models/ilsvrc-cls_rna-a_cls1000_ep-0001.params --split val --test-scales 320 --gpus 0 --no-choose-interp-method "
    "--pool-top-infer-style caffe",
    "--gpus 0,1,2,3 --data-root data/ilsvrc12 --output output --model ilsvrc-cls_rna-a1_cls1000_from-a "
    "--batch-images 256 --crop-size 224 --weights models/ilsvrc-cls_rna-a_cls1000_ep-0001.params --lr-type linear "
    "--base-lr 0.01 --to-epoch 9 --kvstore local --prefetch-threads 8 --prefetcher process --backward-do-mirror",
    "--data-root data/ade20k --output output --phase val --weights models/ade20k_rna-a1_cls150_s8_ep-0001.params "
    "--split val --test-scales 500 --test-flipping --test-steps 2 --gpus 0",
    "--gpus 0,1,2,3 --split train --data-root data/cityscapes --output output --model cityscapes_rna-a1_cls19_s8 "
    "--batch-images 16 --crop-size 500 --origin-size 2048 --scale-rate-range 0.7,1.3 --weights "
    "models/ilsvrc-cls_rna-a1_cls1000_ep-0001.params --lr-type fixed --base-lr 0.0016 --to-epoch 140 --kvstore local "
    "--prefetch-threads 8 --prefetcher process --cache-images 0 --backward-do-mirror",
]


@pytest.mark.parametrize("cmd", SEED_COMMANDS)
def test_seed_readme_commands_parse(cmd):
    a = parser().parse_args(shlex.split(cmd))
    assert a.data_root.startswith("data/")


def test_clear_errors_for_bad_flags(voc5, tmp_path):
    with pytest.raises(TrainingError, match="--phase val needs --weights"):
        main(["--data-root", str(voc5), "--output", str(tmp_path), *TINY, "--phase", "val"])
    with pytest.raises(ValueError, match="no output stride"):
        main(["--data-root", str(voc5), "--output", str(tmp_path), "--model", "voc_rna-a1_cls21"])
    with pytest.raises(Exception, match="missing VOC2012"):
        main(["--data-root", str(tmp_path), "--output", str(tmp_path), *TINY])
