"""N processes train like one (issue 21, items 7-8): the segmentation loss is normalised by the global count of
valid pixels, and the logged/summarised loss and accuracy are reduced over ranks. gloo on CPU, subprocesses."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipes.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
LABEL = "voc_rna-a1_cls21_s8"


def _env():
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(r):
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


def test_two_gloo_processes_train_like_one(tmp_path):
    # masks with a 255 border and objects of varied size: the ranks' valid-pixel counts differ in every step
    voc = write_synthetic("voc", tmp_path / "voc", num_train=16, num_val=2, size=(48, 80), num_classes=5)
    common = [
        "--data-root",
        voc,
        "--model",
        LABEL,
        "--width",
        "0.0625",
        "--crop-size",
        "48",
        "--origin-size",
        "64",
        "--bn-stats",
        "frozen",
        "--backend",
        "torch",
        "--prefetch-threads",
        "0",
        "--log-interval",
        "1",
        "--save-every",
        "0",
        "--no-eval",
        "--batch-images",
        "4",
        "--to-epoch",
        "1",
        "--base-lr",
        "0.01",
        "--no-ohem",
        "--no-dropout",
        "--device",
        "cpu",
    ]
    common = list(map(str, common))
    ok(
        subprocess.run(
            [sys.executable, "-m", "widedeep.train", *common, "--output", str(tmp_path / "one")],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
    )
    ok(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_port()),
                "-m",
                "widedeep.train",
                *common,
                "--output",
                str(tmp_path / "two"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
    )
    one = torch.load(tmp_path / "one" / LABEL / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / LABEL / "last.pt", weights_only=True)
    assert one["global_step"] == two["global_step"] == 4
    moved = 0.0
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, atol=1e-5, rtol=0, msg=k)  # item 7
        moved = max(moved, (v.float() - two["model"][k].float()).abs().max().item())
    # item 8: summary.csv holds the loss and accuracy of the whole global batch, not rank 0's share
    rows = {}
    for name in ("one", "two"):
        with open(tmp_path / name / LABEL / "summary.csv") as f:
            rows[name] = list(csv.DictReader(f))[0]
    assert float(rows["two"]["train_loss"]) == pytest.approx(float(rows["one"]["train_loss"]), rel=1e-5)
    assert float(rows["two"]["train_acc"]) == pytest.approx(float(rows["one"]["train_acc"]), abs=1e-3)
