"""widedeep.train: learning on synthetic data, resume, DDP (gloo), evaluation protocol, metrics, CLI."""

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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

TINY = [
    "--model",
    "voc_rna-a1_cls21_s8",
    "--width",
    "0.0625",
    "--crop-size",
    "48",
    "--origin-size",
    "64",
    "--bn-stats",
    "batch",
    "--backend",
    "torch",
    "--prefetch-threads",
    "0",
    "--test-scales",
    "64",
    "--log-interval",
    "1000",
    "--save-every",
    "0",
]


ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv, cwd=None, timeout=600, **env) -> subprocess.CompletedProcess:
    """``python -m widedeep.train ARGS`` in its own process, as a user runs it: a native crash (oneDNN, Triton)
    fails this test with its output instead of aborting the whole pytest run."""
    return subprocess.run(
        [sys.executable, "-m", "widedeep.train", *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
    )


def torchrun(nproc: int, *argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_free_port()),
            "-m",
            "widedeep.train",
            *map(str, argv),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(OMP_NUM_THREADS="1"),
    )


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, (
        f"exit status {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def voc5(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc5") / "voc"
    return write_synthetic("voc", root, num_train=32, num_val=8, size=(48, 80), num_classes=5)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_main_job_runs_as_a_user_runs_it_and_learns(tmp_path):
    """The README's main job, exactly as typed (no arguments), in a fresh folder and its own process."""
    r = cli(cwd=tmp_path, timeout=900)
    ok(r)
    run = tmp_path / "output" / "demo" / "voc_rna-a1_cls21_s8"
    rows = _rows(run)
    assert len(rows) == 40 and float(rows[-1]["train_loss"]) < 0.6 * float(rows[0]["train_loss"])
    metrics = json.loads((run / "metrics-val.json").read_text())
    # 5 classes on the synthetic set: always-background gives mIoU ~0.15; a uniform guess ~0.1
    assert metrics["miou"] > 0.5, metrics
    assert f"mIoU {metrics['miou']:.4f}" in r.stdout
    for name in ("curves.png", "best.pt", "last.pt", "log.txt"):
        assert (run / name).is_file(), name
    assert (tmp_path / "output" / "demo" / "voc_rna-a1_cls21_s8_ep-0040.params").is_file()


def test_resume_equals_uninterrupted_run(voc5, tmp_path):
    common = [
        "--data-root",
        voc5,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "2",
        "--base-lr",
        "0.01",
        "--lr-type",
        "linear",
        "--no-eval",
        "--bn-stats",
        "auto",
    ]  # seg default: frozen BN statistics
    ok(cli(*common, "--output", tmp_path / "a"))
    ok(cli(*common, "--output", tmp_path / "b", "--stop-after-steps", "11"))  # killed mid-epoch 2
    ok(cli(*common, "--output", tmp_path / "b", "--resume"))
    a = torch.load(tmp_path / "a" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 16
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the resumed epoch's row covers the whole epoch (merged), and says where it resumed
    ra, rb = _rows(tmp_path / "a" / "voc_rna-a1_cls21_s8"), _rows(tmp_path / "b" / "voc_rna-a1_cls21_s8")
    assert [r["epoch"] for r in rb] == ["1", "2"] and rb[1]["resumed_at_step"] == "3" and not rb[0]["resumed_at_step"]
    for x, y in zip(ra, rb):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-9)
        assert float(x["train_acc"]) == pytest.approx(float(y["train_acc"]), rel=1e-9)


def test_resume_from_the_last_step_of_an_epoch(voc5, tmp_path):
    """A checkpoint taken at the epoch's last step (e.g. killed during the end-of-epoch evaluation)."""
    common = [
        "--data-root",
        voc5,
        "--output",
        tmp_path,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "2",
        "--base-lr",
        "0.01",
    ]
    ok(cli(*common, "--stop-after-steps", "8"))  # 32 images / 4 = 8 steps: the last step of epoch 1
    ck = torch.load(tmp_path / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["step_in_epoch"]) == (0, 8)
    ok(cli(*common, "--resume"))
    rows = _rows(tmp_path / "voc_rna-a1_cls21_s8")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["resumed_at_step"] == "8" and rows[1]["val_miou"]
    assert float(rows[0]["train_loss"]) > 0  # the epoch's loss from the checkpoint, not 0 for "no steps"


def test_resume_rejects_a_non_checkpoint(voc5, tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match=r"--resume .*x\.pt: not a widedeep training checkpoint"):
        main(["--data-root", str(voc5), "--output", str(tmp_path), *TINY, "--resume", str(bad)])


def test_resume_with_another_amp_setting(voc5, tmp_path):
    common = ["--data-root", voc5, "--output", tmp_path, *TINY, "--batch-images", "4", "--to-epoch", "1", "--no-eval"]
    ok(cli(*common, "--stop-after-steps", "2"))
    r = cli(*common, "--resume", "--amp", "fp16")
    ok(r)
    assert "the checkpoint was trained with --amp off" in r.stdout
    ck = torch.load(tmp_path / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    assert ck["global_step"] == 8 and ck["scaler"]  # the fp16 run's loss scale is saved from now on


def test_nan_loss_stops_with_a_clear_message(voc5, tmp_path):
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        main(
            [
                "--data-root",
                str(voc5),
                "--output",
                str(tmp_path),
                *TINY,
                "--batch-images",
                "4",
                "--base-lr",
                "1e12",
                "--to-epoch",
                "3",
                "--no-eval",
            ]
        )


def test_ctrl_c_says_where_the_checkpoint_is_and_stale_temporaries_are_removed(voc5, tmp_path):
    run = tmp_path / "voc_rna-a1_cls21_s8"
    run.mkdir()
    from widedeep.fileio import temporary_path

    stale = temporary_path(run / "last.pt", pid=999999999)  # left by a process killed while saving (no such pid)
    live = temporary_path(run / "last.pt")  # a writer that is still running (this test): keep
    other = run / ".last.pt.tmp-otherhost-999999999"  # another machine's: its pids mean nothing here, keep
    for f in (stale, live, other):
        f.write_bytes(b"half")
    args = [
        sys.executable,
        "-m",
        "widedeep.train",
        "--data-root",
        str(voc5),
        "--output",
        str(tmp_path),
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "50",
        "--no-eval",
        "--checkpoint-interval",
        "1",
    ]
    # a test run started in the background (`cmd &`) ignores SIGINT, and children inherit that: the child
    # starts with the default disposition, as it would from a terminal
    p = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 300
        while not (run / "last.pt").is_file() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[0]
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out
    assert f"Last checkpoint: {run / 'last.pt'}" in out and "--resume" in out, out
    assert "Traceback" not in out, out
    assert not stale.exists() and live.exists() and other.exists()


def test_two_process_gloo_run_gives_the_same_metrics(voc5, tmp_path):
    """Train briefly with torchrun and 2 processes, then evaluate the result with 1 and with 2 processes."""
    out = tmp_path / "ddp"
    train = [
        "--data-root",
        voc5,
        "--output",
        out,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "1",
        "--no-eval",
        "--save-every",
        "1",
        "--device",
        "cpu",
    ]
    ok(torchrun(2, *train))
    weights = out / "voc_rna-a1_cls21_s8_ep-0001.params"
    assert weights.is_file()
    val = [
        "--data-root",
        voc5,
        "--output",
        out,
        *TINY,
        "--phase",
        "val",
        "--weights",
        weights,
        "--test-flipping",
        "--device",
        "cpu",
    ]
    ok(torchrun(2, *val))
    metrics = out / "voc_rna-a1_cls21_s8" / "metrics-val.json"
    two = json.loads(metrics.read_text())
    metrics.unlink()
    ok(cli(*val))
    one = json.loads(metrics.read_text())
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-12)
    assert two["pixel_acc"] == pytest.approx(one["pixel_acc"], abs=1e-12)


def test_skip_bad_keeps_ddp_ranks_in_step(tmp_path):
    """A batch emptied by --skip-bad on one rank only: both ranks still take the same steps (no hang)."""
    root = write_synthetic("voc", tmp_path / "voc", num_train=8, num_val=2, size=(48, 64), num_classes=3)
    names = (root / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (root / "VOC2012" / "JPEGImages" / f"{names[0]}.jpg").write_bytes(b"not a jpeg")
    r = torchrun(
        2,
        "--data-root",
        root,
        "--output",
        tmp_path / "o",
        *TINY,
        "--batch-images",
        "2",
        "--to-epoch",
        "2",
        "--no-eval",
        "--skip-bad",
        "--device",
        "cpu",
        timeout=300,
    )
    ok(r)
    ck = torch.load(tmp_path / "o" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)
    assert ck["global_step"] == 8  # 2 epochs x 4 steps on both ranks
    assert "skipped: a batch had no readable sample" in r.stdout + r.stderr


def test_val_phase_saves_dataset_id_pngs(voc5, tmp_path):
    from widedeep.models import create_model
    from widedeep.weights import save_weights

    model = create_model("voc_rna-a1_cls21_s8", width=0.0625)
    w = tmp_path / "voc_rna-a1_cls21_s8_ep-0001.params"  # a released name, but our own file: warn and load
    save_weights(model, w)
    m = main(
        [
            "--data-root",
            str(voc5),
            "--output",
            str(tmp_path / "o"),
            "--weights",
            str(w),
            "--phase",
            "val",
            "--width",
            "0.0625",
            "--backend",
            "torch",
            "--prefetch-threads",
            "0",
            "--test-scales",
            "64",
        ]
    )
    assert "does not match the released" in (tmp_path / "o" / "voc_rna-a1_cls21_s8" / "log.txt").read_text()
    pred = tmp_path / "o" / "voc_rna-a1_cls21_s8" / "val-predictions"  # run folder named after the label
    ids = sorted((pred / "ids").glob("*.png"))
    assert len(ids) == 8 and len(list((pred / "color").glob("*.png"))) == 8
    with Image.open(ids[0]) as im:
        assert im.mode == "L" and im.size == Image.open(voc5 / "VOC2012" / "JPEGImages" / f"{ids[0].stem}.jpg").size
    assert 0 <= m["miou"] <= 1


def test_classification_training_and_protocol(tmp_path):
    root = write_synthetic("ilsvrc", tmp_path / "ilsvrc", num_train=40, num_val=12, size=(40, 64), num_classes=4)
    out = tmp_path / "out"
    ok(
        cli(
            "--data-root",
            root,
            "--output",
            out,
            "--model",
            "ilsvrc-cls_rna-a1_cls4",
            "--width",
            "0.0625",
            "--batch-images",
            "8",
            "--crop-size",
            "32",
            "--to-epoch",
            "10",
            "--base-lr",
            "0.05",
            "--lr-type",
            "linear",
            "--backend",
            "torch",
            "--prefetch-threads",
            "0",
            "--test-scales",
            "32,40",
            "--test-flipping",
            "--test-3crops",
            "--log-interval",
            "1000",
            "--save-every",
            "0",
        )
    )
    m = json.loads((out / "ilsvrc-cls_rna-a1_cls4" / "metrics-val.json").read_text())
    assert set(m["scales"]) == {"32", "40"} and m["count"] == 12
    assert m["err1"] == pytest.approx(1 - m["acc1"]) and m["acc5"] == 1.0  # 4 classes: top-5 always hits
    # learnt at the training scale (chance is 0.25); the 40 px scale is seen only at test time
    assert m["scales"]["32"]["acc1"] > 0.5, m


def test_channels_last_on_cpu_never_reaches_the_crashing_onednn_backward(voc5, tmp_path):
    """oneDNN crashes in the backward of strided convs with <16 channels on channels_last (AMD EPYC, AVX-512)."""
    r = cli(
        "--data-root",
        voc5,
        "--output",
        tmp_path,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "1",
        "--no-eval",
        "--channels-last",
    )
    ok(r)
    assert "--channels-last ignored" in r.stdout
    from widedeep.models import create_model
    from widedeep.train.memory_format import unsafe_cpu_convs, use_channels_last

    narrow = create_model("voc_rna-a1_cls21_s8", width=0.0625)
    assert "b2.conv_branch1" in unsafe_cpu_convs(narrow)
    assert not use_channels_last(narrow, torch.device("cpu"), True, training=True)
    assert use_channels_last(narrow, torch.device("cpu"), True, training=False)  # no backward in evaluation
    wide = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 1, stride=2))
    assert use_channels_last(wide, torch.device("cpu"), True, training=True)
    assert not use_channels_last(wide, torch.device("cpu"), False, training=True)


def test_recompute_unit_trains_like_the_fused_model(voc5, tmp_path):
    """--recompute unit re-runs each unit in backward: the same weights after training (dropout masks replayed)."""
    common = [
        "--data-root",
        voc5,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "1",
        "--no-eval",
        "--fused",
        "on",
        "--bn-stats",
        "batch",
        "--stop-after-steps",
        "3",
    ]
    ok(cli(*common, "--output", tmp_path / "f"))
    ok(cli(*common, "--output", tmp_path / "u", "--recompute", "unit"))
    f = torch.load(tmp_path / "f" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)["model"]
    u = torch.load(tmp_path / "u" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)["model"]
    for k in f:
        torch.testing.assert_close(u[k], f[k], rtol=1e-4, atol=1e-6, msg=k)  # running stats updated once too


class _CtrlCWhilePickled:
    """Pickling it sends this process a SIGINT: a Ctrl-C in the middle of torch.save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (int, (7,))


def test_ctrl_c_during_a_checkpoint_write_finishes_the_file_then_interrupts(tmp_path):
    from widedeep.train import checkpoint

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (not `pytest &`)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(tmp_path / "last.pt", {"a": torch.ones(3), "b": _CtrlCWhilePickled(), "c": torch.zeros(2)})
        handler_after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    saved = torch.load(tmp_path / "last.pt", weights_only=False)  # written whole, not a torn zip
    assert saved["b"] == 7 and torch.equal(saved["c"], torch.zeros(2))
    assert handler_after is signal.default_int_handler  # Ctrl-C handling restored


def test_compiled_training_equals_eager(voc5, tmp_path):
    """--compile default: torch.compile of the fused model (custom ops) trains to the same weights as eager."""
    common = [
        "--data-root",
        voc5,
        *TINY,
        "--batch-images",
        "4",
        "--to-epoch",
        "1",
        "--no-eval",
        "--fused",
        "on",
        "--bn-stats",
        "batch",
        "--stop-after-steps",
        "3",
    ]
    ok(cli(*common, "--output", tmp_path / "e"))
    r = cli(*common, "--output", tmp_path / "c", "--compile", "default")
    ok(r)
    assert "torch.compile mode default" in r.stdout + r.stderr
    e = torch.load(tmp_path / "e" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)["model"]
    c = torch.load(tmp_path / "c" / "voc_rna-a1_cls21_s8" / "last.pt", weights_only=False)["model"]
    assert e.keys() == c.keys()  # no "_orig_mod." prefixes: the checkpoint holds the plain model
    for k in e:
        torch.testing.assert_close(c[k], e[k], rtol=1e-4, atol=1e-5, msg=k)


def test_gpus_without_cuda_run_one_cpu_process(voc5, tmp_path):
    for gpus in ("0", "0,1"):
        r = cli(
            "--data-root",
            voc5,
            "--output",
            tmp_path / gpus,
            *TINY,
            "--batch-images",
            "4",
            "--to-epoch",
            "1",
            "--no-eval",
            "--stop-after-steps",
            "1",
            "--gpus",
            gpus,
        )
        ok(r)
        assert f"--gpus {gpus} ignored: no CUDA device here" in r.stderr
        assert "1 process(es)" in r.stdout


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
    assert torch.allclose(
        ohem_cross_entropy(logits[:, :, :4, :4], small),
        torch.nn.functional.cross_entropy(logits[:, :, :4, :4], small, ignore_index=255),
    )
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


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, one line on stderr that names what was wrong."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("python -m widedeep.train: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_clear_errors_for_bad_flags(voc5, tmp_path):
    _one_line_error(
        cli("--data-root", voc5, "--output", tmp_path, *TINY, "--phase", "val"), "--phase val needs --weights"
    )
    _one_line_error(
        cli("--data-root", voc5, "--output", tmp_path, "--model", "voc_rna-a1_cls21"), "no output stride", "_s8"
    )
    _one_line_error(cli("--data-root", tmp_path / "nowhere", "--output", tmp_path, *TINY), "--data-root", "nowhere")
    _one_line_error(cli("--data-root", voc5, "--output", tmp_path, "--model", "voc_rnb-a1_cls21_s8"), "voc_rnb")
    _one_line_error(cli("--data-root", voc5, "--output", tmp_path, *TINY, "--resume", tmp_path / "none.pt"), "none.pt")
    junk = tmp_path / "voc_rna-a1_cls21_s8_junk.safetensors"
    junk.write_bytes(b"0123456789")
    _one_line_error(
        cli("--data-root", voc5, "--output", tmp_path, *TINY, "--phase", "val", "--weights", junk), str(junk)
    )
    r = cli("--data-root", voc5, "--output", tmp_path, *TINY, "--phase", "val", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug: the traceback


def test_a_narrow_checkpoint_without_width_suggests_the_flag(voc5, tmp_path):
    from widedeep.models import create_model
    from widedeep.weights import save_weights

    w = tmp_path / "voc_rna-a1_cls21_s8_narrow.safetensors"
    save_weights(create_model("voc_rna-a1_cls21_s8", width=0.0625), w)
    line = _one_line_error(
        cli("--data-root", voc5, "--output", tmp_path, "--phase", "val", "--weights", w), str(w), "--width 0.0625"
    )
    assert "width=" not in line  # the CLI names its flag, not the Python argument


def test_a_corrupt_image_names_the_file_and_skip_bad(tmp_path):
    root = write_synthetic("voc", tmp_path / "voc", num_train=4, num_val=2, size=(48, 64), num_classes=3)
    names = (root / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    bad = root / "VOC2012" / "JPEGImages" / f"{names[0]}.jpg"
    bad.write_bytes(b"not a jpeg")
    r = cli(
        "--data-root", root, "--output", tmp_path / "o", *TINY, "--batch-images", "2", "--to-epoch", "1", "--no-eval"
    )
    _one_line_error(r, bad.name, "--skip-bad")
