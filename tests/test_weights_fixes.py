"""Issue 10 (weights): pool style from content not name, trunk-only loads, the md5 trap, clear format/width errors."""

import logging
import subprocess
import sys

import pytest
import torch

from widedeep.convert import main as convert
from widedeep.models import create_model, model_args
from widedeep.weights import (
    RELEASED_MD5,
    ChecksumError,
    WeightsFormatError,
    WeightsMismatchError,
    load_weights,
    read_state_dict,
    save_weights,
)
from widedeep.weights.released import RELEASED_MODEL_A, md5sum

W = 0.0625
A = "ilsvrc-cls_rna-a_cls1000"


def _model_a(pool_style="mxnet"):
    torch.manual_seed(3)
    m = create_model(A, width=W, pool_style=pool_style).eval()
    with torch.no_grad():  # non-trivial BN statistics, so every layer matters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _same_outputs(a, b):
    x = torch.randn(2, 3, 131, 115, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# ---------------------------------------------------------------- 1. Model A pool style from content
def test_own_model_a_under_the_trainers_released_like_name_reloads_identically(tmp_path, caplog):
    model = _model_a("mxnet")
    path = tmp_path / "ilsvrc-cls_rna-a_cls1000_ep-0003.params"  # what the trainer exports
    save_weights(model, path)
    with caplog.at_level(logging.INFO):
        back = create_model(A, weights=str(path), width=W)
    assert back.pool_style == "mxnet" and _same_outputs(back, model)
    assert "mxnet-style max-pools" in caplog.text and "not the released Model A" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_caffe_pool_style_recorded_by_save_weights_comes_back(tmp_path, suffix):
    model = _model_a("caffe")
    path = tmp_path / f"my_model_a{suffix}"
    save_weights(model, path)
    back = create_model(A, weights=str(path), width=W)
    assert back.pool_style == "caffe" and _same_outputs(back, model)
    if suffix == ".pth":  # still a plain state_dict torch can load
        plain = create_model(A, width=W, pool_style="caffe")
        plain.load_state_dict(torch.load(path, weights_only=True))
        assert _same_outputs(plain, model)
    # an explicit pool_style always wins
    assert create_model(A, weights=str(path), width=W, pool_style="mxnet").pool_style == "mxnet"


def test_released_model_a_is_recognised_by_md5_whatever_its_name(tmp_path, monkeypatch, caplog):
    model = _model_a("caffe")
    path = tmp_path / "downloaded_weights.params"
    save_weights(model, path)
    monkeypatch.setitem(RELEASED_MD5, RELEASED_MODEL_A, md5sum(path))
    with caplog.at_level(logging.INFO):
        back = create_model(A, weights=str(path), width=W)
    assert back.pool_style == "caffe" and _same_outputs(back, model)
    assert "md5 of the released" in caplog.text
    assert create_model(A, weights=str(path), width=W, pool_style="mxnet").pool_style == "mxnet"


# ---------------------------------------------------------------- 2. trunk-only models drop the classifier
@pytest.fixture(scope="module")
def a1_file(tmp_path_factory):
    torch.manual_seed(5)
    model = create_model("ilsvrc-cls_rna-a1_cls1000", width=W).eval()
    path = tmp_path_factory.mktemp("a1") / "ilsvrc-cls_rna-a1_cls1000_mine.params"
    save_weights(model, path)
    return path, model


@pytest.fixture(scope="module")
def a1_released_name(a1_file):
    """The same file under a released name (what the trainer exports): md5 differs from the released one."""
    path, model = a1_file
    named = path.with_name("ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    named.write_bytes(path.read_bytes())
    return named, model


def test_resnet38d_starts_from_an_ilsvrc_a1_file(a1_file, caplog):
    path, a1 = a1_file
    with caplog.at_level(logging.INFO):
        d = create_model("resnet38d", weights=str(path), width=W)
    assert "dropped the file's classifier" in caplog.text
    assert d.num_classes == 0 and d.fc is None
    assert all(torch.equal(v, a1.state_dict()[k]) for k, v in d.state_dict().items())
    report = load_weights(create_model("resnet38d", width=W), path)
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"] and not report.missing and not report.unexpected


def test_convert_with_label_resnet38d_writes_the_trunk(a1_file, tmp_path, capsys):
    path, a1 = a1_file
    out = tmp_path / "resnet38d.safetensors"
    assert convert([str(path), str(out), "--label", "resnet38d", "--width", str(W)]) == 0
    state = read_state_dict(out)
    assert not any(k.startswith("fc.") for k in state) and torch.equal(state["bn7.weight"], a1.bn7.weight)
    load_weights(create_model("resnet38d", width=W), out)  # strict: fits exactly
    assert "dropped 2 classifier tensors" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. the md5 trap
def test_released_name_with_another_md5_warns_and_loads(a1_released_name, caplog, monkeypatch):
    path, a1 = a1_released_name
    with caplog.at_level(logging.WARNING):
        report = load_weights(create_model("ilsvrc-cls_rna-a1_cls1000", width=W), path)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert path.name in lines[0] and md5sum(path) in lines[0] and RELEASED_MD5[path.name] in lines[0]
    assert "as your own file" in lines[0]
    assert report.checksum == "mismatch" and report.checksum_verified is False
    with pytest.raises(ChecksumError, match=r"verify=False \(on the command line: --no-verify-weights\)"):
        load_weights(create_model("ilsvrc-cls_rna-a1_cls1000", width=W), path, verify="strict")
    monkeypatch.setitem(RELEASED_MD5, path.name, md5sum(path))
    report = load_weights(create_model("ilsvrc-cls_rna-a1_cls1000", width=W), path)
    assert report.checksum == "verified" and report.checksum_verified is True
    report = load_weights(create_model("ilsvrc-cls_rna-a1_cls1000", width=W), path, verify=False)
    assert report.checksum_verified is False


def test_convert_loads_an_own_export_under_a_released_name(a1_released_name, tmp_path):
    path, _ = a1_released_name
    out = tmp_path / "a1.safetensors"
    assert convert([str(path), str(out), "--width", str(W)]) == 0 and out.exists()


# ---------------------------------------------------------------- 4. error messages
@pytest.mark.parametrize("content", [b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a", b"version https://git-lfs\n"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_junk_files_get_a_clear_error_naming_the_file(tmp_path, content, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    expected = "safetensors" if suffix == ".safetensors" else "torch"
    with pytest.raises(WeightsFormatError, match=rf"junk{suffix}: not a readable {expected}"):
        read_state_dict(path)
    with pytest.raises(WeightsFormatError, match=rf"junk{suffix}"):
        create_model("resnet38d", weights=str(path))


def test_pth_with_python_objects_says_so(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(
        {"state_dict": {"conv1a.weight": torch.zeros(1)}, "args": __import__("argparse").Namespace(lr=0.1)}, path
    )
    with pytest.raises(WeightsFormatError, match=r"ckpt.pth: the checkpoint holds Python objects"):
        read_state_dict(path)


def test_junk_file_on_the_convert_command_line_is_one_line(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"0123456789")
    r = subprocess.run(
        [sys.executable, "-m", "widedeep.convert", str(path), str(tmp_path / "o.params"), "--label", "resnet38d"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "junk.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_narrow_checkpoint_into_a_full_width_model_suggests_width(a1_file):
    path, _ = a1_file
    with pytest.raises(WeightsMismatchError, match=r"width=0.0625 \(on the command line: --width 0.0625\)") as e:
        load_weights(create_model("ilsvrc-cls_rna-a1_cls1000"), path)
    err = e.value
    assert err.width_ratio == pytest.approx(W) and err.file_width == W and err.model_width == 1
    assert err.path == str(path) and err.file_classes == err.model_classes == 1000
    assert any(k == "conv1a.weight" for k, _, _ in err.mis_shaped)


def test_class_count_mismatch_names_the_cli_label_and_has_attributes(a1_file):
    path, _ = a1_file
    with pytest.raises(
        WeightsMismatchError, match=r"num_classes=1000 \(on the command line: --model <label>_cls1000\)"
    ) as e:
        load_weights(create_model("resnet38_a1", num_classes=10, width=W), path)
    assert e.value.file_classes == 1000 and e.value.model_classes == 10 and e.value.width_ratio is None
    assert [k for k, _, _ in e.value.mis_shaped] == ["fc.weight", "fc.bias"]


def test_missing_stride_message_names_the_cli_label():
    with pytest.raises(ValueError, match=r"--model voc_rna-a1_cls21_s8\) or pass output_stride=8"):
        model_args("voc_rna-a1_cls21")
