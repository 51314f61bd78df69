"""Runs and files (issue 21, items 9-13): one run per folder, SIGTERM, disk full, flag checks, weight dtypes."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipes.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
LABEL = "voc_rna-a1_cls21_s8"
TINY = [
    "--model",
    LABEL,
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
    "--no-eval",
    "--batch-images",
    "4",
]


def _env(**extra):
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "widedeep.train", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def popen(*argv) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "widedeep.train", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def ok(r):
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


def one_line_error(r, *needles) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, (
        r.returncode,
        r.stderr,
        r.stdout[-2000:],
    )
    assert lines[0].startswith("python -m widedeep.train: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def rows(run: Path) -> list[dict]:
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def wait_for(cond, p: subprocess.Popen, timeout=300):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[0]
    assert cond()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_synthetic(
        "voc", tmp_path_factory.mktemp("faults") / "voc", num_train=16, num_val=4, size=(48, 64), num_classes=3
    )


# ------------------------------------------------------------------ 9. one run per folder


def test_a_second_live_run_into_the_same_folder_is_refused(voc, tmp_path):
    run = tmp_path / LABEL
    p = popen("--data-root", voc, "--output", tmp_path, *TINY, "--to-epoch", "200", "--checkpoint-interval", "1")
    try:
        wait_for(lambda: (run / "last.pt").is_file(), p)
        r = cli("--data-root", voc, "--output", tmp_path, *TINY, "--to-epoch", "1", "--resume")
        one_line_error(r, str(run), "in use by another run", f"host {socket.gethostname()}", f"pid {p.pid}")
        # the refused run touched nothing: the live run's log is its own
        assert "in use" not in (run / "log.txt").read_text()
    finally:
        p.kill()
        p.communicate()
    # the kernel dropped the killed run's lock: starting over works at once
    ok(
        cli(
            "--data-root", voc, "--output", tmp_path, *TINY, "--to-epoch", "1", "--stop-after-steps", "1", "--overwrite"
        )
    )


def test_a_fresh_run_into_a_used_folder_refuses_and_overwrite_starts_over(voc, tmp_path):
    common = ["--data-root", voc, "--output", tmp_path, *TINY, "--save-every", "1"]
    ok(cli(*common, "--to-epoch", "2"))
    run = tmp_path / LABEL
    before = (run / "last.pt").read_bytes()
    one_line_error(cli(*common, "--to-epoch", "1"), str(run), "--resume", "--overwrite")
    assert (run / "last.pt").read_bytes() == before and [r["epoch"] for r in rows(run)] == ["1", "2"]
    ok(cli(*common, "--to-epoch", "1", "--overwrite"))
    assert [r["epoch"] for r in rows(run)] == ["1"]  # no stale rows of the old run
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / f"{LABEL}_ep-0002.params").exists() and (tmp_path / f"{LABEL}_ep-0001.params").exists()
    assert (run / "log.txt").read_text().count("epochs 1..") == 1  # the old run's log went with it


def test_summary_of_a_resumed_run_drops_rows_after_its_checkpoint(tmp_path):
    from widedeep.train.logs import Summary

    s = Summary(tmp_path / "summary.csv")
    for e in (1, 2, 3):
        s.add({"epoch": e, "train_loss": 1.0 / e})
    s = Summary(tmp_path / "summary.csv", keep_through=1)  # resumed from a checkpoint at the end of epoch 1
    s.add({"epoch": 2, "train_loss": 0.7})
    assert [r["epoch"] for r in rows(tmp_path)] == ["1", "2"] and rows(tmp_path)[1]["train_loss"] == "0.7"


# ------------------------------------------------------------------ 10. SIGTERM


def test_sigterm_is_handled_like_ctrl_c(voc, tmp_path):
    run = tmp_path / LABEL
    p = popen("--data-root", voc, "--output", tmp_path, *TINY, "--to-epoch", "200", "--checkpoint-interval", "1")
    try:
        wait_for(lambda: (run / "last.pt").is_file(), p)
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out
    assert "terminated (SIGTERM)" in out and f"Last checkpoint: {run / 'last.pt'}" in out and "--resume" in out, out
    assert "Traceback" not in out, out
    ck = torch.load(run / "last.pt", weights_only=True)  # whole
    assert ck["global_step"] >= 1


class _TermWhilePickled:
    """Pickling it sends this process SIGTERM: a scheduler's stop in the middle of torch.save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (7,))


def test_sigterm_during_a_checkpoint_write_finishes_the_file_then_stops(tmp_path):
    from widedeep.train import checkpoint

    with pytest.raises(checkpoint.Terminated), checkpoint.sigterm_as_interrupt():
        checkpoint.save(tmp_path / "last.pt", {"a": torch.ones(3), "b": _TermWhilePickled(), "c": torch.zeros(2)})
    saved = torch.load(tmp_path / "last.pt", weights_only=False)  # written whole (the test's own file: int global)
    assert saved["b"] == 7 and torch.equal(saved["c"], torch.zeros(2))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# ------------------------------------------------------------------ 11. disk full

# The trainer, with the disk "filling up" on the second write of last.pt: every write to its temporary raises
# ENOSPC, as a full file system does (torch.save then reports "unexpected pos ..." with the OSError in its chain).
_DISK_FULL = """
import errno, io, sys
import widedeep.fileio as fio
from widedeep.train.run import cli

seen = []

class Full(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

def fake_open(path, mode="r", *a, **k):
    if ".last.pt.tmp" in str(path):
        seen.append(path)
        if len(seen) >= 2:
            return Full(path, mode)
    return open(path, mode, *a, **k)

fio.open = fake_open
sys.exit(cli(sys.argv[1:]))
"""


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(voc, tmp_path):
    run = tmp_path / LABEL
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _DISK_FULL,
            "--data-root",
            str(voc),
            "--output",
            str(tmp_path),
            *TINY,
            "--to-epoch",
            "1",
            "--checkpoint-interval",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    line = one_line_error(r, f"no space left on device writing {run / 'last.pt'}", "previous version")
    assert "unexpected pos" not in line
    ck = torch.load(run / "last.pt", weights_only=True)  # the first checkpoint, whole
    assert ck["global_step"] == 1
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # no half-written temporary left


# ------------------------------------------------------------------ 12. bad flags get one line


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--crop-size", "0"),
        ("--crop-size", "-8"),
        ("--batch-images", "0"),
        ("--batch-images", "-4"),
        ("--to-epoch", "0"),
        ("--to-epoch", "-1"),
        ("--width", "0"),
        ("--test-steps", "0"),
        ("--scale-rate-range", "1.3,0.7"),
    ],
)
def test_out_of_range_flags_name_the_flag(flag, value):
    from widedeep.train.cli import FlagError, parse

    with pytest.raises(FlagError, match=rf"^{flag} {value}: expected"):
        parse(["--data-root", "x", "--model", LABEL, flag, value])


def test_bad_flags_and_foreign_checkpoints_on_the_command_line(voc, tmp_path):
    base = ["--data-root", voc, "--output", tmp_path / "o", *TINY]
    one_line_error(cli(*base, "--crop-size", "0"), "--crop-size 0: expected a positive integer")
    one_line_error(cli(*base, "--to-epoch", "0"), "--to-epoch 0: expected")
    one_line_error(cli(*base, "--weights", tmp_path), str(tmp_path), "a folder, expected a weights file")
    # a checkpoint of another --width: a hint, not a traceback listing hundreds of keys
    ok(
        cli(
            "--data-root",
            voc,
            "--output",
            tmp_path / "wide",
            *TINY,
            "--width",
            "0.125",
            "--to-epoch",
            "1",
            "--stop-after-steps",
            "1",
        )
    )
    wide = tmp_path / "wide" / LABEL / "last.pt"
    one_line_error(cli(*base, "--to-epoch", "1", "--resume", wide), str(wide), "width-0.125", "add --width 0.125")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    one_line_error(
        cli(*base, "--to-epoch", "1", "--resume", tmp_path / "list.pt"), "list.pt", "not a widedeep training checkpoint"
    )
