"""Weight dtypes are checked on reading (issue 21, item 13): integer/bool tensors for floating parameters are an
error naming the tensor (a silent cast trained to nonsense), float64 is cast to float32 with a note."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from widedeep.models import create_model
from widedeep.weights import WeightsFormatError, load_weights, read_state_dict

ROOT = Path(__file__).resolve().parents[1]
W = 0.0625


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in create_model("resnet38d", width=W).state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_floating_tensors_for_floating_parameters_are_an_error(tmp_path, state, dtype):
    bad = dict(state)
    bad["b2.conv_branch1.weight"] = bad["b2.conv_branch1.weight"].to(dtype)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(
        WeightsFormatError,
        match=rf"bad\.safetensors: tensor b2\.conv_branch1\.weight is "
        rf"{str(dtype)[6:]}, expected floating point",
    ):
        read_state_dict(path)
    with pytest.raises(WeightsFormatError, match=r"b2\.conv_branch1\.weight"):
        load_weights(create_model("resnet38d", width=W), bad)  # a state_dict source too
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widedeep.convert",
            str(path),
            str(tmp_path / "out.safetensors"),
            "--label",
            "resnet38d",
            "--width",
            str(W),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and "b2.conv_branch1.weight" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_float64_is_cast_with_a_note_and_convert_writes_float32(tmp_path, state, caplog):
    doubled = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    path = tmp_path / "f64.safetensors"
    save_file(doubled, str(path))
    with caplog.at_level(logging.WARNING):
        got = read_state_dict(path)
    assert "float64 tensors cast to float32" in caplog.text
    assert all(v.dtype == torch.float32 for k, v in got.items() if not k.endswith("num_batches_tracked"))
    model = create_model("resnet38d", width=W)
    load_weights(model, path)
    torch.testing.assert_close(model.state_dict()["conv1a.weight"], state["conv1a.weight"])
    out = tmp_path / "out.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "widedeep.convert", str(path), str(out), "--label", "resnet38d", "--width", str(W)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert all(v.dtype == torch.float32 for k, v in load_file(str(out)).items() if "num_batches" not in k)
