"""`python -m widedeep.convert`: formats, label from the file name, clear errors."""

import subprocess
import sys

import pytest
import torch

from widedeep.convert import main
from widedeep.models import create_model
from widedeep.weights import read_params, read_state_dict, save_weights


@pytest.fixture(scope="module")
def seg_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "cityscapes_rna-a1_cls19_s8_ep-0140.params"
    model = create_model("cityscapes_rna-a1_cls19_s8")
    save_weights(model, path, params_format="legacy")
    return path, model


def test_params_to_safetensors_and_back(tmp_path, seg_params):
    src, model = seg_params
    out = tmp_path / "city.safetensors"
    assert main([str(src), str(out)]) == 0
    state = read_state_dict(out)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if not k.endswith("tracked"))
    back = tmp_path / "city.params"
    assert main([str(out), str(back), "--label", "cityscapes_rna-a1_cls19_s8"]) == 0
    assert torch.equal(read_params(back)["arg:linear19_weight"], model.head.score.weight)


def test_unknown_label_and_wrong_label_are_clear_errors(tmp_path, seg_params):
    src, _ = seg_params
    odd = tmp_path / "mystery.params"
    odd.write_bytes(src.read_bytes())
    r = subprocess.run(
        [sys.executable, "-m", "widedeep.convert", str(odd), str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--label" in r.stderr
    with pytest.raises(ValueError, match="19 classes but the model has 21"):
        main([str(src), str(tmp_path / "o.safetensors"), "--label", "voc_rna-a1_cls21_s8"])
    assert not (tmp_path / "o.safetensors").exists()
