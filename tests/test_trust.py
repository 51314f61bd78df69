"""Trust nothing loaded (issue 21, item 1): checkpoints and weights are read with ``weights_only=True``.

A crafted ``last.pt`` whose pickle would run a command is refused with one line naming it (exit status 2) and
the command never runs, on ``--resume PATH`` and on a bare ``--resume`` (the run folder's own ``last.pt``).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    "--to-epoch",
    "1",
]


def cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "widedeep.train", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def ok(r):
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


def one_line_error(r, *needles) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("python -m widedeep.train: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


class _RunsACommand:
    """Unpickling it runs ``touch MARKER`` (os.system): what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsPython:
    """Unpickling it calls a function of an ordinary module (torch's other wording: "Unsupported global")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_synthetic(
        "voc", tmp_path_factory.mktemp("trust") / "voc", num_train=16, num_val=4, size=(48, 64), num_classes=3
    )


def _hostile(path: Path, payload) -> None:
    torch.save(
        {"model": {}, "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "rng": {}, "x": payload}, path
    )


@pytest.mark.parametrize("kind", [_RunsACommand, _RunsPython])
def test_resume_of_a_hostile_checkpoint_runs_nothing(voc, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _hostile(evil, kind(marker))
    r = cli("--data-root", voc, "--output", tmp_path / "o", *TINY, "--resume", evil)
    line = one_line_error(r, str(evil), "refused")
    assert not marker.exists(), "the checkpoint ran code"
    assert "Python objects" in line
    # bare --resume: the run folder's own last.pt (anyone who can write a shared output folder)
    run = tmp_path / "o" / LABEL
    run.mkdir(parents=True, exist_ok=True)
    _hostile(run / "last.pt", kind(marker))
    one_line_error(cli("--data-root", voc, "--output", tmp_path / "o", *TINY, "--resume"), str(run / "last.pt"))
    assert not marker.exists(), "the checkpoint ran code"


def test_load_refuses_without_running_in_process(tmp_path):
    from widedeep.train import checkpoint

    marker = tmp_path / "pwned"
    for kind in (_RunsACommand, _RunsPython):
        _hostile(tmp_path / "evil.pt", kind(marker))
        with pytest.raises(ValueError, match=r"evil\.pt: refused"):
            checkpoint.load(tmp_path / "evil.pt")
        assert not marker.exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: not a widedeep training checkpoint \(a list"):
        checkpoint.load(tmp_path / "list.pt")


def test_rng_state_is_plain_and_restores_every_generator():
    from widedeep.train import checkpoint

    np.random.seed(3)
    np.random.standard_normal()  # a cached gaussian: has_gauss = 1
    state = checkpoint.rng_state()
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    want = (np.random.standard_normal(4), torch.rand(3), __import__("random").random())
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.set_rng_state(state)
    got = (np.random.standard_normal(4), torch.rand(3), __import__("random").random())
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1]) and want[2] == got[2]


def test_legacy_numpy_state_loads_through_the_restricted_allow_list(tmp_path):
    """Checkpoints written before this change hold np.random.get_state()'s tuple (a pickled uint32 ndarray)."""
    from widedeep.train import checkpoint

    np.random.seed(5)
    legacy = np.random.get_state()
    base = {"model": {}, "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 0}
    torch.save({**base, "rng": {"numpy": legacy}}, tmp_path / "old.pt")
    ck = checkpoint.load(tmp_path / "old.pt")
    got = ck["rng"]["numpy"]
    assert got[0] == "MT19937" and got[1].dtype == np.uint32 and np.array_equal(got[1], legacy[1])
    assert tuple(got[2:]) == tuple(legacy[2:])
    # the allow-list builds that array and nothing else: other numpy arrays (float64, objects) are refused
    torch.save({**base, "rng": {"numpy": np.ones(3)}}, tmp_path / "f64.pt")
    torch.save({**base, "rng": {"numpy": np.array([Path("x")], dtype=object)}}, tmp_path / "obj.pt")
    for name in ("f64.pt", "obj.pt"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable checkpoint|{name}: refused"):
            checkpoint.load(tmp_path / name)


def test_a_checkpoint_of_the_previous_format_still_resumes_exactly(voc, tmp_path):
    """Resuming a legacy-format last.pt (numpy state pickled) gives the same weights as the current format."""
    common = ["--data-root", voc, *TINY, "--to-epoch", "2"]
    ok(cli(*common, "--output", tmp_path / "a", "--stop-after-steps", "3"))
    new = tmp_path / "a" / LABEL / "last.pt"
    ck = torch.load(new, weights_only=True)  # the current format is plain
    old = dict(ck)
    s = ck["rng"]["numpy"]
    old["rng"] = {
        **ck["rng"],
        "numpy": ("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]),
    }
    (tmp_path / "b" / LABEL).mkdir(parents=True)
    torch.save(old, tmp_path / "b" / LABEL / "last.pt")
    ok(cli(*common, "--output", tmp_path / "a", "--resume"))
    ok(cli(*common, "--output", tmp_path / "b", "--resume"))
    a = torch.load(tmp_path / "a" / LABEL / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / LABEL / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_weights_loader_names_python_objects_in_current_torch_wording(tmp_path):
    from widedeep.weights import WeightsFormatError, read_state_dict

    marker = tmp_path / "pwned"
    for kind in (_RunsACommand, _RunsPython):
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {"conv1a.weight": torch.zeros(1)}, "x": kind(marker)}, path)
        with pytest.raises(WeightsFormatError, match=r"w\.pth: the checkpoint holds Python objects"):
            read_state_dict(path)
        assert not marker.exists()
